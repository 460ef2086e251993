"""Every byte to and from an upstream: one aiohttp `ClientSession` and pool per provider.

Completions, discovery and health checks all go through `Transport`; nothing else in the
daemon opens an HTTP connection. What it guarantees:

- One pool per provider (aiohttp's TCPConnector) behind a slot gate of `max_connections`:
  a completion waits for a free slot within the caller's deadline (or `pool_timeout_seconds`)
  and, when it must give up, says that the broker's own pool was full (BrokerPoolFull), which
  never counts against the provider's health. Health checks and discovery skip the gate and
  use a small reserve of connections, so a pool full of streams never fails a health check.
- Every aiohttp exception is mapped to the broker's typed errors here, in `mapped_errors`,
  and nowhere else: timeouts -> UpstreamTimeout, unreachable / reset / TLS / proxy failures
  -> UpstreamUnavailable, a malformed HTTP response (bad chunk sizes, oversize headers, a
  body cut short) -> UpstreamProtocolError.
- Proxies: `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` from the environment, read once when the
  provider starts (aiohttp's `trust_env` would look them and ~/.netrc up again on every
  request, through a thread: 2 executor hops per request), or the provider's own `proxy:`
  URL, which overrides them (credentials in its userinfo; CONNECT
  tunnelling for https upstreams is aiohttp's). A proxy's credentials never appear in a
  message: proxies are named by scheme, host and port only.
- Redirects are never followed (a redirect could carry the provider key to another host).
- Timeouts: the pool wait and the connect always; each read by `read_timeout`, except a
  completion's body read by the completion service (`timed_reads=False`), whose own timer
  (time to first token, stalls) is then the only one.
- Bounded reads: `Accept-Encoding: identity` on every request; an upstream that compresses
  anyway is inflated a bounded piece at a time and cut off at `max_decompressed_bytes`
  (a gzip bomb costs at most that). aiohttp's C parser de-chunks the body and rejects
  invalid or negative chunk sizes; reads are flow-controlled (aiohttp pauses the socket
  when its buffer is full), so a slow caller never makes the daemon buffer an answer.
- Closing a response before its end closes its connection at once: that is what tells
  the upstream to stop generating when the caller cancels. A response read to its end
  goes back to the pool.

Line framing (SSE, NDJSON) with its own caps lives in `sse.py` and `lines.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
import zlib
from collections.abc import AsyncGenerator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from broker import errors
from broker.redact import redact, register_secret, register_url_credentials

# Answers to small calls (discovery, health, error bodies) are read whole up to this size.
MAX_SMALL_BODY = 32 * 1024 * 1024
# One inflate step's output: a compressed body is never expanded more than this at a time.
_INFLATE_PIECE = 256 * 1024
# Connections beyond max_connections kept for health checks and discovery, which skip the
# slot gate: a pool full of completions must not make a healthy provider look down.
CONTROL_RESERVE = 4
# Oversize status lines or headers are a broken or hostile upstream, not a big answer.
_MAX_LINE = 16 * 1024
_MAX_FIELD = 64 * 1024
# aiohttp timeouts kept per transport (see Transport._timeout).
_MAX_CACHED = 64


def display_url(url: str | URL) -> str:
    """scheme://host:port of a URL, never its userinfo, path or query (a proxy's password)."""
    u = URL(str(url))
    host = u.host or "?"
    return f"{u.scheme}://{host}:{u.explicit_port}" if u.explicit_port else f"{u.scheme}://{host}"


class _BrokenFraming(Exception):
    """The connection closed because aiohttp's parser refused the body's framing."""


# Protocols whose `closed` future has a consumer, so its exception is always retrieved.
_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


