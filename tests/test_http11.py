"""The lean HTTP/1.1 client of the completion path, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from broker.providers.http11 import Pool, Response
from tests.fakes.http import FakeHTTPServer, Request
from tests.fakes.http import Response as FakeResponse

Handler = Callable[[Request, FakeResponse], Awaitable[None]]
TIMEOUT = httpx.Timeout(connect=2.0, read=2.0, write=2.0, pool=2.0)


async def sse_reply(req: Request, resp: FakeResponse) -> None:
    await resp.start_stream()
    for i in range(50):
        await resp.write(f'data: {{"i":{i}}}\n\n')
    await resp.end()


async def serve(handler: Handler) -> FakeHTTPServer:
    return await FakeHTTPServer(handler).start()


@pytest.fixture
async def servers() -> AsyncIterator[list[FakeHTTPServer]]:
    started: list[FakeHTTPServer] = []
    yield started
    for s in started:
        await s.stop()


async def body_of(resp: Response) -> tuple[bytes, int]:
    reads = [b async for b in resp.aiter_bytes()]
    await resp.aclose()
    return b"".join(reads), len(reads)


async def eventually(check: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - the fake server exposes a counter, not an event
            await asyncio.sleep(0.005)


async def test_requests_share_one_keep_alive_connection(servers: list[FakeHTTPServer]) -> None:
    server = await serve(sse_reply)
    servers.append(server)
    pool = Pool(server.url + "/v1", max_connections=4, headers={"authorization": "Bearer k"})
    want = b"".join(f'data: {{"i":{i}}}\n\n'.encode() for i in range(50))
    for _ in range(3):
        resp = await pool.request("POST", "chat/completions", b'{"model":"m"}', TIMEOUT)
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        body, reads = await body_of(resp)
        assert body == want
        # The chunks a burst wrote come a network read at a time, not one by one.
        assert reads < 50
        assert server.open_connections == 1
    req = server.requests[0]
    assert (req.method, req.path, req.body) == ("POST", "/v1/chat/completions", b'{"model":"m"}')
    assert req.headers["authorization"] == "Bearer k"
    assert req.headers["host"] == f"127.0.0.1:{server.port}"
    await pool.aclose()


async def test_content_length_and_gzip_bodies(servers: list[FakeHTTPServer]) -> None:
    async def handler(req: Request, resp: FakeResponse) -> None:
        if req.path.endswith("/gz"):
            await resp.send(200, gzip.compress(b'{"ok":true}'), headers={"content-encoding": "gzip"})
        else:
            await resp.send(200, {"ok": True})

    server = await serve(handler)
    servers.append(server)
    pool = Pool(server.url, max_connections=2)
    for path, want in (("plain", b'{"ok": true}'), ("gz", b'{"ok":true}')):
        resp = await pool.request("GET", path, b"", TIMEOUT)
        assert await resp.aread() == want
        await resp.aclose()
    assert server.open_connections == 1
    await pool.aclose()


async def test_a_stall_is_a_read_timeout_and_drops_the_connection(servers: list[FakeHTTPServer]) -> None:
    async def stall(req: Request, resp: FakeResponse) -> None:
        await resp.start_stream()
        await resp.write("data: first\n\n")
        await asyncio.sleep(30)

    server = await serve(stall)
    servers.append(server)
    pool = Pool(server.url, max_connections=2)
    resp = await pool.request("POST", "x", b"{}", httpx.Timeout(2.0, read=0.2))
    reads = resp.aiter_bytes()
    assert await anext(reads) == b"data: first\n\n"
    with pytest.raises(httpx.ReadTimeout):
        await anext(reads)
    await resp.aclose()
    await asyncio.wait_for(server.disconnects.get(), 2)
    await pool.aclose()


async def test_closing_a_response_early_closes_the_upstream_at_once(servers: list[FakeHTTPServer]) -> None:
    async def endless(req: Request, resp: FakeResponse) -> None:
        await resp.start_stream()
        while True:
            await resp.write("data: more\n\n")
            await asyncio.sleep(0.01)

    server = await serve(endless)
    servers.append(server)
    pool = Pool(server.url, max_connections=2)
    resp = await pool.request("POST", "x", b"{}", TIMEOUT)
    assert await anext(resp.aiter_bytes())
    await resp.aclose()  # the caller went away
    await asyncio.wait_for(server.disconnects.get(), 1)
    await pool.aclose()


async def test_an_idle_connection_the_server_closed_is_not_reused(servers: list[FakeHTTPServer]) -> None:
    async def once(req: Request, resp: FakeResponse) -> None:
        await resp.send(200, {"n": len(server.requests)})
        resp.keep_alive = False  # the server closes after answering, without saying so

    server = await serve(once)
    servers.append(server)
    pool = Pool(server.url, max_connections=2)
    for n in (1, 2):
        resp = await pool.request("GET", "x", b"", TIMEOUT)
        assert (await resp.aread()) == f'{{"n": {n}}}'.encode()
        await resp.aclose()
        await eventually(lambda: server.open_connections == 0)
    await pool.aclose()


async def test_the_pool_limit_queues_then_times_out(servers: list[FakeHTTPServer]) -> None:
    release = asyncio.Event()

    async def held(req: Request, resp: FakeResponse) -> None:
        await resp.start_stream()
        await resp.write("data: x\n\n")
        await release.wait()
        await resp.end()

    server = await serve(held)
    servers.append(server)
    pool = Pool(server.url, max_connections=1)
    first = await pool.request("POST", "x", b"{}", TIMEOUT)
    with pytest.raises(httpx.PoolTimeout):
        await pool.request("POST", "x", b"{}", httpx.Timeout(2.0, pool=0.1))
    waiting = asyncio.create_task(pool.request("POST", "x", b"{}", TIMEOUT))
    release.set()
    await body_of(first)
    second = await asyncio.wait_for(waiting, 2)
    assert second.status_code == 200
    await second.aclose()
    await pool.aclose()


async def test_a_server_that_closes_mid_body_is_a_protocol_error(servers: list[FakeHTTPServer]) -> None:
    async def cut(req: Request, resp: FakeResponse) -> None:
        await resp.start_stream()
        await resp.write("data: partial\n\n")
        await resp.close()

    server = await serve(cut)
    servers.append(server)
    pool = Pool(server.url, max_connections=2)
    resp = await pool.request("POST", "x", b"{}", TIMEOUT)
    with pytest.raises(httpx.RemoteProtocolError):
        async for _ in resp.aiter_bytes():
            pass
    await resp.aclose()
    await pool.aclose()


async def test_nothing_listening_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=1)
    with pytest.raises(httpx.ConnectError):
        await pool.request("POST", "x", b"{}", TIMEOUT)
    # The slot is free again: the next attempt fails the same way instead of waiting.
    with pytest.raises(httpx.ConnectError):
        await pool.request("POST", "x", b"{}", httpx.Timeout(2.0, pool=0.1))


async def test_https_verifies_the_server_and_then_works(tmp_path) -> None:
    import ssl

    from tests.pki import make_pki

    pki = make_pki(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            await reader.read()  # until the client closes
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        untrusting = Pool(f"https://127.0.0.1:{port}", max_connections=1)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.request("GET", "x", b"", TIMEOUT)
        pool = Pool(f"https://127.0.0.1:{port}", max_connections=1)
        assert pool._ssl is not None
        pool._ssl.load_verify_locations(pki.ca)  # the test CA, as a private CA would be
        resp = await pool.request("GET", "x", b"", TIMEOUT)
        assert await resp.aread() == b"ok"
        await resp.aclose()
        await pool.aclose()
    finally:
        server.close()
        await server.wait_closed()
