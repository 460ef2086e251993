"""The CLI's client subcommands: complete, chat, embed, models, providers, health.

Each talks to a running daemon over gRPC through the thin Python client's channel and stubs.
Completions read the raw StreamCompleteResponse messages, so `--json` prints every event the
proto has (reasoning included), not only those the client's dataclasses model.

Adding a generation flag: `add_request_args` (shared by `complete` and `chat`) and
`completion_request`, which is the one place flags become request fields.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from broker import cli_features
from broker.cli_connect import diagnose, fail, is_unreached, tls_kwargs, uses_tls
from broker.cli_render import JsonLinesPrinter, StreamPrinter, dumps, error_doc, plain, print_answer
from modelbroker.v1 import broker_pb2 as pb

# `health` exit codes follow grpc_health_probe so scripts can use either.
EXIT_SERVING, EXIT_USAGE, EXIT_CONNECT, EXIT_RPC, EXIT_NOT_SERVING = 0, 1, 2, 3, 4


def add_request_args(p: argparse.ArgumentParser) -> None:
    """What a completion asks for, shared by `complete` and `chat`."""
    p.add_argument("--model", required=True, help="provider/model, a bare model id, or an alias")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--fallback", action="append", default=[], help="fallback model (repeatable)")
    cli_features.add_args(p)


def parse_tool(spec: str) -> pb.Tool:
    """`--tool '{"name": ..., "description": ..., "parameters": {JSON Schema}}'` (or @file.json)."""
    import json

    from modelbroker.client import tool

    text = Path(spec[1:]).read_text() if spec.startswith("@") else spec
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--tool: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise ValueError('--tool: expected an object with "name", "description" and "parameters"')
    params = doc.get("parameters") or {"type": "object", "properties": {}}
    return tool(doc["name"], str(doc.get("description", "")), params)


def completion_request(
    args: argparse.Namespace, messages: Sequence[pb.Message], *, stream: bool = True
) -> pb.StreamCompleteRequest | pb.CompleteRequest:
    """The request the flags describe; a ValueError names the flag that is wrong."""
    from modelbroker.client import build_request

    params = pb.GenerationParams()
    if args.max_tokens is not None:
        params.max_tokens = args.max_tokens
    if args.temperature is not None:
        params.temperature = args.temperature
    tools = [parse_tool(spec) for spec in getattr(args, "tool", [])]
    req = build_request(
        args.model, messages, params=params, fallback_models=args.fallback, tools=tools, stream=stream
    )
    cli_features.apply(args, req)
    return req


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {args.api_key}")] if args.api_key else []


def _client(args: argparse.Namespace) -> Any:
    from modelbroker import client

    return client.BrokerClient(args.target, api_key=args.api_key, timeout=args.timeout, **tls_kwargs(args))


def stream_messages(client: Any, req: Any, args: argparse.Namespace) -> Iterator[pb.StreamCompleteResponse]:
    """StreamComplete's messages; a failure raises the client's BrokerError. Leaving early
    cancels the call (and so the upstream generation)."""
    import grpc

    from modelbroker.client import error_from_rpc

    call = client.stub.StreamComplete(req, timeout=args.timeout, metadata=_metadata(args))
    try:
        yield from call
    except grpc.RpcError as err:
        raise error_from_rpc(err) from None
    finally:
        call.cancel()


def cmd_complete(args: argparse.Namespace) -> int:
    import grpc

    from modelbroker.client import BrokerError, error_from_rpc, system, user

    history = list(getattr(args, "messages", None) or [])
    if args.prompt is None and not history:
        print(
            "model-broker complete: error: give a prompt (or '-' for stdin), or --messages FILE",
            file=sys.stderr,
        )
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = ([system(args.system)] if args.system else []) + history
    if prompt is not None:
        messages.append(user(prompt))
    try:
        req = completion_request(args, messages, stream=not args.no_stream)
    except ValueError as exc:
        print(f"model-broker: {exc}", file=sys.stderr)
        return 2
    with _client(args) as client:
        if args.no_stream:
            try:
                resp = client.stub.Complete(req, timeout=args.timeout, metadata=_metadata(args))
            except grpc.RpcError as rpc_err:
                err = error_from_rpc(rpc_err)
                if args.json:
                    print(dumps(error_doc(err)))
                return fail(err, args)
            if args.json:
                print(dumps(plain(resp)))
            else:
                print_answer(resp, hide_reasoning=args.hide_reasoning)
            return 0
        printer = JsonLinesPrinter() if args.json else StreamPrinter(hide_reasoning=args.hide_reasoning)
        try:
            for msg in stream_messages(client, req, args):
                printer.event(msg)
        except BrokerError as err:
            if isinstance(printer, JsonLinesPrinter):
                printer.failed(err)
            else:
                printer.interrupted()
            return fail(err, args)
    return 0


CHAT_HELP = "/reset forgets the conversation, /exit (or Ctrl-D) ends it"


def cmd_chat(args: argparse.Namespace) -> int:
    """A conversation: each stdin line is a user turn, the answer streams to stdout, and the
    history (system prompt, turns, answers) goes with every request. A failed turn is dropped
    from the history and the session goes on; exit 1 if any turn failed."""
    from modelbroker.client import BrokerError, assistant, system, user

    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"chat with {args.model} at {args.target}; {CHAT_HELP}", file=sys.stderr)
    start = [system(args.system)] if args.system else []
    history = list(start)
    failed = 0
    with _client(args) as client:
        while True:
            try:
                line = input("> ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not interactive and not line:
                break  # end of the piped input
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.strip() in ("/exit", "/quit"):
                break
            if text.strip() == "/reset":
                history = list(start)
                print("(conversation reset)", file=sys.stderr)
                continue
            turn = [*history, user(text)]
            printer = StreamPrinter(hide_reasoning=args.hide_reasoning)
            try:
                for msg in stream_messages(client, completion_request(args, turn), args):
                    printer.event(msg)
            except BrokerError as err:
                printer.interrupted()
                fail(err, args)
                if is_unreached(err):
                    return 1  # the daemon is not there: every next turn would fail the same way
                failed += 1
                continue
            except KeyboardInterrupt:
                if not interactive:
                    raise
                printer.interrupted()
                print("(answer cancelled; that turn is forgotten)", file=sys.stderr)
                continue
            history = [*turn, assistant(printer.text)]
    return 1 if failed else 0


def cmd_embed(args: argparse.Namespace) -> int:
    from modelbroker.client import BrokerError

    texts = [sys.stdin.read() if t == "-" else t for t in args.text]
    kw: dict[str, Any] = {"timeout": args.timeout, "fallback_models": args.fallback}
    if args.dimensions is not None:
        kw["dimensions"] = args.dimensions
    with _client(args) as client:
        try:
            out = client.embed(args.model, texts, **kw)
        except BrokerError as err:
            return fail(err, args)
    if args.json:
        doc = {
            "model": out.model,
            "provider": out.provider,
            "request_id": out.request_id,
            "embeddings": [{"index": i, "values": v} for i, v in enumerate(out.vectors)],
            "usage": {"input_tokens": out.usage.input_tokens, "estimated": out.usage.estimated},
            "cost": {"known": out.cost.known, "total_micro_usd": out.cost.total_micro_usd},
        }
        print(dumps(doc))
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


def _price(micro: int) -> str:
    return f"{micro / 1e6:.4g}"


def cmd_models(args: argparse.Namespace) -> int:
    from modelbroker.client import BrokerError

    with _client(args) as client:
        try:
            models = client.list_models(args.provider)
        except BrokerError as err:
            return fail(err, args)
    if args.json:
        print(dumps([plain(m) for m in models]))
        return 0
    cap_names = {
        pb.CAPABILITY_VISION: "vision",
        pb.CAPABILITY_TOOLS: "tools",
        pb.CAPABILITY_JSON_MODE: "json",
    }
    print(f"{'MODEL':48} {'CONTEXT':>8} {'MAX OUT':>8} {'IN $/M':>8} {'OUT $/M':>8}  CAPABILITIES")
    for m in models:
        caps = (
            ",".join(cap_names.get(c, str(c)) for c in m.capabilities) if m.capabilities_known else "unknown"
        )
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
    from modelbroker.client import BrokerError

    with _client(args) as client:
        try:
            providers = client.list_providers()
        except BrokerError as err:
            return fail(err, args)
    if args.json:
        print(dumps([plain(p) for p in providers]))
        return 0
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
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tls = tls_kwargs(args)
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
            why = diagnose(args.target, uses_tls(args))
            print(
                f"error: cannot connect to {args.target} within {args.timeout:g}s{': ' + why if why else ''}",
                file=sys.stderr,
            )
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
    if args.json:
        print(dumps({"service": args.service, "status": name}))
    else:
        print(f"{args.service or '(server)'}: {name}")
    return EXIT_SERVING if resp.status == health_pb2.HealthCheckResponse.SERVING else EXIT_NOT_SERVING
