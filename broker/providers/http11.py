"""A lean HTTP/1.1 client for the completion hot path: one pool of keep-alive connections per provider.

Why not httpx here: on the bench machine httpx spends 0.7-1 ms of CPU on each request
(URL and header models, h11's state machine, anyio, a failed `import sniffio` on every
call in httpcore) and walks several generator layers per HTTP chunk, and its pool does
work proportional to the number of connections on every request. That is more than the
whole budget the broker has for a call. This client does what the completion path needs
and nothing else: a request with a JSON body, a response whose body is handed over a
network read at a time (all the chunks that read completed, de-chunked in one pass).
httpx still serves discovery and health checks, where a millisecond does not matter.

It raises httpx's own exception classes (ConnectError, ConnectTimeout, ReadTimeout,
WriteTimeout, PoolTimeout, RemoteProtocolError, ReadError), so the providers' error
mapping is the same whichever client produced the error.

Reliability rules it keeps: a connection goes back to the pool only after its response
was read to the end and the server did not say `connection: close`; a response closed
early (the caller cancelled, a stall, an error) closes its connection, which is what
tells the upstream to stop generating; reads stop when the consumer stops reading
(transport flow control), so a slow caller cannot make the daemon buffer a whole answer;
an idle connection the server has closed is never reused. It never retries a request
itself: a failure is raised, and the routing layer decides about retries and fallback.
"""

from __future__ import annotations

import asyncio
import codecs
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx

MAX_HEAD_BYTES = 64 * 1024
# Past this much unread data the socket stops being read until the consumer catches up.
HIGH_WATER = 256 * 1024


