"""The load generator: one workload against one target, in its own process.

    python -m bench.loadgen --proto http|grpc --target 127.0.0.1:PORT --kind unary|stream|hold \
        --model bench-20 --concurrency 32 --warmup 1 --duration 5 --max-requests 100000 \
        [--header 'x-portkey-provider: openai' ...]

It prints `MARK start` when the measured window opens and `MARK end` when it closes (the
runner samples the servers' CPU time and memory at those marks), then one `RESULT {json}`
line. Every answer is checked: the text a caller receives must be exactly the text the
upstream sent (bench.upstream.expected_text), and a stream's reasoning exactly the
reasoning it sent (bench.upstream.expected_reasoning), or the request counts as an error.
Time to first token is to the first reasoning or text delta, whichever comes first.

The HTTP client is a bare asyncio.Protocol that parses the chunked body and every
SSE event (JSON included), so that it is cheap next to the servers it measures; the gRPC
client is grpc.aio with the generated stubs, as a Python caller would use it. Both report
the generator's own CPU time, which is how a run shows the generator was not the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from bench.upstream import expected_reasoning, expected_text, parse_model


@dataclass(slots=True)
class Outcome:
    """What one request delivered."""

    text: str = ""
    reasoning: str = ""
    ttft: float | None = None  # seconds from sending to the first content (reasoning or text)
    messages: int = 0  # content-bearing messages received (SSE events or gRPC messages)


class RequestFailed(Exception):
    pass


# --- HTTP/1.1 client ---------------------------------------------------------------------------


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection; `request()` sends one request and parses the whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[Outcome] | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.state = "head"
        self.status = 0
        self.length = -1
        self.chunked = False
        self.event_stream = False
        self.sse = bytearray()
        self.body = bytearray()
        self.out = Outcome()
        self.parts: list[str] = []
        self.rparts: list[str] = []
        self.t0 = 0.0
        self.done_seen = False
        self.on_first: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # connection_made is typed with BaseTransport; a TCP connection gets a Transport.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(RequestFailed(f"connection closed: {exc or 'by peer'}"))

    def request(self, raw: bytes, on_first: Callable[[], None] | None = None) -> asyncio.Future[Outcome]:
        assert self.transport is not None
        self._reset()
        self.on_first = on_first
        self.waiter = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter()
        self.transport.write(raw)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._parse()
        except Exception as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(RequestFailed(f"bad response: {exc!r}"))
            if self.transport is not None:
                self.transport.close()

    def _parse(self) -> None:
        while True:
            if self.state == "head":
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
                del self.buf[: end + 4]
                self.status = int(lines[0].split(" ", 2)[1])
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        self.length = int(value)
                    elif name == "transfer-encoding" and "chunked" in value.lower():
                        self.chunked = True
                    elif name == "content-type" and "text/event-stream" in value:
                        self.event_stream = True
                if not self.chunked and self.length < 0:
                    raise RequestFailed("response with neither content-length nor chunked body")
                self.state = "body"
            if self.chunked:
                nl = self.buf.find(b"\r\n")
                if nl < 0:
                    return
                size = int(bytes(self.buf[:nl]).split(b";")[0], 16)
                if len(self.buf) < nl + 2 + size + 2:
                    return
                data = bytes(self.buf[nl + 2 : nl + 2 + size])
                del self.buf[: nl + 2 + size + 2]
                if size == 0:
                    self._finish()
                    return
                self._body(data)
            else:
                if len(self.buf) < self.length:
                    return
                self._body(bytes(self.buf[: self.length]))
                del self.buf[: self.length]
                self._finish()
                return

    def _body(self, data: bytes) -> None:
        if self.status != 200 or not self.event_stream:
            self.body += data
            return
        self.sse += data.replace(b"\r\n", b"\n")
        while True:
            end = self.sse.find(b"\n\n")
            if end < 0:
                return
            event = bytes(self.sse[:end])
            del self.sse[: end + 2]
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done_seen = True
                    continue
                doc = orjson.loads(payload)
                choices = doc.get("choices") or ()
                delta = choices[0].get("delta") or {} if choices else {}
                text = delta.get("content")
                # DeepSeek's name, which LiteLLM also uses; vLLM's newer one.
                thought = delta.get("reasoning_content") or delta.get("reasoning")
                if text or thought:
                    if self.out.ttft is None:
                        self.out.ttft = time.perf_counter() - self.t0
                        if self.on_first is not None:
                            self.on_first()
                    self.out.messages += 1
                    if thought:
                        self.rparts.append(thought)
                    if text:
                        self.parts.append(text)

    def _finish(self) -> None:
        waiter, self.waiter = self.waiter, None
        self.state = "head"
        if waiter is None or waiter.done():
            return
        if self.status != 200:
            waiter.set_exception(RequestFailed(f"HTTP {self.status}: {bytes(self.body[:200])!r}"))
            return
        if self.body:  # a whole chat.completion (or embeddings list) document
            doc = orjson.loads(bytes(self.body))
            if doc.get("object") == "list":
                self.out.text = f"{len(doc['data'])}x{len(doc['data'][0]['embedding'])}"
            else:
                self.out.text = doc["choices"][0]["message"]["content"] or ""
            self.out.ttft = time.perf_counter() - self.t0
            self.out.messages = 1
        else:
            if not self.done_seen:
                waiter.set_exception(RequestFailed("stream ended without [DONE]"))
                return
            self.out.text = "".join(self.parts)
            self.out.reasoning = "".join(self.rparts)
        waiter.set_result(self.out)


class HttpTarget:
    """Chat completions over HTTP/1.1 keep-alive; one connection per concurrent caller."""

    def __init__(
        self, host: str, port: int, prefix: str, api_key: str, headers: list[str] | None = None
    ) -> None:
        self.host, self.port, self.prefix, self.api_key = host, port, prefix, api_key
        # Extra request header lines (Portkey's routing headers), sent on every request.
        self.extra = "".join(f"{h.strip()}\r\n" for h in headers or ())
        self.idle: list[HttpConnection] = []
        self.embed_inputs = 0  # > 0: POST /embeddings with this many inputs instead of a chat

    async def _conn(self) -> HttpConnection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(HttpConnection, self.host, self.port)
        return proto

    def _raw(self, model: str, stream: bool) -> bytes:
        if self.embed_inputs:
            doc = {
                "model": model,
                "input": [f"text {i}" for i in range(self.embed_inputs)],
                "encoding_format": "float",
            }
            data = json.dumps(doc).encode()
            return (
                f"POST {self.prefix}/embeddings HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
                f"authorization: Bearer {self.api_key}\r\ncontent-type: application/json\r\n"
                f"{self.extra}content-length: {len(data)}\r\n\r\n"
            ).encode() + data
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say hi"}]}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        data = json.dumps(body).encode()
        return (
            f"POST {self.prefix}/chat/completions HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"authorization: Bearer {self.api_key}\r\ncontent-type: application/json\r\n"
            f"{self.extra}content-length: {len(data)}\r\n\r\n"
        ).encode() + data

    async def call(self, model: str, stream: bool, on_first: Callable[[], None] | None = None) -> Outcome:
        conn = await self._conn()
        raw = self._raw(model, stream)
        try:
            out = await conn.request(raw, on_first)
        except BaseException:
            if conn.transport is not None:
                conn.transport.close()
            raise
        self.idle.append(conn)
        return out

    async def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


# --- gRPC client ---------------------------------------------------------------------------------


class GrpcTarget:
    """The broker's API through grpc.aio stubs, spread over a few channels (HTTP/2 connections)."""

    def __init__(self, target: str, channels: int) -> None:
        import grpc

        from modelbroker.v1 import broker_pb2 as pb
        from modelbroker.v1 import broker_pb2_grpc as pb_grpc

        self.pb = pb
        # A local subchannel pool gives every channel its own connection.
        opts = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(target, options=opts) for _ in range(max(channels, 1))]
        self.stubs = [pb_grpc.ModelBrokerStub(ch) for ch in self.channels]
        self.n = 0
        msg = pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="Say hi")])
        self.messages = [msg]
        self.embed_inputs = 0  # > 0: the Embed RPC with this many inputs instead of a completion

    def _stub(self) -> Any:
        self.n += 1
        return self.stubs[self.n % len(self.stubs)]

    async def call(self, model: str, stream: bool, on_first: Callable[[], None] | None = None) -> Outcome:
        pb = self.pb
        t0 = time.perf_counter()
        out = Outcome()
        if self.embed_inputs:
            inputs = [f"text {i}" for i in range(self.embed_inputs)]
            er = await self._stub().Embed(pb.EmbedRequest(model=model, inputs=inputs), timeout=60)
            out.ttft = time.perf_counter() - t0
            out.messages = 1
            out.text = f"{len(er.embeddings)}x{len(er.embeddings[0].values) if er.embeddings else 0}"
            return out
        if not stream:
            resp = await self._stub().Complete(
                pb.CompleteRequest(model=model, messages=self.messages), timeout=60
            )
            out.ttft = time.perf_counter() - t0
            out.messages = 1
            out.text = "".join(p.text for p in resp.message.content)
            return out
        parts: list[str] = []
        rparts: list[str] = []
        ended = False
        call = self._stub().StreamComplete(
            pb.StreamCompleteRequest(model=model, messages=self.messages), timeout=120
        )
        async for m in call:
            kind = m.WhichOneof("event")
            if kind == "text_delta" or kind == "reasoning_delta":
                if out.ttft is None:
                    out.ttft = time.perf_counter() - t0
                    if on_first is not None:
                        on_first()
                out.messages += 1
                if kind == "text_delta":
                    parts.append(m.text_delta.text)
                else:
                    rparts.append(m.reasoning_delta.text)
            elif kind == "end":
                ended = True
        if not ended:
            raise RequestFailed("stream ended without its end message")
        out.text = "".join(parts)
        out.reasoning = "".join(rparts)
        return out

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()


