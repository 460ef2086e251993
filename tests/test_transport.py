"""The one HTTP transport (aiohttp) against real HTTP servers on 127.0.0.1: pooling, bounded
reads, error mapping, TLS trust, the pool gate, redirects."""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from broker import errors
from broker.providers.transport import Transport, UpstreamResponse, display_url
from tests.fakes.http import FakeHTTPServer, Request
from tests.fakes.http import Response as FakeResponse

Handler = Callable[[Request, FakeResponse], Awaitable[None]]


def transport(url: str, **kw: object) -> Transport:
    args: dict[str, object] = {
        "name": "up",
        "base_url": url,
        "headers": {"authorization": "Bearer k"},
        "max_connections": 4,
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "pool_timeout": 2.0,
        "max_decompressed_bytes": 1024 * 1024,
    }
    args.update(kw)
    return Transport(**args)  # type: ignore[arg-type]


@pytest.fixture
async def started() -> AsyncIterator[list[Transport | FakeHTTPServer]]:
    things: list[Transport | FakeHTTPServer] = []
    yield things
    for t in things:
        if isinstance(t, Transport):
            await t.close()
        else:
            await t.stop()


async def serve(handler: Handler, things: list[Transport | FakeHTTPServer]) -> FakeHTTPServer:
    server = await FakeHTTPServer(handler).start()
    things.append(server)
    return server


async def up(url: str, things: list[Transport | FakeHTTPServer], **kw: object) -> Transport:
    t = transport(url, **kw)
    await t.start()
    things.append(t)
    return t


async def body_of(resp: UpstreamResponse) -> bytes:
    return b"".join([c async for c in resp.chunks()])


async def sse_reply(req: Request, resp: FakeResponse) -> None:
    await resp.start_stream()
    for i in range(50):
        await resp.write(f'data: {{"i":{i}}}\n\n')
    await resp.end()


async def test_requests_share_one_keep_alive_connection(started: list[Transport | FakeHTTPServer]) -> None:
    server = await serve(sse_reply, started)
    t = await up(server.url + "/v1", started)
    want = b"".join(f'data: {{"i":{i}}}\n\n'.encode() for i in range(50))
    for _ in range(3):
        async with t.request("POST", "chat/completions", b'{"model":"m"}') as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert await body_of(resp) == want
    assert server.open_connections == 1
    req = server.requests[0]
    assert (req.method, req.path, req.body) == ("POST", "/v1/chat/completions", b'{"model":"m"}')
    assert req.headers["authorization"] == "Bearer k"
    # Compression is refused up front; no cookies, no redirects, no default user agent.
    assert req.headers["accept-encoding"] == "identity"
    assert "cookie" not in req.headers and "user-agent" not in req.headers


async def test_an_upstream_that_compresses_anyway_is_inflated(
    started: list[Transport | FakeHTTPServer],
) -> None:
    async def handler(req: Request, resp: FakeResponse) -> None:
        if req.path.endswith("/gz"):
            await resp.send(200, gzip.compress(b'{"ok":true}'), headers={"content-encoding": "gzip"})
        elif req.path.endswith("/zlib"):
            await resp.send(200, zlib.compress(b'{"ok":1}'), headers={"content-encoding": "deflate"})
        elif req.path.endswith("/br"):
            await resp.send(200, b"\x0b\x02\x80", headers={"content-encoding": "br"})
        else:
            await resp.send(200, {"ok": True})

    server = await serve(handler, started)
    t = await up(server.url, started)
    for path, want in (("plain", b'{"ok": true}'), ("gz", b'{"ok":true}'), ("zlib", b'{"ok":1}')):
        async with t.request("GET", path, None) as resp:
            assert await resp.read() == want
    with pytest.raises(errors.UpstreamProtocolError, match="'br'"):
        async with t.request("GET", "br", None):
            pass


