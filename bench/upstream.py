"""A fast fake OpenAI-compatible upstream for the benchmark: real HTTP/1.1 on 127.0.0.1.

Not the test fake (tests/fakes/openai_upstream.py): that one is built for byte control
and faults; this one is built to never be the bottleneck. It is a bare asyncio.Protocol
that answers from precomputed bytes, in its own process so that it
shares no event loop with the daemon or the load generator.

The model name says what to send, so every way (direct, broker, LiteLLM) asks for the
same thing with nothing but a model id:

    bench-N          N content chunks, all written at once
    bench-hold-N-MS  N content chunks, MS milliseconds apart (held-open streams)
    bench-think-R-N  R reasoning chunks (`delta.reasoning_content`, as DeepSeek, llama.cpp
                     and vLLM send them), then N content chunks, all written at once

POST /v1/embeddings (any model) answers one EMBED_DIMS-float vector per input, as
api.openai.com's embeddings endpoint does (`object: list`, `data[].embedding`, usage): JSON
floats, or with `"encoding_format": "base64"` the base64 of the little-endian float32 values.
EMBED_DIMS is 256, or $BENCH_EMBED_DIMS (1536 is text-embedding-3-small's size).

Streams have the shape of api.openai.com's: a role chunk with empty content, the content
chunks, a finish chunk, the usage chunk with `"choices":[]`, then `data: [DONE]`, each SSE
event in its own HTTP chunk. A request with `"stream": false` gets the same text as one
chat.completion document.

    python -m bench.upstream [--port 0]     prints "PORT <n>" when it listens
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import signal
import struct
import sys
from typing import Any, NamedTuple, cast

try:
    import orjson

    def _loads(data: bytes) -> Any:
        return orjson.loads(data)
except ImportError:  # pragma: no cover - the bench venv has orjson

    def _loads(data: bytes) -> Any:
        return json.loads(data)


_MODEL = re.compile(r"^bench-(?:hold-(\d+)-(\d+)|think-(\d+)-(\d+)|(\d+))$")
_CREATED = 1730000000
MAX_CHUNKS = 10_000
MAX_BODY = 1 << 20


def chunk_texts(n: int) -> list[str]:
    """The content of chunk i: a short word, like one token (what callers check they got)."""
    return [f" w{i}" for i in range(n)]


def expected_text(n: int) -> str:
    return "".join(chunk_texts(n))


def reasoning_texts(n: int) -> list[str]:
    """The reasoning of chunk i (bench-think-R-N), distinct from the answer's words."""
    return [f" r{i}" for i in range(n)]


def expected_reasoning(n: int) -> str:
    return "".join(reasoning_texts(n))


class Shape(NamedTuple):
    """What a bench model id asks for."""

    chunks: int  # content chunks
    gap: float  # seconds between chunks (held streams), 0: all at once
    reasoning: int = 0  # reasoning chunks before the content


def parse_model(model: str) -> Shape | None:
    """The shape of a bench model id, or None."""
    m = _MODEL.match(model)
    if not m:
        return None
    if m.group(5) is not None:
        return Shape(min(int(m.group(5)), MAX_CHUNKS), 0.0)
    if m.group(3) is not None:
        return Shape(min(int(m.group(4)), MAX_CHUNKS), 0.0, min(int(m.group(3)), MAX_CHUNKS))
    return Shape(min(int(m.group(1)), MAX_CHUNKS), int(m.group(2)) / 1000.0)


def _chunk(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
        "obfuscation": "Zx3",
    }


def _event(doc: Any) -> bytes:
    """One SSE event framed as one HTTP chunk."""
    data = b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


_DONE = b"data: [DONE]\n\n"
_DONE_CHUNK = b"%x\r\n%s\r\n" % (len(_DONE), _DONE) + b"0\r\n\r\n"
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\ncache-control: no-cache\r\nconnection: keep-alive\r\n\r\n"
)


EMBED_DIMS = int(os.environ.get("BENCH_EMBED_DIMS") or 256)


def _usage(n: int, reasoning: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": 12,
        "completion_tokens": n + reasoning,
        "total_tokens": 12 + n + reasoning,
    }
    if reasoning:
        # As api.openai.com counts them: inside completion_tokens.
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