# --- workloads -----------------------------------------------------------------------------------


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    messages: int = 0
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    issued: int = 0
    measuring: bool = False
    stop: bool = False
    capped: asyncio.Event = field(default_factory=asyncio.Event)
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # min_ok reached

    def fail(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{type(exc).__name__}: {str(exc)[:300]}")


@dataclass(frozen=True)
class Want:
    """What every answer must hold: the upstream's text and, for streams, its reasoning."""

    text: str
    reasoning: str | None = None  # None: not checked (unary answers, embeddings)

    def check(self, out: Outcome) -> None:
        if out.text != self.text:
            raise RequestFailed(f"content mismatch: got {len(out.text)} chars, want {len(self.text)}")
        if self.reasoning is not None and out.reasoning != self.reasoning:
            raise RequestFailed(
                f"reasoning mismatch: got {len(out.reasoning)} chars, want {len(self.reasoning)}"
            )


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _mark(what: str) -> None:
    print(f"MARK {what}", flush=True)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


Call = Callable[..., Awaitable[Outcome]]


async def closed_loop(
    call: Call,
    model: str,
    stream: bool,
    want: Want,
    concurrency: int,
    warmup: float,
    duration: float,
    cap: int,
    min_ok: int = 0,
    extra: float = 0.0,
) -> dict[str, Any]:
    """`concurrency` callers back to back: warm up, then measure for `duration` (or `cap` requests).

    With `min_ok`, the window stays open past `duration` (by `extra` seconds at most) until that
    many requests have completed: a quick run's short window still proves a slow way answers.
    """
    run = Run()

    async def caller() -> None:
        while not run.stop and run.issued < cap:
            run.issued += 1
            if run.issued >= cap:
                run.capped.set()
            t0 = time.perf_counter()
            try:
                out = await call(model, stream)
                want.check(out)
            except Exception as exc:
                if run.measuring:
                    run.fail(exc)
                    if run.ok + run.errors >= min_ok:
                        run.answered.set()
                continue
            if run.measuring:
                run.ok += 1
                run.latencies.append(time.perf_counter() - t0)
                if out.ttft is not None:
                    run.ttfts.append(out.ttft)
                run.messages += out.messages
                if run.ok + run.errors >= min_ok:
                    run.answered.set()

    tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    run.issued = 0
    cpu0, t0 = _cpu(), time.perf_counter()
    run.measuring = True
    _mark("start")
    # Ends at `duration`, or sooner when a caller reaches the request cap.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.capped.wait(), duration)
    if min_ok and not run.capped.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.answered.wait(), extra)
    run.measuring = False
    elapsed = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    _mark("end")
    run.stop = True
    await asyncio.wait(tasks, timeout=30)
    for t in tasks:
        t.cancel()
    return {
        "ok": run.ok,
        "errors": run.errors,
        "error_samples": run.error_samples,
        "elapsed_s": elapsed,
        "rps": run.ok / elapsed,
        "p50_ms": _ms(_pct(run.latencies, 0.50)),
        "p99_ms": _ms(_pct(run.latencies, 0.99)),
        "ttft_p50_ms": _ms(_pct(run.ttfts, 0.50)),
        "ttft_p99_ms": _ms(_pct(run.ttfts, 0.99)),
        "messages": run.messages,
        "loadgen_cpu_s": cpu,
        "loadgen_cpu_pct": 100.0 * cpu / elapsed,
    }