class UpstreamResponse:
    """A response whose body is read a network read at a time (bounded and inflated if needed)."""

    __slots__ = (
        "_closed_fut",
        "_inflated",
        "_inflater",
        "_max_inflated",
        "_proto",
        "_resp",
        "_transport",
        "headers",
        "status",
    )

    def __init__(self, resp: aiohttp.ClientResponse, transport: Transport) -> None:
        self._resp = resp
        self._transport = transport
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers
        # aiohttp 3.14's C parser, refusing a chunk size (negative, not hex, past 64 bits) in
        # a read after the headers, closes the connection but never fails the body's reader,
        # and drops the read timer: the read would wait for ever. One callback per response
        # on the connection's `closed` future fails the reader instead (see _on_closed).
        self._proto: Any = resp.connection.protocol if resp.connection is not None else None
        self._closed_fut: asyncio.Future[None] | None = None
        if self._proto is not None:
            fut = self._proto.closed
            if fut is not None:
                if self._proto not in _watched:
                    _watched.add(self._proto)
                    fut.add_done_callback(_consume)
                fut.add_done_callback(self._on_closed)
                self._closed_fut = fut
        self._max_inflated = transport.max_decompressed_bytes
        self._inflated = 0
        self._inflater: Any = None
        encoding = resp.headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            # wbits 32+15: accept a gzip or zlib header alike.
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
        elif encoding not in ("", "identity"):
            raise errors.UpstreamProtocolError(
                f"{transport.name}: the answer is compressed with {encoding[:40]!r}, which the broker "
                "does not decode (it asks for identity)",
                provider=transport.name,
            )

    def _on_closed(self, fut: asyncio.Future[None]) -> None:
        content = self._resp.content
        if content.at_eof() or content.exception() is not None:
            return  # a complete body, or aiohttp already said what went wrong
        cause = self._proto.exception() if self._proto is not None else None
        detail = getattr(cause, "message", None) or str(cause or "the connection closed inside the body")
        content.set_exception(_BrokenFraming(detail))

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives; raises BrokerErrors (stall, disconnect, bad framing, bomb)."""
        content = self._resp.content
        transport = self._transport
        while True:
            try:
                data = await content.readany()
            except Exception as exc:
                # Not `with mapped_errors(...)`: that is a generator, built and stepped per read.
                mapped = transport.mapped(exc, stage="body")
                if mapped is exc:
                    raise
                raise mapped from exc
            if not data:
                if self._inflater is not None:
                    tail = self._inflater.flush()
                    if tail:
                        self._count(len(tail))
                        yield tail
                return
            if self._inflater is None:
                yield data
            else:
                for piece in self._inflate(data):
                    yield piece
                    # One small read can inflate to megabytes: let health checks and other
                    # streams run between the pieces.
                    await asyncio.sleep(0)

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        buf = data
        while buf:
            try:
                piece = self._inflater.decompress(buf, _INFLATE_PIECE)
            except zlib.error as exc:
                raise errors.UpstreamProtocolError(
                    f"{self._transport.name}: the compressed answer is corrupt ({exc})",
                    provider=self._transport.name,
                ) from None
            self._count(len(piece))
            if piece:
                yield piece
            buf = self._inflater.unconsumed_tail

    def _count(self, n: int) -> None:
        self._inflated += n
        if self._inflated > self._max_inflated:
            raise errors.UpstreamProtocolError(
                f"{self._transport.name}: the compressed answer inflates past {self._max_inflated} bytes "
                "(max_decompressed_bytes); the broker asked for an uncompressed answer",
                provider=self._transport.name,
            )

    async def read(self, limit: int = MAX_SMALL_BODY) -> bytes:
        """The whole body, or UpstreamProtocolError past `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise errors.UpstreamProtocolError(
                    f"{self._transport.name}: the answer is larger than {limit} bytes",
                    provider=self._transport.name,
                )
            parts.append(chunk)
        return b"".join(parts)

    async def read_prefix(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body; a body cut short is what it is (error bodies)."""
        parts: list[bytes] = []
        size = 0
        with contextlib.suppress(errors.BrokerError):
            async for chunk in self.chunks():
                parts.append(chunk)
                size += len(chunk)
                if size >= limit:
                    break
        return b"".join(parts)[:limit]

    @property
    def at_eof(self) -> bool:
        return self._resp.content.at_eof()

    def close(self) -> None:
        """Back to the pool if the body was read to its end, else close the connection now."""
        if self._closed_fut is not None:
            self._closed_fut.remove_done_callback(self._on_closed)
            self._closed_fut = None
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


class _Exchange:
    """One `async with transport.request(...)`: the slot, the request, the response, and on
    exit the response closed and the slot given back, whatever the reason.

    A class rather than an asynccontextmanager: that costs an async generator per request
    (its context-manager object, the loop's asyncgen hooks, two more steps)."""

    __slots__ = ("_args", "_transport", "_wrapped")

    def __init__(
        self,
        transport: Transport,
        method: str,
        path: str,
        body: bytes | None,
        deadline: float | None,
        read_timeout: float | None,
        timed_reads: bool,
        gated: bool,
        headers: Mapping[str, str] | None,
    ) -> None:
        self._transport = transport
        self._args = (method, path, body, deadline, read_timeout, timed_reads, gated, headers)
        self._wrapped: UpstreamResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        t = self._transport
        method, path, body, deadline, read_timeout, timed_reads, gated, headers = self._args
        session = t._session
        assert session is not None  # checked by Transport.request
        read: float | None = None
        if timed_reads:
            read = read_timeout if read_timeout is not None else t.read_timeout
        connect = t.connect_timeout
        pool_wait = t.pool_timeout
        if deadline is not None:
            remaining = max(deadline, 0.001)
            connect, pool_wait = min(connect, remaining), min(pool_wait, remaining)
            if read is not None:
                read = min(read, remaining)
        if gated:
            await t._acquire(pool_wait)
        try:
            try:
                resp = await session.request(
                    method,
                    t.base_url + path,
                    data=body,
                    headers=headers,
                    timeout=t._timeout(connect, read),
                    allow_redirects=False,
                    proxy=t.proxy,
                )
            except Exception as exc:
                mapped = t.mapped(exc, stage="request", read=read, connect=connect)
                if mapped is exc:
                    raise
                raise mapped from exc
            try:
                if resp.status == 407:
                    # Only a proxy answers 407; over CONNECT aiohttp raises it, for an http
                    # upstream it arrives as a response. Either way: the proxy, not the caller.
                    raise errors.UpstreamUnavailable(
                        f"{t.name}: the proxy {t._proxy_name()} refused the request: HTTP 407 "
                        "Proxy Authentication Required (check the proxy credentials)",
                        provider=t.name,
                        upstream_status=407,
                    )
                wrapped = UpstreamResponse(resp, t)
            except BaseException:
                resp.close()
                raise
        except BaseException:
            if gated:
                t._release()
            raise
        self._wrapped = wrapped
        return wrapped

    async def __aexit__(self, *exc_info: object) -> None:
        wrapped, self._wrapped = self._wrapped, None
        try:
            if wrapped is not None:
                wrapped.close()
        finally:
            if self._args[6]:  # gated
                self._transport._release()


class Transport:
    """One provider's HTTP: session, pool, proxy, TLS trust, error mapping."""

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        headers: Mapping[str, str],
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        pool_timeout: float,
        max_decompressed_bytes: int,
        proxy: str | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/") + "/"
        self.headers = {**headers, "accept-encoding": "identity"}
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pool_timeout = pool_timeout
        self.max_decompressed_bytes = max_decompressed_bytes
        # An explicit proxy wins; else what the environment names for this base URL.
        chosen = proxy or env_proxy(self.base_url)
        self.proxy = URL(chosen) if chosen else None
        self.proxy_from_env = bool(chosen) and not proxy
        self.ca_file = ca_file
        self._slots = asyncio.Semaphore(max_connections)
        self._in_use = 0
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float | None], aiohttp.ClientTimeout] = {}

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        ssl_ctx = ssl.create_default_context()
        if self.ca_file is not None:
            ssl_ctx.load_verify_locations(cafile=str(self.ca_file))
        connector = aiohttp.TCPConnector(
            limit=self.max_connections + CONTROL_RESERVE,
            limit_per_host=0,
            keepalive_timeout=30.0,
            ssl=ssl_ctx,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,  # proxies resolved once above
            headers=self.headers,
            # aiohttp's own User-Agent is never sent. A skip list makes aiohttp copy the headers
            # and build a CIMultiDict of it per request, so it is given only when there is no
            # User-Agent of our own (which aiohttp then leaves alone anyway).
            skip_auto_headers=None if self._has_user_agent() else ("User-Agent",),
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_FIELD,
            timeout=aiohttp.ClientTimeout(total=None),
        )

    def _has_user_agent(self) -> bool:
        return any(k.lower() == "user-agent" for k in self.headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- requests ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        *,
        deadline: float | None = None,
        read_timeout: float | None = None,
        timed_reads: bool = True,
        gated: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> _Exchange:
        """Send a request and yield its response (any status); closed on exit, whatever the reason.

        `async with transport.request(...) as resp:`. `deadline` is the seconds the caller will
        still wait: it bounds the pool wait, the connect and each read. `read_timeout`
        overrides the provider's for this call. `timed_reads=False`: no read timeout at all,
        the caller times each wait itself (the completion service's time-to-first-token and
        stall timer); the pool wait and the connect stay bounded. `gated=False` (health,
        discovery) skips the slot gate and uses the reserve. `headers` are added to the
        session's for this request only (a credential that changes while the provider runs:
        Vertex's OAuth2 access token).
        """
        if self._session is None:
            raise RuntimeError(f"provider {self.name} used before start()")
        return _Exchange(self, method, path, body, deadline, read_timeout, timed_reads, gated, headers)

    def _timeout(self, connect: float, read: float | None) -> aiohttp.ClientTimeout:
        """The aiohttp timeout for these bounds, reused: most requests share a few."""
        key = (connect, read)
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect, sock_read=read)
            if len(self._timeouts) < _MAX_CACHED:  # a short deadline clamps to any value: keep a few
                self._timeouts[key] = timeout
        return timeout

    async def _acquire(self, wait: float) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # free: no timer needed
        else:
            try:
                async with asyncio.timeout(wait):
                    await self._slots.acquire()
            except TimeoutError:
                raise errors.BrokerPoolFull(
                    f"{self.name}: the broker's connection pool for this provider was full "
                    f"({self.max_connections} connections in use) for {wait:g}s; the upstream was not "
                    "asked. Raise max_connections or lower the load",
                    provider=self.name,
                ) from None
        self._in_use += 1

    def _release(self) -> None:
        self._in_use -= 1
        self._slots.release()

    @property
    def in_use(self) -> int:
        return self._in_use

    # --- the one mapping of aiohttp's exceptions -------------------------------------------------

    @contextlib.contextmanager
    def mapped_errors(
        self, *, stage: str, read: float | None = None, connect: float | None = None
    ) -> Iterator[None]:
        """aiohttp/OS/TLS errors -> the broker's typed errors, worded for where they happened.

        A sync context manager so it can wrap an await or a yield alike; BrokerErrors and
        cancellation pass through untouched. The hot paths (a request, a body read) call
        `mapped` from their own `except` instead: this is a generator per use.
        """
        try:
            yield
        except Exception as exc:
            mapped = self.mapped(exc, stage=stage, read=read, connect=connect)
            if mapped is exc:
                raise
            raise mapped from exc

    def mapped(
        self, exc: Exception, *, stage: str, read: float | None = None, connect: float | None = None
    ) -> Exception:
        """The broker's error for `exc` (raise it `from exc`), or `exc` itself when it is not
        one to map (a BrokerError, anything not aiohttp's, OS's or TLS's): re-raise it."""
        if isinstance(exc, errors.BrokerError):
            return exc
        read = self.read_timeout if read is None else read
        connect = self.connect_timeout if connect is None else connect
        mid = stage == "body"
        base = self.base_url.rstrip("/")

        def failed(kind: type[errors.BrokerError], what: str) -> errors.BrokerError:
            return kind(f"{self.name}: {what}", provider=self.name)

        if isinstance(exc, _BrokenFraming):
            return failed(errors.UpstreamProtocolError, f"the upstream sent invalid HTTP ({_short(exc)})")
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            return failed(
                errors.UpstreamUnavailable,
                f"the proxy {self._proxy_name()} refused the request: HTTP {exc.status} {exc.message}",
            )
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            return failed(
                errors.UpstreamUnavailable, f"cannot reach the proxy {self._proxy_name()}: {_os_reason(exc)}"
            )
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return failed(
                errors.UpstreamUnavailable,
                f"TLS certificate verification failed for {display_url(self.base_url)}: {exc.certificate_error}",
            )
        if isinstance(exc, (aiohttp.ClientConnectorSSLError, aiohttp.ClientSSLError, ssl.SSLError)):
            return failed(
                errors.UpstreamUnavailable,
                f"TLS handshake with {display_url(self.base_url)} failed: {_os_reason(exc)}",
            )
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return failed(errors.UpstreamTimeout, f"cannot reach {base}: no connection within {connect:g}s")
        if isinstance(exc, (aiohttp.ServerTimeoutError, TimeoutError)):
            if mid:
                return errors.stream_stalled(self.name, read)
            return failed(errors.UpstreamTimeout, f"no response within {read:g}s")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return failed(
                errors.UpstreamUnavailable, f"cannot reach {base}: connection failed ({_os_reason(exc)})"
            )
        if isinstance(exc, aiohttp.ClientPayloadError):
            # "Response payload is not completed": the connection ended inside the body.
            return failed(
                errors.UpstreamUnavailable,
                f"connection lost {'mid-stream' if mid else 'inside the answer'} ({_payload_reason(exc)})",
            )
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            what = (
                "connection lost mid-stream" if mid else "the server closed the connection before answering"
            )
            return failed(errors.UpstreamUnavailable, what)
        if isinstance(exc, aiohttp.ClientResponseError):
            # aiohttp's parser refusing the status line, headers or chunk framing (oversize,
            # malformed, a negative or non-hex chunk size).
            detail = exc.__cause__ if exc.__cause__ is not None else exc.message
            return failed(
                errors.UpstreamProtocolError,
                f"the upstream sent invalid HTTP ({_short(getattr(detail, 'message', detail))})",
            )
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            what = "connection lost mid-stream" if mid else f"cannot reach {base}"
            return failed(errors.UpstreamUnavailable, f"{what}: {_os_reason(exc)}")
        return exc

    def _proxy_name(self) -> str:
        if self.proxy is None:
            return "on the way"
        return display_url(self.proxy) + (" (from the environment)" if self.proxy_from_env else "")


def env_proxy(url: str) -> str | None:
    """The HTTP(S)_PROXY the environment names for `url` (NO_PROXY honoured), as aiohttp reads it."""
    import urllib.request

    u = URL(url)
    if u.host and urllib.request.proxy_bypass(u.host):
        return None
    return urllib.request.getproxies().get(u.scheme)


def register_proxy_secrets(proxy: str | None) -> None:
    """A proxy URL's password (and the whole URL) are secrets wherever they could be echoed."""
    for candidate in (proxy, env_proxy("https://example.invalid"), env_proxy("http://example.invalid")):
        if candidate:
            register_secret(candidate)
            register_url_credentials(candidate)


def _short(text: object, limit: int = 200) -> str:
    s = " ".join(redact(str(text)[:65536]).split())  # redact, then cut
    return s if len(s) <= limit else s[:limit] + "..."


def _os_reason(exc: BaseException) -> str:
    inner = getattr(exc, "os_error", None) or exc
    text = getattr(inner, "strerror", None) or str(inner) or type(inner).__name__
    return _short(text)


def _payload_reason(exc: aiohttp.ClientPayloadError) -> str:
    cause = exc.__cause__ or (exc.args[1] if len(exc.args) > 1 else None)
    return _short(cause if cause is not None else exc)