class Replies:
    """Precomputed response bytes per model id (built on first use, then reused)."""

    def __init__(self) -> None:
        self._streams: dict[str, tuple[bytes, list[bytes], bytes]] = {}
        self._unary: dict[str, bytes] = {}
        self._embeddings: dict[tuple[str, int, bool], bytes] = {}

    def embeddings(self, model: str, n: int, as_base64: bool = False) -> bytes:
        raw = self._embeddings.get((model, n, as_base64))
        if raw is None:
            vector = [round((i % 17) / 17 - 0.5, 4) for i in range(EMBED_DIMS)]
            packed = base64.b64encode(struct.pack(f"<{EMBED_DIMS}f", *vector)).decode()
            embedding = packed if as_base64 else vector
            doc = {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": embedding} for i in range(n)],
                "model": model,
                "usage": {"prompt_tokens": 4 * n, "total_tokens": 4 * n},
            }
            raw = self._embeddings[(model, n, as_base64)] = _whole(
                200, json.dumps(doc, separators=(",", ":")).encode()
            )
        return raw

    def stream_parts(self, model: str, shape: Shape) -> tuple[bytes, list[bytes], bytes]:
        """(head + role chunk, one framed event per reasoning then content chunk, finish + usage + [DONE])."""
        parts = self._streams.get(model)
        if parts is None:
            n = shape.chunks
            head = _STREAM_HEAD + _event(_chunk(model, {"role": "assistant", "content": ""}, None))
            body = [
                _event(_chunk(model, {"reasoning_content": t}, None))
                for t in reasoning_texts(shape.reasoning)
            ]
            body += [_event(_chunk(model, {"content": t}, None)) for t in chunk_texts(n)]
            usage = {**_chunk(model, {}, None), "choices": [], "usage": _usage(n, shape.reasoning)}
            tail = _event(_chunk(model, {}, "stop")) + _event(usage) + _DONE_CHUNK
            parts = self._streams[model] = (head, body, tail)
        return parts

    def unary(self, model: str, shape: Shape) -> bytes:
        raw = self._unary.get(model)
        if raw is None:
            n = shape.chunks
            message: dict[str, Any] = {"role": "assistant", "content": expected_text(n), "refusal": None}
            if shape.reasoning:
                message["reasoning_content"] = expected_reasoning(shape.reasoning)
            doc = {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": _CREATED,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(n, shape.reasoning),
                "service_tier": "default",
                "system_fingerprint": "fp_bench",
            }
            raw = self._unary[model] = _whole(200, json.dumps(doc, separators=(",", ":")).encode())
        return raw


def _whole(status: int, body: bytes, ctype: bytes = b"application/json") -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: keep-alive\r\n\r\n%s" % (
        status,
        reason,
        ctype,
        len(body),
        body,
    )


def _error(status: int, message: str) -> bytes:
    doc = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return _whole(status, json.dumps(doc).encode())


_MODELS = _whole(
    200,
    json.dumps(
        {
            "object": "list",
            "data": [
                {"id": f"bench-{n}", "object": "model", "created": _CREATED, "owned_by": "bench"}
                for n in (1, 20, 200)
            ],
        }
    ).encode(),
)


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection. Requests are handled one at a time, as HTTP/1.1 clients send them."""

    def __init__(self, replies: Replies) -> None:
        self.replies = replies
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a held stream is still being written
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # connection_made is typed with BaseTransport; a TCP connection gets a Transport.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                self._fail(400, "bad request line")
                return
            method, path = parts[0], parts[1]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if length > MAX_BODY:
                self._fail(400, "body too large")
                return
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self._handle(method, path.split("?", 1)[0], body)

    def _fail(self, status: int, message: str) -> None:
        assert self.transport is not None
        self.transport.write(_error(status, message))
        self.transport.close()

    def _handle(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        if method == "GET" and path.endswith("/models"):
            self.transport.write(_MODELS)
            return
        if method == "POST" and path.endswith("/embeddings"):
            try:
                doc = _loads(body)
                inputs = doc["input"]
                count = len(inputs) if isinstance(inputs, list) else 1
                as_base64 = doc.get("encoding_format") == "base64"
                self.transport.write(self.replies.embeddings(str(doc["model"]), count, as_base64))
            except Exception:
                self.transport.write(_error(400, "body is not an embeddings request"))
            return
        if method != "POST" or not path.endswith("/chat/completions"):
            self.transport.write(_error(404, f"no route {method} {path}"))
            return
        try:
            doc = _loads(body)
            model = doc["model"]
            stream = bool(doc.get("stream"))
        except Exception:
            self.transport.write(_error(400, "body is not a chat completion request"))
            return
        shape = parse_model(model) if isinstance(model, str) else None
        if shape is None:
            self.transport.write(_error(404, f"The model `{model}` does not exist"))
            return
        if not stream:
            self.transport.write(self.replies.unary(model, shape))
            return
        head, events, tail = self.replies.stream_parts(model, shape)
        gap = shape.gap
        if gap <= 0:
            # "Answers at once": the whole stream in one write, as fast as a server can be.
            self.transport.write(head + b"".join(events) + tail)
            return
        self.transport.write(head + (events[0] if events else b""))
        self.busy = True
        self._hold(events, 1, tail, gap)

    def _hold(self, events: list[bytes], i: int, tail: bytes, gap: float) -> None:
        """Write the rest of a held stream one chunk every `gap` seconds."""
        self.timer = None
        if self.transport is None:
            return
        if i >= len(events):
            self.transport.write(tail)
            self.busy = False
            if self.buf:
                self.data_received(b"")
            return
        self.transport.write(events[i])
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(gap, self._hold, events, i + 1, tail, gap)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    replies = Replies()
    server = await loop.create_server(
        lambda: UpstreamProtocol(replies), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