class Headers(Mapping[str, str]):
    """Response headers, case-insensitive (names stored lower-case; repeated ones joined by ', ')."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._d: dict[str, str] = {}
        for k, v in pairs:
            k = k.lower()
            self._d[k] = f"{self._d[k]}, {v}" if k in self._d else v

    def __getitem__(self, key: str) -> str:
        return self._d[key.lower()]

    def get(self, key: str, default: Any = None) -> Any:
        return self._d.get(key.lower(), default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._d

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; the protocol only buffers, the response parses."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.eof = False
        self.lost: BaseException | None = None
        self.closed = False
        self.paused_reading = False
        self.waiter: asyncio.Future[None] | None = None
        self.write_waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        self.lost = exc
        self._wake()
        if self.write_waiter is not None and not self.write_waiter.done():
            self.write_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.write_waiter = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.write_waiter is not None and not self.write_waiter.done():
            self.write_waiter.set_result(None)
        self.write_waiter = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # --- used by the pool and the response ------------------------------------------------------

    def take(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = []
        self.buffered = 0
        if self.paused_reading and self.transport is not None and not self.closed:
            self.paused_reading = False
            self.transport.resume_reading()
        return data

    async def wait_data(self, timeout: float | None) -> None:
        """Until more bytes, EOF or loss; httpx.ReadTimeout after `timeout` seconds of silence."""
        if self.chunks or self.eof:
            return
        self.waiter = fut = self.loop.create_future()
        timer = None if timeout is None else self.loop.call_later(timeout, _expire, fut)
        try:
            await fut
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    async def write(self, data: bytes, timeout: float | None) -> None:
        if self.closed or self.transport is None:
            raise httpx.WriteError("the connection closed before the request was sent")
        self.transport.write(data)
        if self.write_waiter is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self.write_waiter
            except TimeoutError:
                raise httpx.WriteTimeout(f"could not send the request within {timeout:g}s") from None
            if self.closed:
                raise httpx.WriteError("the connection closed while the request was being sent")

    def reusable(self, now: float, expiry: float) -> bool:
        return not (self.closed or self.eof or self.chunks) and now - self.idle_since < expiry

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(httpx.ReadTimeout("no data from the server within the read timeout"))


class Pool:
    """Keep-alive connections to one origin, at most `max_connections` at once."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        keepalive_expiry: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme in {base_url!r}")
        self.host = url.host
        self.tls = url.scheme == "https"
        self.port = url.port or (443 if self.tls else 80)
        self.base_path = url.raw_path.decode("ascii").split("?", 1)[0].rstrip("/")
        default_port = 443 if self.tls else 80
        host_header = self.host if self.port == default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not self.host.startswith("["):  # IPv6 literal
            host_header = f"[{self.host}]" if self.port == default_port else f"[{self.host}]:{self.port}"
        fixed = {
            "host": host_header,
            "user-agent": "model-broker",
            **{k.lower(): v for k, v in (headers or {}).items()},
        }
        self._head_tail = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._ssl: ssl.SSLContext | None = None
        if self.tls:
            self._ssl = httpx.create_ssl_context(trust_env=False)
            self._ssl.set_alpn_protocols(["http/1.1"])
        self._idle: list[_Connection] = []
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    # --- connections ---------------------------------------------------------------------------

    async def _acquire(self, connect_timeout: float, pool_timeout: float) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable(now, self.keepalive_expiry):
                self._active += 1
                return conn
            conn.close()
        if self._active >= self.max_connections:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                async with asyncio.timeout(pool_timeout):
                    await fut
            except TimeoutError:
                raise httpx.PoolTimeout(
                    f"all {self.max_connections} connections stayed busy for {pool_timeout:g}s"
                ) from None
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
            return await self._acquire(connect_timeout, pool_timeout)
        self._active += 1
        try:
            return await self._connect(connect_timeout)
        except BaseException:
            self._release_slot()
            raise

    async def _connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self.tls else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection within {timeout:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        return conn

    def _release_slot(self) -> None:
        self._active -= 1
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def release(self, conn: _Connection, keep: bool) -> None:
        if keep and not self._closed and not (conn.closed or conn.eof or conn.chunks):
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        self._release_slot()

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    # --- requests ------------------------------------------------------------------------------

    def _request_bytes(self, method: str, path: str, body: bytes, headers: Mapping[str, str] | None) -> bytes:
        target = f"{self.base_path}/{path.lstrip('/')}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = f"{method} {target} HTTP/1.1\r\n{self._head_tail}{extra}content-length: {len(body)}\r\n\r\n"
        return head.encode("latin-1") + body

    async def request(
        self,
        method: str,
        path: str,
        body: bytes,
        timeout: httpx.Timeout,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send a request and read the response head; the body is read through the Response."""
        raw = self._request_bytes(method, path, body, headers)
        connect = timeout.connect if timeout.connect is not None else 30.0
        pool = timeout.pool if timeout.pool is not None else connect
        conn = await self._acquire(connect, pool)
        resp = Response(self, conn, method, timeout.read)
        try:
            await conn.write(raw, timeout.write)
            await resp._read_head()
        except BaseException:
            resp._abandon()
            raise
        return resp


class Response:
    """An HTTP response whose body is read a network read at a time; close it when done."""

    def __init__(self, pool: Pool, conn: _Connection, method: str, read_timeout: float | None) -> None:
        self._pool = pool
        self._conn = conn
        self._method = method
        self._read_timeout = read_timeout
        self._rest = b""
        self.status_code = 0
        self.headers = Headers([])
        self._framing = "length"  # length | chunked | close
        self._left = 0  # bytes left: of the body (length) or of the current chunk (chunked)
        self._chunk_state = "size"  # size | data | crlf | trailer
        self._keep_alive = True
        self._done = False
        self._closed = False
        self._decoder: Any = None

    async def _more(self) -> bytes:
        conn = self._conn
        await conn.wait_data(self._read_timeout)
        if conn.chunks:
            return conn.take()
        return b""  # EOF or connection lost

    async def _read_head(self) -> None:
        buf = b""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head, buf = buf[:end], buf[end + 4 :]
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ", 2)
                if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                    raise httpx.RemoteProtocolError(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
                status = int(parts[1])
                if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
                    continue
                pairs = []
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        pairs.append((name.strip(), value.strip()))
                self.status_code = status
                self.headers = Headers(pairs)
                self._rest = buf
                self._setup(parts[0])
                return
            if len(buf) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("response headers too large")
            more = await self._more()
            if not more:
                raise httpx.RemoteProtocolError(
                    "the server closed the connection without sending a complete response"
                )
            buf += more

    def _setup(self, version: str) -> None:
        h = self.headers
        conn_tokens = h.get("connection", "").lower()
        self._keep_alive = "close" not in conn_tokens and (
            version == "HTTP/1.1" or "keep-alive" in conn_tokens
        )
        if self._method == "HEAD" or self.status_code in (204, 304):
            self._framing, self._left = "length", 0
        elif "chunked" in h.get("transfer-encoding", "").lower():
            self._framing = "chunked"
        elif "content-length" in h:
            try:
                self._left = int(h["content-length"])
            except ValueError:
                raise httpx.RemoteProtocolError("bad content-length") from None
            self._framing = "length"
        else:
            self._framing, self._keep_alive = "close", False
        encoding = h.get("content-encoding", "").lower().strip()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding not in ("", "identity"):
            raise httpx.DecodingError(f"unsupported content-encoding {encoding!r}")
        if self._framing == "length" and self._left == 0:
            self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._closed = True
            self._pool.release(self._conn, keep=self._keep_alive and not self._rest)

    def _dechunk(self, buf: bytes) -> bytes:
        """Every chunk's data `buf` completes (and any partial chunk's start); the rest kept."""
        out: list[bytes] = []
        pos, n = 0, len(buf)
        while pos < n:
            state = self._chunk_state
            if state == "data":
                take = min(self._left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left:
                    break
                self._chunk_state = "crlf"
            elif state == "crlf":
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise httpx.RemoteProtocolError("malformed chunked body (no CRLF after a chunk)")
                pos += 2
                self._chunk_state = "size"
            elif state == "size":
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    if n - pos > 1024:
                        raise httpx.RemoteProtocolError("malformed chunked body (chunk size line)")
                    break
                try:
                    size = int(buf[pos:nl].split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise httpx.RemoteProtocolError("malformed chunked body (chunk size)") from None
                pos = nl + 2
                if size:
                    self._left = size
                    self._chunk_state = "data"
                else:
                    self._chunk_state = "trailer"
            else:  # trailer lines until an empty one
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    break
                line_empty = nl == pos
                pos = nl + 2
                if line_empty:
                    self._rest = buf[pos:]
                    self._finish()
                    return b"".join(out)
        self._rest = buf[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (de-chunked, not decoded); one item per network read."""
        while not self._done:
            buf = self._rest
            self._rest = b""
            if not buf:
                buf = await self._more()
                if not buf:
                    if self._framing == "close":
                        self._finish()
                        return
                    self._keep_alive = False
                    raise httpx.RemoteProtocolError(
                        "the server closed the connection before the end of the body"
                    )
            if self._framing == "chunked":
                data = self._dechunk(buf)
            elif self._framing == "length":
                data, self._rest = buf[: self._left], buf[self._left :]
                self._left -= len(data)
                if self._left == 0:
                    self._finish()
            else:
                data = buf
            if data:
                yield data

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body as it arrives, content-encoding undone."""
        async for data in self.aiter_raw():
            if self._decoder is not None:
                data = self._decoder.decompress(data)
            if data:
                yield data
        if self._decoder is not None and (tail := self._decoder.flush()):
            yield tail

    async def aiter_text(self) -> AsyncIterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async for data in self.aiter_bytes():
            if text := decoder.decode(data):
                yield text
        if text := decoder.decode(b"", final=True):
            yield text

    async def aread(self) -> bytes:
        return b"".join([b async for b in self.aiter_bytes()])

    def _abandon(self) -> None:
        if not self._closed:
            self._closed = True
            self._done = True
            self._pool.release(self._conn, keep=False)

    async def aclose(self) -> None:
        """Give the connection back if the body was read to the end; otherwise close it."""
        self._abandon()
