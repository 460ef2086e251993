"""A tiny HTTP/1.1 server on 127.0.0.1:0 for fake upstreams.

Written on raw asyncio streams (not a framework) so a fake controls every byte it sends:
exact SSE/NDJSON framing, chunked transfer, and faults no framework would produce
(reset before headers, stall mid-body, close without a terminator). Keep-alive is
supported because the broker's pooled client reuses connections.

Every byte a Response sends goes through `tests.fakes.segment.write_segmented`, cut as the
server's `segmenter` decides (default: MB_TEST_SEGMENT, i.e. random 1-1500-byte pieces, seed 1;
`segmenter=None` or MB_TEST_SEGMENT=off writes each call in one piece), so the clients under
test meet the arbitrary splits a real network makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl as ssl_module
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from tests.fakes.segment import Segmenter, from_env, set_nodelay, write_segmented


@dataclass
class Request:
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class Response:
    """Handed to a handler to answer. Use `send` for a whole body, or start_stream/write/end."""

    def __init__(self, writer: asyncio.StreamWriter, segmenter: Segmenter | None = None) -> None:
        self._writer = writer
        self.segmenter = segmenter
        self.started = False
        self.finished = False
        self.keep_alive = True

    async def send(
        self,
        status: int,
        body: bytes | str | Any,
        *,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        data = body.encode() if isinstance(body, str) else body
        hdrs = {"content-type": content_type, "content-length": str(len(data)), **(headers or {})}
        await self._send(_head(status, hdrs) + data)
        self.started = self.finished = True

    async def start_stream(
        self,
        status: int = 200,
        *,
        content_type: str = "text/event-stream",
        headers: dict[str, str] | None = None,
    ) -> None:
        hdrs = {
            "content-type": content_type,
            "transfer-encoding": "chunked",
            "cache-control": "no-cache",
            **(headers or {}),
        }
        await self._send(_head(status, hdrs))
        self.started = True

    async def write(self, data: bytes | str) -> None:
        """One chunk of a chunked body; raises ConnectionError once the client has gone."""
        raw = data.encode() if isinstance(data, str) else data
        if not raw:
            return
        await self._send(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")

    async def end(self) -> None:
        await self._send(b"0\r\n\r\n")
        self.finished = True

    async def write_raw(self, data: bytes) -> None:
        """Bytes exactly as given (status line, headers, framing: all the caller's), still segmented.

        For byte-faithful replays and hand-made framing. The response counts as started; call
        `close()` (or set `finished`) when the bytes were a whole response and framing allows reuse.
        """
        self.started = True
        await self._send(data)

    async def _send(self, data: bytes) -> None:
        await write_segmented(self._writer, data, self.segmenter)

    def abort(self) -> None:
        """Drop the connection with a TCP reset (no terminator, no FIN handshake)."""
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self._writer.transport.abort()
        self.keep_alive = False
        self.finished = True

    async def close(self) -> None:
        """Close the connection cleanly (FIN) wherever the body is."""
        self.keep_alive = False
        self.finished = True
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Overloaded",
}


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


Handler = Callable[[Request, Response], Awaitable[None]]


@dataclass
class FakeHTTPServer:
    """Serve `handler` on 127.0.0.1 on a free port. Counts requests and watches disconnects."""

    handler: Handler
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    # Set when a client closes a connection while a handler is still streaming to it.
    disconnects: asyncio.Queue[float] = field(default_factory=asyncio.Queue)
    open_connections: int = 0
    # How responses are cut into socket writes (None: one write per call).
    segmenter: Segmenter | None = field(default_factory=from_env)
    # Serve TLS with this context (https:// in `url`).
    ssl: ssl_module.SSLContext | None = None
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl is not None else 'http'}://{self.host}:{self.port}"

    async def start(self) -> FakeHTTPServer:
        self._server = await asyncio.start_server(self._on_conn, self.host, self.port, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop every connection, as a crashed upstream would."""
        if self._server is not None:
            await stop_serving(self._server, self._tasks)
            self._server = None

    async def __aenter__(self) -> FakeHTTPServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.open_connections += 1
        set_nodelay(writer)
        try:
            while True:
                req = await read_request(reader)
                if req is None:
                    return
                self.requests.append(req)
                resp = Response(writer, self.segmenter)
                watcher = asyncio.create_task(_watch_eof(reader))
                handler = asyncio.ensure_future(self.handler(req, resp))
                done, _ = await asyncio.wait({watcher, handler}, return_when=asyncio.FIRST_COMPLETED)
                if watcher in done and handler not in done:
                    # The client went away mid-response: record when, and stop the handler.
                    self.disconnects.put_nowait(asyncio.get_running_loop().time())
                    handler.cancel()
                    # wait() rather than await: a cancellation of this connection task
                    # (stop()) must not be swallowed along with the handler's.
                    await asyncio.wait({handler})
                    return
                watcher.cancel()
                await asyncio.wait({watcher})
                exc = handler.exception()
                if exc is not None:
                    if isinstance(exc, ConnectionError):
                        self.disconnects.put_nowait(asyncio.get_running_loop().time())
                        return
                    raise exc
                if not resp.keep_alive or req.headers.get("connection", "").lower() == "close":
                    return
                if resp.started and not resp.finished:
                    return  # the handler left the body open: end the connection with it
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()


async def stop_serving(server: asyncio.Server, connections: set[asyncio.Task[Any]]) -> None:
    """Stop listening and cancel every connection task (waiting up to 2 s for each step)."""
    server.close()
    tasks = list(connections)
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=2)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 2)


async def _watch_eof(reader: asyncio.StreamReader) -> None:
    # A request body was read whole; further bytes would be a pipelined request (the broker's
    # clients do not pipeline), so EOF here means the client closed the connection.
    while True:
        data = await reader.read(1)
        if not data:
            return
        await asyncio.sleep(3600)


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on a connection, its body read whole (Content-Length or chunked, chunk
    extensions and the empty trailer section passed over); None at EOF or an unreadable head."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    path, _, query = target.partition("?")
    return Request(method=method, path=path, query=query, headers=headers, body=body)


class _Capture:
    """Enough of a StreamWriter for a Response to write into memory."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.transport = self

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def abort(self) -> None:
        return None

    def close(self) -> None:
        return None

    async def wait_closed(self) -> None:
        return None


async def capture_response(handler: Handler, req: Request) -> bytes:
    """The exact bytes `handler` answers `req` with (status line, headers, framing), unsegmented.

    For tests that then deliver those bytes cut at chosen offsets (`Response.write_raw` with a
    `Segmenter.at`): e.g. a fake's own streamed answer, split inside its chunked framing.
    """
    sink = _Capture()
    await handler(req, Response(cast(asyncio.StreamWriter, sink), None))
    return bytes(sink.data)


def sse(data: Any, event: str | None = None) -> bytes:
    """One SSE event as servers write it: optional `event:` line, `data:` line, blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def ndjson(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()
