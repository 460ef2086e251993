"""`model-broker`: serve | complete | chat | embed | models | providers | health | usage | config check |
config show | keys create | keys hash.

This module owns the parser and the daemon side (`serve`, first run included, `config`,
`keys`); the client commands live in broker/cli_client.py, how they reach the daemon (and
what they say when they cannot) in broker/cli_connect.py. Every usage error is one line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from broker.cli_client import (
    EXIT_CONNECT,
    EXIT_NOT_SERVING,
    EXIT_RPC,
    EXIT_SERVING,
    EXIT_USAGE,
    add_request_args,
    cmd_chat,
    cmd_complete,
    cmd_embed,
    cmd_health,
    cmd_models,
    cmd_providers,
)
from broker.cli_connect import add_target_arg, add_tls_args, fail, listen_arg, tls_kwargs
from broker.cli_features import messages_arg
from broker.config import (
    DEFAULT_LISTEN,
    PRESETS,
    ConfigError,
    MetricsConfig,
    Settings,
    dump_settings,
    load_settings,
    preset_settings,
    settings_from_env,
)

__all__ = ["EXIT_CONNECT", "EXIT_NOT_SERVING", "EXIT_RPC", "EXIT_SERVING", "EXIT_USAGE", "main"]
# The names client subcommands use (a new one needs no other import): the TLS flags as
# BrokerClient keyword arguments, and a failed call printed as one line (exit code 1).
_tls_kwargs, _fail = tls_kwargs, fail

# SIGTERM/SIGINT that `serve` received before its event loop took the signals over.
_early_signals: list[int] = []


def _catch_early_signals() -> None:
    """From `serve`'s first line: a SIGTERM while the config loads or the modules import is
    remembered (and then handled as a drain, exit 0) instead of killing the process."""

    def remember(sig: int, _frame: object) -> None:
        _early_signals.append(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, remember)
    # SIGHUP reloads the config once the server runs (broker/reload.py); until then (and in
    # a `--workers` parent) it must not kill the process, which is SIGHUP's default.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A `--workers` parent starts its workers with both blocked until this point.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or os.environ.get("MODEL_BROKER_CONFIG")
    if path:
        return load_settings(path)
    if getattr(args, "preset", None):
        return preset_settings(args.preset)
    return settings_from_env()


def run_loop(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run the daemon's coroutine on the configured event loop (server.event_loop)."""
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    _catch_early_signals()
    from broker.logs import configure_logging

    worker = args.worker_index is not None
    configure_logging(
        args.log_level, static={"worker": args.worker_index, "pid": os.getpid()} if worker else None
    )
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"model-broker: {exc}", file=sys.stderr)
        return 2
    if not settings.providers:
        # First run: local model servers if any answer, else one screen of what to set.
        from broker.discover_local import first_run

        try:
            settings = first_run(settings, worker=worker, export=args.workers > 1 and not worker)
        except ConfigError as exc:  # a malformed MODEL_BROKER_DISCOVER_PORTS
            print("model-broker: " + "; ".join(exc.problems), file=sys.stderr)
            return 2
    from broker.auth import open_listen_warning

    auth_warning = open_listen_warning(settings, args.listen or settings.server.listen)
    if auth_warning:
        print(f"model-broker: warning: {auth_warning}", file=sys.stderr)
    if not worker:
        from broker.state import state_warnings

        for warning in state_warnings(settings, args.workers):  # limits that would not hold
            print(f"model-broker: warning: {warning}", file=sys.stderr)
    if args.metrics_listen:
        settings = settings.model_copy(update={"metrics": MetricsConfig(listen=args.metrics_listen)})
    if not worker and args.workers == 1:
        # Said before grpc tries: its own failure is a multi-line C-core log plus "Failed to bind".
        problem = _bind_problem(args.listen or settings.server.listen)
        if problem:
            print(f"model-broker: {problem}", file=sys.stderr)
            return 1
    if args.workers > 1 and not worker:
        from broker.workers import supervise

        return supervise(args, settings, signalled=_early_signals)
    from broker.metrics import BrokerMetrics
    from broker.server import BrokerServer

    async def run() -> None:
        # grpc.aio binds its server to the loop that is running when it is created.
        # A worker shares the port with its siblings and leaves /metrics to the parent.
        server = BrokerServer(
            settings,
            reuse_port=worker,
            serve_metrics=not worker,
            metrics=BrokerMetrics(process=False) if worker else None,
            # The file to watch and re-read on SIGHUP (none: started from the environment).
            config_path=args.config or os.environ.get("MODEL_BROKER_CONFIG") or None,
        )
        if not worker:
            await server.serve_until_signal(args.listen, signalled=_early_signals)
            return
        from broker.workers import exit_with_parent

        orphan_watch = asyncio.create_task(exit_with_parent())
        try:
            await server.serve_until_signal(args.listen, signalled=_early_signals)
        finally:
            orphan_watch.cancel()

    try:
        run_loop(run(), settings.server.event_loop)
    except ConfigError as exc:  # e.g. a TLS file that cannot be read
        print(f"model-broker: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"model-broker: {_bind_problem(args.listen or settings.server.listen) or exc}", file=sys.stderr)
        return 1
    return 0


def _bind_problem(listen: str) -> str | None:
    """Why HOST:PORT cannot be bound, said plainly (grpc says only "Failed to bind"), or None."""
    import errno
    import socket

    from broker.config import parse_listen

    try:
        host, port = parse_listen(listen)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except ValueError:
        return None
    except socket.gaierror as exc:
        return f"cannot listen on {listen}: unknown host {listen.rpartition(':')[0]!r} ({exc.strerror})"
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds: TIME_WAIT is no conflict
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"cannot listen on {listen}: the port is in use (another model-broker serve?)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"cannot listen on {listen}: {host} is not an address of this machine"
            if exc.errno == errno.EACCES:
                return f"cannot listen on {listen}: port {port} needs privileges; use one above 1023"
            return f"cannot listen on {listen}: {exc.strerror}"
    return None


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        print(f"{args.file}: invalid config", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    names = ", ".join(f"{p.name} ({p.type})" for p in settings.enabled_providers()) or "none"
    print(f"{args.file}: ok; providers by priority: {names}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"model-broker: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(dump_settings(settings, reveal_secrets=args.reveal_secrets))
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from broker.auth import hash_key, new_key

    key = new_key()
    digest = hash_key(key)
    print(f"key:    {key}")
    print(f"sha256: {digest}")
    print()
    print("# Hand the key to the caller; it is shown only now. Only the hash goes in the config:")
    print("auth:\n  keys:")
    print(f"    - name: {args.name}\n      sha256: {digest}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """GetUsage: spend, budget left, requests and tokens of the caller's key (an admin key: every
    key, or those named with --key) for the current UTC day and month."""
    from broker.cli_render import dumps, plain
    from modelbroker.client import BrokerClient, BrokerError

    with BrokerClient(args.target, api_key=args.api_key, timeout=args.timeout, **_tls_kwargs(args)) as client:
        try:
            resp = client.usage(*args.key)
        except BrokerError as err:
            return _fail(err, args)
    if args.json:
        print(dumps(plain(resp)))
        return 0

    def usd(micro: int) -> str:
        return f"{micro / 1e6:.6f}" if micro < 10_000 else f"{micro / 1e6:,.2f}"

    print(
        f"{'KEY':24} {'WINDOW':7} {'SPEND $':>12} {'BUDGET $':>10} {'LEFT $':>10} {'REQUESTS':>9} "
        f"{'TOKENS IN':>11} {'TOKENS OUT':>11} {'UNPRICED':>8}  RESETS"
    )
    for k in resp.keys:
        for label, w in (("day", k.day), ("month", k.month)):
            budget = usd(w.budget_micro_usd) if w.HasField("budget_micro_usd") else "-"
            left = usd(w.budget_left_micro_usd) if w.HasField("budget_left_micro_usd") else "-"
            resets = w.reset_time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")
            print(
                f"{k.name:24} {label:7} {usd(w.spend_micro_usd):>12} {budget:>10} {left:>10} {w.requests:>9} "
                f"{w.input_tokens:>11} {w.output_tokens:>11} {w.unpriced_requests:>8}  {resets}"
            )
    where = (
        "shared by every replica (Redis)"
        if resp.shared
        else "counted by this daemon process only, since it started"
    )
    print(f"usage {where}", file=sys.stderr)
    return 0


def cmd_keys_hash(args: argparse.Namespace) -> int:
    from broker.auth import hash_key

    key = sys.stdin.read() if args.key in (None, "-") else args.key
    if not key.strip():
        print("model-broker: keys hash: no key given (pass it as an argument or on stdin)", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {value!r}")
    return int(value)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`model-broker serve: error: ...`), not the usage
    block then the error: the line that matters is the one a user sees."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    from importlib import metadata

    try:
        ours = metadata.version("model-broker")
    except metadata.PackageNotFoundError:  # run from a checkout without installing
        from broker import __version__ as ours
    try:
        grpcio = metadata.version("grpcio")
    except metadata.PackageNotFoundError:
        grpcio = "?"
    py = ".".join(map(str, sys.version_info[:3]))
    return f"model-broker {ours} (API modelbroker.v1; grpcio {grpcio}; Python {py})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="model-broker", description=__doc__)
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--config", help="YAML config file (default: $MODEL_BROKER_CONFIG, else the environment)")
    p.add_argument("--preset", choices=PRESETS, help="use a built-in config instead of a file")
    p.add_argument(
        "--listen",
        type=listen_arg,
        default=None,
        help=f"HOST:PORT to serve on; port 0 picks a free one (default: server.listen, {DEFAULT_LISTEN})",
    )
    p.add_argument("--log-level", default=os.environ.get("MODEL_BROKER_LOG_LEVEL", "info"))
    p.add_argument(
        "--metrics-listen",
        type=listen_arg,
        default=os.environ.get("MODEL_BROKER_METRICS_LISTEN") or None,
        help="HOST:PORT for Prometheus /metrics (default: metrics.listen; none when unset)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=os.environ.get("MODEL_BROKER_WORKERS", "1"),  # a string default goes through `type`
        help="processes sharing the port via SO_REUSEPORT, under one supervising parent (default 1)",
    )
    # Set by the `--workers` parent on each worker it starts; not for operators.
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    target = os.environ.get("MODEL_BROKER_TARGET") or DEFAULT_LISTEN

    def client_args(p: argparse.ArgumentParser) -> None:
        add_target_arg(p, target)
        p.add_argument(
            "--api-key", default=os.environ.get("MODEL_BROKER_API_KEY"), help="caller key, if auth is on"
        )
        p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
        add_tls_args(p)

    p = sub.add_parser("complete", help="stream a completion to stdout (usage and cost to stderr)")
    client_args(p)
    add_request_args(p)
    p.add_argument("--no-stream", action="store_true", help="use the unary Complete RPC")
    p.add_argument(
        "--tool",
        action="append",
        default=[],
        help='a tool as JSON {"name","description","parameters"} or @file.json (repeatable)',
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print each stream event as a JSON line ({"event": "start"|"text_delta"|...|"end"|"error", ...}); '
        "with --no-stream, the answer as one JSON object",
    )
    p.add_argument(
        "--messages",
        metavar="FILE",
        type=messages_arg,
        help="the conversation so far: a JSON array of messages (as `--no-stream --json` prints "
        "`message`, reasoning parts included); the prompt, if given, is appended as a user turn",
    )
    p.add_argument("prompt", nargs="?", help="the user message ('-' reads stdin)")
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser(
        "chat",
        help="a conversation: each stdin line is a turn, answers stream, the history is kept",
        description="Each line on stdin is one user turn; the answer streams to stdout and the "
        "conversation so far goes with every request. Interactive on a terminal (/reset, /exit); "
        "reads a pipe line by line (`printf 'Hi\\nAnd again?\\n' | model-broker chat --model M`).",
    )
    client_args(p)
    add_request_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "embed", help="embed texts: dimensions and the first values of each vector (or --json)"
    )
    client_args(p)
    p.add_argument("--model", required=True)
    p.add_argument("--dimensions", type=int, help="vector size to ask for (models that can shorten)")
    p.add_argument("--fallback", action="append", default=[], help="fallback model (repeatable)")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    p.add_argument("text", nargs="+", help="texts to embed ('-' reads stdin)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("models", help="list models with context, prices and capabilities")
    client_args(p)
    p.add_argument("--provider", default="")
    p.add_argument("--json", action="store_true", help="print the models as a JSON array")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("providers", help="list providers with their health")
    client_args(p)
    p.add_argument("--json", action="store_true", help="print the providers as a JSON array")
    p.set_defaults(func=cmd_providers)

    p = sub.add_parser("health", help="check a grpc.health.v1 service; exit 0 only when SERVING")
    add_target_arg(p, target)
    p.add_argument("--service", default="", help='"" (liveness), modelbroker.v1.ModelBroker, provider/<name>')
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--json", action="store_true", help='print {"service": ..., "status": ...}')
    add_tls_args(p)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser(
        "usage", help="spend, budget left, requests and tokens per key (today and this month, UTC)"
    )
    client_args(p)
    p.add_argument("--key", action="append", default=[], help="a key's name (admin keys only; repeatable)")
    p.add_argument("--json", action="store_true", help="print the GetUsage answer as JSON")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("keys", help="make caller API keys and the hashes the config holds")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    k = ksub.add_parser("create", help="print a new random key and its SHA-256 (with a config snippet)")
    k.add_argument("--name", default="my-team", help="the caller name for the config snippet")
    k.set_defaults(func=cmd_keys_create)
    k = ksub.add_parser("hash", help="print the SHA-256 of a key for auth.keys[].sha256")
    k.add_argument(
        "key", nargs="?", help="the key; omit it or give '-' to read stdin (keeps it out of shell history)"
    )
    k.set_defaults(func=cmd_keys_hash)

    p = sub.add_parser("config", help="check or show configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("check", help="validate a config file; list every problem with its path")
    c.add_argument("file", type=Path)
    c.set_defaults(func=cmd_config_check)
    c = csub.add_parser("show", help="print the effective config as YAML (keys masked)")
    c.add_argument("--config")
    c.add_argument("--preset", choices=PRESETS)
    c.add_argument("--reveal-secrets", action="store_true")
    c.set_defaults(func=cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        # gRPC's C core logs a failed TLS handshake at INFO on stderr; a client command says
        # what went wrong in its own one line instead. Read when grpc loads, so before that.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C in a client command: no traceback
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `model-broker models | head`: the reader left
        sys.stderr.close()
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
