"""A loopback HTTP/1.1 server that answers with recorded vendor traffic, byte for byte.

Each answer is a `Wire`: the exact bytes to send (status line, headers, framed body) cut into
parts, where a part is one SSE event or NDJSON line (the unit a vendor writes at a time) and
pacing sleeps between parts. Every part goes out through a `Segmenter` from
tests/fakes/segment.py, so by default a replay reaches the daemon in random 1-1500-byte pieces
cut anywhere, inside chunk-size lines and CRLFs included (MB_TEST_SEGMENT=off turns that off).

`recorded_wire` re-frames a recording as SOURCES.md says: headers as recorded minus the
hop-by-hop and length headers, then chunked framing (one chunk per event or line) for bodies the
vendor streamed, a Content-Length for the others; a `httprr raw HTTP/1.1` capture is sent as its
raw bytes, chunk framing included.

The server keeps every request it received (`requests`), so a test can assert what the daemon
sent upstream, and answers each one with whatever the `answer` callback returns.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.http import Request, read_request, stop_serving
from tests.fakes.segment import Segmenter, set_nodelay, write_segmented

# Re-framed by this server (RFC 9110 7.6.1 hop-by-hop fields, plus the body's own framing).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
    }
)
_SSE_EVENT_END = re.compile(rb"\r\n\r\n|\n\n")


# One request as the server received it.
Seen = Request


@dataclass
class Wire:
    """A whole response as bytes: `parts[0]` starts with the status line; pacing sleeps between parts."""

    parts: list[bytes]
    pace_seconds: float = 0.0
    # None: one write per part. Otherwise called once per response for a fresh segmenter.
    segmenter: Callable[[], Segmenter | None] | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


def head(status: int, reason: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}".rstrip()] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def body_units(body: bytes, content_type: str) -> list[bytes]:
    """The pieces a vendor writes one at a time: SSE events, NDJSON lines, else the whole body."""
    if not body:
        return []
    ctype = content_type.lower()
    if "event-stream" in ctype:
        units, start = [], 0
        for m in _SSE_EVENT_END.finditer(body):
            units.append(body[start : m.end()])
            start = m.end()
        if start < len(body):
            units.append(body[start:])
        return units
    if "ndjson" in ctype:
        return body.splitlines(keepends=True)
    if "amazon.eventstream" in ctype:
        # Binary frames, each led by its 4-byte big-endian total length.
        units, pos = [], 0
        while pos + 12 <= len(body):
            size = int.from_bytes(body[pos : pos + 4], "big")
            if size < 16:
                break
            units.append(body[pos : pos + size])
            pos += size
        if pos < len(body):
            units.append(body[pos:])
        return units
    return [body]


def framed(
    status: int,
    reason: str,
    headers: Sequence[tuple[str, str]],
    units: list[bytes],
    *,
    chunked: bool,
) -> list[bytes]:
    """Status line and headers (hop-by-hop ones dropped) plus the body framed anew, one part per unit."""
    kept = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
    if chunked:
        kept.append(("Transfer-Encoding", "chunked"))
        parts = [f"{len(u):x}\r\n".encode() + u + b"\r\n" for u in units if u]
        end = b"0\r\n\r\n"
        if parts:
            parts[-1] += end
        else:
            parts = [end]
    else:
        kept.append(("Content-Length", str(sum(len(u) for u in units))))
        parts = list(units)
    return [head(status, reason, kept) + (parts[0] if parts else b""), *parts[1:]]


def recorded_body(response: dict[str, Any]) -> bytes:
    body = response.get("body") or ""
    if response.get("body_encoding") == "base64":
        return base64.b64decode(body)
    return str(body).encode("utf-8")


def recorded_wire(recording: dict[str, Any]) -> Wire:
    """The recorded response as the vendor sent it (raw captures byte for byte, others re-framed)."""
    response = recording["response"]
    fmt = str(recording.get("source", {}).get("format", ""))
    if response.get("raw") and fmt.startswith("httprr raw HTTP/1.1"):
        return Wire([str(response["raw"]).encode("utf-8")])
    headers = [(str(k), str(v)) for k, v in response.get("headers") or []]
    ctype = next((v for k, v in headers if k.lower() == "content-type"), "")
    te = " ".join(v for k, v in headers if k.lower() == "transfer-encoding").lower()
    units = body_units(recorded_body(response), ctype)
    streamed = any(s in ctype.lower() for s in ("event-stream", "ndjson", "eventstream"))
    status = int(response["status"])
    reason = str(response.get("reason") or _REASONS.get(status, ""))
    return Wire(framed(status, reason, headers, units, chunked="chunked" in te or streamed))


def json_wire(status: int, doc: Any, *, headers: Sequence[tuple[str, str]] = ()) -> Wire:
    body = json.dumps(doc).encode()
    hdrs = [("Content-Type", "application/json"), *headers]
    return Wire(framed(status, _REASONS.get(status, ""), hdrs, [body], chunked=False))


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}

Answer = Callable[[Seen], Wire]


@dataclass
class ReplayServer:
    """Serves `answer(request)` on 127.0.0.1, a free port; keep-alive; records every request."""

    answer: Answer
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Seen] = field(default_factory=list)
    # Responses the daemon hung up on before their last byte (a cancelled or timed-out read).
    cut_short: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def seen(self, method: str, path_suffix: str = "") -> list[Seen]:
        return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    async def __aenter__(self) -> ReplayServer:
        self._server = await asyncio.start_server(self._on_conn, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is None:
            return
        await stop_serving(self._server, self._tasks)
        self._server = None

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        set_nodelay(writer)
        try:
            while (req := await read_request(reader)) is not None:
                self.requests.append(req)
                if not await self._send(self.answer(req), reader, writer):
                    return
                if req.headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Stopped by __aexit__: end quietly (asyncio's start_server callback would log a
            # cancelled connection task as an unhandled exception).
            return
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _send(self, wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Write the response; False when the client went away before its end."""
        seg = wire.segmenter() if wire.segmenter is not None else None
        for i, part in enumerate(wire.parts):
            if i and wire.pace_seconds:
                await asyncio.sleep(wire.pace_seconds)
            if reader.at_eof() or writer.is_closing():
                self.cut_short += 1
                return False
            try:
                await write_segmented(writer, part, seg)
            except ConnectionError:
                self.cut_short += 1
                return False
        return True
