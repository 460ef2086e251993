"""The replay server itself: raw captures go out byte for byte, the others re-framed as SOURCES.md says."""

from __future__ import annotations

import asyncio

from tests.fakes.segment import Segmenter
from tests.replay import harness
from tests.replay.server import ReplayServer, Wire, recorded_wire


async def _fetch(server: ReplayServer) -> bytes:
    """One request on a raw socket (Connection: close), everything the server sent back."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /v1/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def _dechunk(body: bytes) -> tuple[list[bytes], bytes]:
    chunks: list[bytes] = []
    rest = body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks, rest
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


async def test_a_raw_http11_capture_is_sent_byte_for_byte() -> None:
    rec = harness.load("ol-text-stream")
    wire = recorded_wire(rec)
    wire.segmenter = lambda: Segmenter("random", 3, max_piece=7)
    async with ReplayServer(lambda _: wire) as server:
        got = await _fetch(server)
    assert got == rec["response"]["raw"].encode()
    assert b"\r\nb48\r\n" in got  # its own chunk framing, kept


async def test_a_recorded_stream_is_reframed_one_chunk_per_event() -> None:
    rec = harness.load("an-text")
    wire = recorded_wire(rec)
    async with ReplayServer(lambda _: wire) as server:
        got = await _fetch(server)
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    names = [line.split(":", 1)[0].lower() for line in lines[1:]]
    assert (
        names.count("transfer-encoding") == 1 and "connection" not in names and "content-length" not in names
    )
    chunks, trailer = _dechunk(body)
    assert trailer == b"\r\n"
    assert b"".join(chunks) == rec["response"]["body"].encode()
    assert all(c.endswith(b"\n\n") for c in chunks) and len(chunks) > 5  # one SSE event each


async def test_a_whole_body_gets_a_content_length_and_paced_parts_arrive_apart() -> None:
    rec = harness.load("oa-400-context-length")
    wire = recorded_wire(rec)
    async with ReplayServer(lambda _: wire) as server:
        got = await _fetch(server)
    head, _, body = got.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head and body == rec["response"]["body"].encode()

    paced = Wire([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", b"a", b"b"], pace_seconds=0.1)
    async with ReplayServer(lambda _: paced) as server:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await _fetch(server)).endswith(b"\r\n\r\nab")
        assert loop.time() - t0 >= 0.2


async def test_requests_are_recorded_with_their_bodies() -> None:
    async with ReplayServer(lambda _: recorded_wire(harness.load("oa-404-model"))) as server:
        await _fetch(server)
    assert [(r.method, r.path, r.json()) for r in server.requests] == [("POST", "/v1/x", {})]