async def test_a_gzip_bomb_stops_at_the_inflate_cap(started: list[Transport | FakeHTTPServer]) -> None:
    # 1 GiB of zeros compresses to ~1 MiB; the cap here is 1 MiB of output.
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1024 * 1024)
    bomb = b"".join(z.compress(block) for _ in range(1024)) + z.flush()

    async def handler(req: Request, resp: FakeResponse) -> None:
        await resp.send(200, bomb, headers={"content-encoding": "gzip"})

    server = await serve(handler, started)
    t = await up(server.url, started)
    seen = 0
    with pytest.raises(errors.UpstreamProtocolError, match="inflates past 1048576 bytes"):
        async with t.request("GET", "x", None) as resp:
            async for piece in resp.chunks():
                assert len(piece) <= 256 * 1024  # inflated a bounded piece at a time
                seen += len(piece)
    assert seen <= 1024 * 1024


async def test_a_stall_is_a_timeout_and_drops_the_connection(
    started: list[Transport | FakeHTTPServer],
) -> None:
    async def stall(req: Request, resp: FakeResponse) -> None:
        await resp.start_stream()
        await resp.write("data: first\n\n")
        await asyncio.sleep(30)

    server = await serve(stall, started)
    t = await up(server.url, started, read_timeout=0.3)
    with pytest.raises(errors.UpstreamTimeout, match=r"stream stalled \(no data for 0.3s\)"):
        async with t.request("POST", "x", b"{}") as resp:
            got = b""
            async for c in resp.chunks():
                got += c
    assert got == b"data: first\n\n"
    await asyncio.wait_for(server.disconnects.get(), 2)


async def test_closing_a_response_early_closes_the_upstream_at_once(
    started: list[Transport | FakeHTTPServer],
) -> None:
    async def endless(req: Request, resp: FakeResponse) -> None:
        await resp.start_stream()
        while True:
            await resp.write("data: more\n\n")
            await asyncio.sleep(0.01)

    server = await serve(endless, started)
    t = await up(server.url, started)
    async with t.request("POST", "x", b"{}") as resp:
        assert await anext(resp.chunks())
    # the caller went away: the context closed the response mid-body
    await asyncio.wait_for(server.disconnects.get(), 1)
    assert t.in_use == 0


async def test_an_idle_connection_the_server_closed_is_not_reused(
    started: list[Transport | FakeHTTPServer],
) -> None:
    async def once(req: Request, resp: FakeResponse) -> None:
        await resp.send(200, {"n": len(server.requests)})
        resp.keep_alive = False  # the server closes after answering, without saying so

    server = await serve(once, started)
    t = await up(server.url, started)
    for n in (1, 2):
        await asyncio.sleep(0.05)
        async with t.request("GET", "x", None) as resp:
            assert await resp.read() == f'{{"n": {n}}}'.encode()


async def test_a_full_pool_waits_then_says_the_broker_pool_was_full(
    started: list[Transport | FakeHTTPServer],
) -> None:
    release = asyncio.Event()

    async def held(req: Request, resp: FakeResponse) -> None:
        await resp.start_stream()
        await resp.write("data: x\n\n")
        await release.wait()
        await resp.end()

    server = await serve(held, started)
    t = await up(server.url, started, max_connections=1, pool_timeout=0.2)
    async with t.request("POST", "x", b"{}") as first:
        with pytest.raises(errors.BrokerPoolFull, match="connection pool for this provider was full") as info:
            async with t.request("POST", "x", b"{}"):
                pass
        assert "the upstream was not asked" in info.value.message
        assert len(server.requests) == 1  # the refused request never reached the upstream

        async def second() -> int:
            async with t.request("POST", "x", b"{}") as r:
                await body_of(r)
                return r.status

        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        release.set()
        await body_of(first)
    assert await asyncio.wait_for(waiting, 2) == 200
    # A caller's deadline bounds the wait too.
    release.clear()
    async with t.request("POST", "x", b"{}"):
        with pytest.raises(errors.BrokerPoolFull, match=r"for 0\.05s"):
            async with t.request("POST", "x", b"{}", deadline=0.05):
                pass
        release.set()


async def test_a_server_that_closes_mid_body_is_a_lost_connection(
    started: list[Transport | FakeHTTPServer],
) -> None:
    async def cut(req: Request, resp: FakeResponse) -> None:
        await resp.start_stream()
        await resp.write("data: partial\n\n")
        await resp.close()

    server = await serve(cut, started)
    t = await up(server.url, started)
    with pytest.raises(errors.UpstreamUnavailable, match="connection lost mid-stream"):
        async with t.request("POST", "x", b"{}") as resp:
            await body_of(resp)


