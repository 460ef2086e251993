"""`model-broker`: serve | complete | embed | models | providers | health | config check | config show | keys create | keys hash."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

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

# `health` exit codes follow grpc_health_probe so scripts can use either.
EXIT_SERVING, EXIT_USAGE, EXIT_CONNECT, EXIT_RPC, EXIT_NOT_SERVING = 0, 1, 2, 3, 4

# SIGTERM/SIGINT that `serve` received before its event loop took the signals over.
_early_signals: list[int] = []


def _catch_early_signals() -> None:
    """From `serve`'s first line: a SIGTERM while the config loads or the modules import is
    remembered (and then handled as a drain, exit 0) instead of killing the process."""

    def remember(sig: int, _frame: object) -> None:
        _early_signals.append(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, remember)
    # A `--workers` parent starts its workers with both blocked until this point.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or os.environ.get("MODEL_BROKER_CONFIG")
    if path:
        return load_settings(path)
    if getattr(args, "preset", None):
        return preset_settings(args.preset)
    return settings_from_env()


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
        print(
            "model-broker: warning: no providers configured (give --config FILE, or set OPENAI_API_KEY, "
            "OPENAI_BASE_URL, ANTHROPIC_API_KEY or OLLAMA_HOST); readiness stays NOT_SERVING",
            file=sys.stderr,
        )
    from broker.auth import open_listen_warning

    auth_warning = open_listen_warning(settings, args.listen or settings.server.listen)
    if auth_warning:
        print(f"model-broker: warning: {auth_warning}", file=sys.stderr)
    if args.metrics_listen:
        settings = settings.model_copy(update={"metrics": MetricsConfig(listen=args.metrics_listen)})
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
        asyncio.run(run())
    except ConfigError as exc:  # e.g. a TLS file that cannot be read
        print(f"model-broker: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"model-broker: {exc}", file=sys.stderr)
        return 1
    return 0


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


def cmd_keys_hash(args: argparse.Namespace) -> int:
    from broker.auth import hash_key

    key = sys.stdin.read() if args.key in (None, "-") else args.key
    if not key.strip():
        print("model-broker: keys hash: no key given (pass it as an argument or on stdin)", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def _tls_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """BrokerClient's `credentials` and `options` from --tls/--ca-cert/--client-cert/--client-key/
    --tls-server-name (plaintext when none is given); a bad file exits with its flag named."""
    from broker.tls import client_security

    try:
        creds, options = client_security(
            tls=args.tls,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            server_name=args.tls_server_name,
        )
    except ConfigError as exc:
        raise SystemExit("model-broker: " + "; ".join(exc.problems)) from None
    return {"credentials": creds, "options": options}


def _fail(err: Exception) -> int:
    from modelbroker.client import BrokerError

    if isinstance(err, BrokerError):
        reason = f" [{err.reason}]" if err.reason else ""
        print(f"error: {err.code.name}: {err.message}{reason}", file=sys.stderr)
        for fld, desc in err.field_violations:
            print(f"  {fld}: {desc}", file=sys.stderr)
        if err.retry_delay is not None:
            print(f"  retry after {err.retry_delay:g}s", file=sys.stderr)
        return 1
    raise err


def _parse_tool(spec: str) -> Any:
    """`--tool '{"name": ..., "description": ..., "parameters": {JSON Schema}}'` (or @file.json)."""
    import json

    from modelbroker.client import tool

    text = Path(spec[1:]).read_text() if spec.startswith("@") else spec
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise ValueError('expected an object with "name", "description" and "parameters"')
    params = doc.get("parameters") or {"type": "object", "properties": {}}
    return tool(doc["name"], str(doc.get("description", "")), params)


def cmd_complete(args: argparse.Namespace) -> int:
    from modelbroker.client import (
        BrokerClient,
        BrokerError,
        StreamEnded,
        StreamStarted,
        TextDelta,
        ToolCallDelta,
    )
    from modelbroker.client import system as system_msg
    from modelbroker.client import user as user_msg
    from modelbroker.v1 import broker_pb2 as pb

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = ([system_msg(args.system)] if args.system else []) + [user_msg(prompt)]
    params = pb.GenerationParams()
    if args.max_tokens is not None:
        params.max_tokens = args.max_tokens
    if args.temperature is not None:
        params.temperature = args.temperature
    try:
        tools = [_parse_tool(spec) for spec in args.tool]
    except ValueError as exc:
        print(f"model-broker: --tool: {exc}", file=sys.stderr)
        return 2
    kw = {"params": params, "timeout": args.timeout, "fallback_models": args.fallback, "tools": tools}
    with BrokerClient(
        args.target, api_key=args.api_key or os.environ.get("MODEL_BROKER_API_KEY"), **_tls_kwargs(args)
    ) as client:
        try:
            if args.no_stream:
                ans = client.complete(args.model, messages, **kw)
                sys.stdout.write(ans.text)
                for tc in ans.tool_calls:
                    sys.stdout.write(f"\n[tool call {tc.id}] {tc.name}({tc.arguments})")
                sys.stdout.write("\n")
                _summary(ans.provider, ans.model, ans.finish_reason, ans.usage, ans.cost)
                return 0
            in_call = False  # a tool call's "(" is open on stdout
            wrote = False  # anything on stdout yet: a tool call after text starts a new line
            for ev in client.stream(args.model, messages, **kw):
                if isinstance(ev, TextDelta):
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                    wrote = True
                elif isinstance(ev, ToolCallDelta):
                    if ev.name:
                        sys.stdout.write(f"{')' if in_call else ''}{chr(10) if wrote else ''}")
                        sys.stdout.write(f"[tool call {ev.id}] {ev.name}(")
                        in_call = wrote = True
                    sys.stdout.write(ev.arguments_delta)
                elif isinstance(ev, StreamStarted):
                    started = ev
                elif isinstance(ev, StreamEnded):
                    sys.stdout.write(")\n" if in_call else "\n")
                    _summary(started.provider, started.model, ev.finish_reason, ev.usage, ev.cost)
        except BrokerError as err:
            sys.stdout.flush()
            return _fail(err)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import json

    from modelbroker.client import BrokerClient, BrokerError

    texts = [sys.stdin.read() if t == "-" else t for t in args.text]
    kw: dict[str, Any] = {"timeout": args.timeout, "fallback_models": args.fallback}
    if args.dimensions is not None:
        kw["dimensions"] = args.dimensions
    with BrokerClient(
        args.target, api_key=args.api_key or os.environ.get("MODEL_BROKER_API_KEY"), **_tls_kwargs(args)
    ) as client:
        try:
            out = client.embed(args.model, texts, **kw)
        except BrokerError as err:
            return _fail(err)
    if args.json:
        doc = {
            "model": out.model,
            "provider": out.provider,
            "request_id": out.request_id,
            "embeddings": [{"index": i, "values": v} for i, v in enumerate(out.vectors)],
            "usage": {"input_tokens": out.usage.input_tokens, "estimated": out.usage.estimated},
            "cost": {"known": out.cost.known, "total_micro_usd": out.cost.total_micro_usd},
        }
        print(json.dumps(doc))
        return 0
    for i, (text, vec) in enumerate(zip(texts, out.vectors, strict=True)):
        head = ", ".join(f"{x:.4f}" for x in vec[:5])
        shown = text if len(text) <= 40 else text[:37] + "..."
        print(f"[{i}] {shown!r}: {len(vec)} dimensions [{head}{', ...' if len(vec) > 5 else ''}]")
    price = (
        f"${out.cost.total_micro_usd / 1e6:.6f} ({out.cost.total_micro_usd} micro-USD)"
        if out.cost.known
        else "unknown"
    )
    est = " (estimated)" if out.usage.estimated else ""
    print(
        f"[{out.provider}/{out.model}] tokens in={out.usage.input_tokens}{est} cost={price}", file=sys.stderr
    )
    return 0


def _summary(provider: str, model: str, finish: str, usage: object, cost: object) -> None:
    from modelbroker.client import Cost, Usage

    assert isinstance(usage, Usage) and isinstance(cost, Cost)
    price = (
        f"${cost.total_micro_usd / 1e6:.6f} ({cost.total_micro_usd} micro-USD)" if cost.known else "unknown"
    )
    print(
        f"[{provider}/{model}] finish={finish} tokens in={usage.input_tokens} out={usage.output_tokens} "
        f"cached={usage.cached_input_tokens}{' (estimated: the upstream reported no usage)' if usage.estimated else ''} "
        f"cost={price}",
        file=sys.stderr,
    )


def _price(micro: int) -> str:
    return f"{micro / 1e6:.4g}"


def cmd_models(args: argparse.Namespace) -> int:
    from modelbroker.client import BrokerClient, BrokerError
    from modelbroker.v1 import broker_pb2 as pb

    with BrokerClient(args.target, api_key=args.api_key, timeout=args.timeout, **_tls_kwargs(args)) as client:
        try:
            models = client.list_models(args.provider)
        except BrokerError as err:
            return _fail(err)
    cap_names = {
        pb.CAPABILITY_VISION: "vision",
        pb.CAPABILITY_TOOLS: "tools",
        pb.CAPABILITY_JSON_MODE: "json",
    }
    print(f"{'MODEL':48} {'CONTEXT':>8} {'MAX OUT':>8} {'IN $/M':>8} {'OUT $/M':>8}  CAPABILITIES")
    for m in models:
        caps = ",".join(cap_names[c] for c in m.capabilities) if m.capabilities_known else "unknown"
        if m.pricing.known:
            pin, pout = (
                _price(m.pricing.input_micro_usd_per_mtok),
                _price(m.pricing.output_micro_usd_per_mtok),
            )
        else:
            pin = pout = "?"
        ctx = str(m.context_window or "?")
        mo = str(m.max_output_tokens or "?")
        print(f"{m.id:48} {ctx:>8} {mo:>8} {pin:>8} {pout:>8}  {caps}")
    return 0


def cmd_providers(args: argparse.Namespace) -> int:
    from modelbroker.client import BrokerClient, BrokerError
    from modelbroker.v1 import broker_pb2 as pb

    with BrokerClient(args.target, api_key=args.api_key, timeout=args.timeout, **_tls_kwargs(args)) as client:
        try:
            providers = client.list_providers()
        except BrokerError as err:
            return _fail(err)
    for p in providers:
        health = pb.ProviderHealth.Name(p.health).removeprefix("PROVIDER_HEALTH_")
        breaker = pb.BreakerState.Name(p.breaker_state).removeprefix("BREAKER_STATE_").lower()
        last = ""
        if p.last_error:
            when = (
                p.last_error_time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")
                if p.last_error_time.seconds
                else ""
            )
            state = "resolved" if p.last_error_resolved else "current"
            last = f"  last error ({state}{', ' + when if when else ''}): {p.last_error}"
        print(
            f"{p.name:16} {p.type:10} prio={p.priority:<4} {health:12} breaker={breaker:10} "
            f"models={p.model_count:<4} {p.base_url}{last}"
        )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tls = _tls_kwargs(args)
    creds, options = tls["credentials"], tls["options"]
    channel_cm = (
        grpc.secure_channel(args.target, creds, options=options)
        if creds
        else grpc.insecure_channel(args.target)
    )
    with channel_cm as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            print(f"error: cannot connect to {args.target} within {args.timeout:g}s", file=sys.stderr)
            return EXIT_CONNECT
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            print(
                f"error: health check of {args.service!r} failed: {err.code().name}: {err.details()}",
                file=sys.stderr,
            )
            return EXIT_RPC
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.service or '(server)'}: {name}")
    return EXIT_SERVING if resp.status == health_pb2.HealthCheckResponse.SERVING else EXIT_NOT_SERVING


def _listen_arg(value: str) -> str:
    from broker.config import parse_listen

    try:
        parse_listen(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {value!r}")
    return int(value)


def _tls_args(p: argparse.ArgumentParser) -> None:
    """Client-side TLS flags; any file flag or a server name implies --tls."""
    env = os.environ.get
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --ca-cert)")
    p.add_argument(
        "--ca-cert", type=Path, default=env("MODEL_BROKER_CA_CERT"), help="PEM CA that signed the server"
    )
    p.add_argument(
        "--client-cert", type=Path, default=env("MODEL_BROKER_CLIENT_CERT"), help="PEM certificate for mTLS"
    )
    p.add_argument("--client-key", type=Path, default=env("MODEL_BROKER_CLIENT_KEY"), help="its PEM key")
    p.add_argument(
        "--tls-server-name", help="verify the server certificate for this name, not the target's host"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model-broker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--config", help="YAML config file (default: $MODEL_BROKER_CONFIG, else the environment)")
    p.add_argument("--preset", choices=PRESETS, help="use a built-in config instead of a file")
    p.add_argument("--listen", default=None, help=f"HOST:PORT (default: server.listen, {DEFAULT_LISTEN})")
    p.add_argument("--log-level", default=os.environ.get("MODEL_BROKER_LOG_LEVEL", "info"))
    p.add_argument(
        "--metrics-listen",
        type=_listen_arg,
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

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", default=os.environ.get("MODEL_BROKER_TARGET", DEFAULT_LISTEN))
        p.add_argument(
            "--api-key", default=os.environ.get("MODEL_BROKER_API_KEY"), help="caller key, if auth is on"
        )
        p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
        _tls_args(p)

    p = sub.add_parser("complete", help="stream a completion to stdout (usage and cost to stderr)")
    client_args(p)
    p.add_argument("--model", required=True)
    p.add_argument("--system")
    p.add_argument("--no-stream", action="store_true", help="use the unary Complete RPC")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--fallback", action="append", default=[], help="fallback model (repeatable)")
    p.add_argument(
        "--tool",
        action="append",
        default=[],
        help='a tool as JSON {"name","description","parameters"} or @file.json (repeatable)',
    )
    p.add_argument("prompt", help="the user message ('-' reads stdin)")
    p.set_defaults(func=cmd_complete)

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
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("providers", help="list providers with their health")
    client_args(p)
    p.set_defaults(func=cmd_providers)

    p = sub.add_parser("health", help="check a grpc.health.v1 service; exit 0 only when SERVING")
    p.add_argument("--target", default=os.environ.get("MODEL_BROKER_TARGET", DEFAULT_LISTEN))
    p.add_argument("--service", default="", help='"" (liveness), modelbroker.v1.ModelBroker, provider/<name>')
    p.add_argument("--timeout", type=float, default=3.0)
    _tls_args(p)
    p.set_defaults(func=cmd_health)

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
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