async def held_streams(call: Call, model: str, want: Want, count: int, deadline: float) -> dict[str, Any]:
    """Open `count` long streams at once; report how many were open together and every error."""
    run = Run()
    state = {"open": 0, "max_open": 0}
    t_all: list[float] = []
    t0 = time.perf_counter()

    def first() -> None:
        state["open"] += 1
        if state["open"] > state["max_open"]:
            state["max_open"] = state["open"]
            if state["max_open"] == count:
                t_all.append(time.perf_counter() - t0)

    async def one() -> None:
        opened = False

        def on_first() -> None:
            nonlocal opened
            opened = True
            first()

        try:
            out = await call(model, True, on_first)
            want.check(out)
            run.ok += 1
        except Exception as exc:
            run.fail(exc)
        finally:
            if opened:
                state["open"] -= 1

    cpu0 = _cpu()
    _mark("start")
    tasks = [asyncio.create_task(one()) for _ in range(count)]
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for t in pending:
        t.cancel()
    elapsed = time.perf_counter() - t0
    _mark("end")
    return {
        "ok": run.ok,
        "errors": run.errors + len(pending),
        "error_samples": run.error_samples
        + ([f"{len(pending)} still open at the deadline"] if pending else []),
        "max_open": state["max_open"],
        "all_open_after_s": t_all[0] if t_all else None,
        "elapsed_s": elapsed,
        "loadgen_cpu_s": _cpu() - cpu0,
        "loadgen_cpu_pct": 100.0 * (_cpu() - cpu0) / elapsed,
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 3)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.target.rpartition(":")
    target: HttpTarget | GrpcTarget
    if args.proto == "http":
        target = HttpTarget(host, int(port), args.prefix, args.api_key, args.header)
        # HTTP streams only carry the upstream's own content chunks; no extra connections needed.
    else:
        target = GrpcTarget(args.target, args.channels)
    shape = parse_model(args.model.rpartition("/")[2])
    if shape is None:
        raise SystemExit(f"not a bench model: {args.model}")
    if shape.chunks < 1 and args.kind != "unary":
        raise SystemExit("a stream needs at least one chunk")
    streams = args.kind in ("stream", "hold")
    want = Want(expected_text(shape.chunks), expected_reasoning(shape.reasoning) if streams else None)
    if args.kind == "embed":
        # bench-N: N inputs per call, one EMBED_DIMS vector each (bench/upstream.py).
        from bench.upstream import EMBED_DIMS

        target.embed_inputs = shape.chunks
        want = Want(f"{shape.chunks}x{EMBED_DIMS}")
    try:
        if args.kind == "hold":
            return await held_streams(target.call, args.model, want, args.concurrency, args.deadline)
        return await closed_loop(
            target.call,
            args.model,
            args.kind == "stream",
            want,
            args.concurrency,
            args.warmup,
            args.duration,
            args.max_requests,
            args.min_ok,
            args.min_ok_wait,
        )
    finally:
        await target.close()


def raise_fd_limit() -> int:
    """The soft open-file limit raised to the hard one (held streams need a socket each); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proto", choices=("http", "grpc"), required=True)
    p.add_argument("--target", required=True, help="HOST:PORT")
    p.add_argument("--prefix", default="/v1", help="HTTP path prefix before /chat/completions")
    p.add_argument("--api-key", default="sk-bench")
    p.add_argument("--kind", choices=("unary", "stream", "hold", "embed"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=200_000)
    p.add_argument("--deadline", type=float, default=60.0, help="hold: give up on streams after this")
    p.add_argument("--channels", type=int, default=1, help="gRPC: HTTP/2 connections to spread calls over")
    p.add_argument("--min-ok", type=int, default=0, help="keep the window open until this many answered...")
    p.add_argument("--min-ok-wait", type=float, default=10.0, help="...for at most this many more seconds")
    p.add_argument(
        "--header", action="append", default=[], help="HTTP: an extra 'name: value' request header"
    )
    args = p.parse_args()
    raise_fd_limit()
    result = asyncio.run(amain(args))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