async def raw_server(answer: bytes, things: list[Transport | FakeHTTPServer]) -> tuple[str, asyncio.Server]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", server


CHUNKED = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "expected", "match"),
    [
        (CHUNKED + b"5\r\nhello\r\n-6\r\nhello!\r\n0\r\n\r\n", errors.UpstreamProtocolError, "chunk size"),
        (CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", errors.UpstreamProtocolError, "chunk size"),
        (
            b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n",
            errors.UpstreamProtocolError,
            "invalid HTTP",
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", errors.UpstreamUnavailable, "connection lost"),
        (b"NOT HTTP AT ALL\r\n\r\n", errors.UpstreamProtocolError, "invalid HTTP"),
    ],
    ids=["negative-chunk-size", "non-hex-chunk-size", "huge-header", "short-body", "not-http"],
)
async def test_broken_http_is_a_typed_error(
    answer: bytes, expected: type[errors.BrokerError], match: str, started: list[Transport | FakeHTTPServer]
) -> None:
    url, server = await raw_server(answer, started)
    t = await up(url, started)
    try:
        with pytest.raises(expected, match=match):
            async with t.request("GET", "x", None) as resp:
                await body_of(resp)
    finally:
        server.close()


async def test_an_http10_close_delimited_body_is_whole(started: list[Transport | FakeHTTPServer]) -> None:
    url, server = await raw_server(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nhello world", started)
    t = await up(url, started)
    try:
        async with t.request("GET", "x", None) as resp:
            assert await resp.read() == b"hello world"
    finally:
        server.close()


async def test_nothing_listening_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = transport(f"http://127.0.0.1:{port}", max_connections=1)
    await t.start()
    try:
        for _ in range(2):  # the slot is free again after a failure
            with pytest.raises(errors.UpstreamUnavailable, match="connection failed"):
                async with t.request("POST", "x", b"{}"):
                    pass
        assert t.in_use == 0
    finally:
        await t.close()


async def test_https_is_verified_and_a_private_ca_can_be_trusted(tmp_path: Path) -> None:
    from tests.pki import make_pki

    pki = make_pki(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    untrusting = transport(f"https://127.0.0.1:{port}")
    trusting = transport(f"https://127.0.0.1:{port}", ca_file=Path(pki.ca))
    await untrusting.start()
    await trusting.start()
    try:
        with pytest.raises(errors.UpstreamUnavailable, match="certificate verification failed"):
            async with untrusting.request("GET", "x", None):
                pass
        async with trusting.request("GET", "x", None) as resp:
            assert await resp.read() == b"ok"
    finally:
        await untrusting.close()
        await trusting.close()
        server.close()


async def test_a_redirect_is_returned_not_followed(started: list[Transport | FakeHTTPServer]) -> None:
    async def moved(req: Request, resp: FakeResponse) -> None:
        await resp.send(302, b"", headers={"location": "http://127.0.0.2:9/steal?key=1"})

    server = await serve(moved, started)
    t = await up(server.url, started)
    async with t.request("POST", "x", b"{}") as resp:
        assert resp.status == 302
    assert len(server.requests) == 1


def test_a_displayed_url_never_carries_credentials() -> None:
    assert display_url("http://user:s3cret@proxy.local:3128/path?q=1") == "http://proxy.local:3128"
    assert display_url("https://api.example.com/v1") == "https://api.example.com"


async def test_untimed_reads_leave_the_wait_to_the_caller(
    started: list[Transport | FakeHTTPServer],
) -> None:
    """timed_reads=False (a completion's body, timed by the completion service): no read
    timeout of the transport's own, however short read_timeout is; closing still drops it."""

    async def stall(req: Request, resp: FakeResponse) -> None:
        await resp.start_stream()
        await resp.write("data: first\n\n")
        await asyncio.sleep(30)

    server = await serve(stall, started)
    t = await up(server.url, started, read_timeout=0.1)
    got = b""
    async with t.request("POST", "x", b"{}", timed_reads=False) as resp:
        chunks = resp.chunks()
        got += await anext(chunks)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(chunks), 0.5)  # well past read_timeout: still waiting
        await chunks.aclose()
    assert got == b"data: first\n\n"
    await asyncio.wait_for(server.disconnects.get(), 2)
    assert t.in_use == 0
