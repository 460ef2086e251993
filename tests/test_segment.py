"""Segmentation: how the fakes cut their bytes, and the daemon reading chunked framing cut anywhere.

The unit tests pin `Segmenter` down (deterministic per seed, pieces join to the input, sizes
in bounds, exact cuts with `at()`), and one measures that each piece really reaches an
in-process client as its own read, which is what makes segmentation worth anything.

Then each fake's own streamed answer (OpenAI SSE, Anthropic SSE, Ollama NDJSON) is captured
once and delivered to a real daemon again and again, split at every byte position inside the
HTTP framing: inside each chunk-size line, between its `\\r` and `\\n`, inside the CRLF after
each chunk's data, inside the terminating `0\\r\\n\\r\\n` (and inside the blank line ending the
head). Every delivery must give the caller the exact text, finish reason and usage. Bad chunk
sizes (negative, not hex, past 64 bits) must end the call quickly with the documented status,
never hang it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import broker_settings, reason_of, stub
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.http import FakeHTTPServer, Request, Response, capture_response, sse
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.fakes.segment import ENV, Segmenter, from_env

# --- Segmenter -----------------------------------------------------------------------------------

DATA = bytes(range(256)) * 64  # 16 KiB


def test_off_is_one_piece() -> None:
    assert Segmenter("off").pieces(DATA) == [DATA]
    assert Segmenter("off").pieces(b"") == []


def test_random_is_deterministic_per_seed_and_joins_to_the_input() -> None:
    a, b, c = Segmenter("random", 7), Segmenter("random", 7), Segmenter("random", 8)
    pa, pb_, pc = a.pieces(DATA), b.pieces(DATA), c.pieces(DATA)
    assert pa == pb_ and pa != pc
    assert b"".join(pa) == DATA and b"".join(pc) == DATA
    # The stream goes on across calls, the same way for the same seed.
    assert a.pieces(DATA[:5000]) == b.pieces(DATA[:5000])


@pytest.mark.parametrize("max_piece", [1, 2, 7, 1500])
def test_random_pieces_stay_within_bounds(max_piece: int) -> None:
    seg = Segmenter("random", 3, max_piece=max_piece)
    sizes: list[int] = []
    for n in (1, 3, 10, 700, 4000, len(DATA)):
        pieces = seg.pieces(DATA[:n])
        assert b"".join(pieces) == DATA[:n]
        sizes += [len(p) for p in pieces]
    assert all(1 <= s <= max_piece for s in sizes)
    if max_piece == 1500:
        # Cuts are drawn over the whole stream: real variety, not one size.
        assert len(set(sizes)) > 5 and min(sizes) < 700


def test_cuts_land_inside_small_writes_too() -> None:
    # A 5-byte terminator after 2000 bytes is cut about 1 time in 150 per write by chance
    # alone; over the stream, cut points must fall inside short writes as often as anywhere.
    seg = Segmenter("random", 11, max_piece=64)
    split = sum(len(seg.pieces(b"0\r\n\r\n")) > 1 for _ in range(1000))
    assert split > 30


def test_at_cuts_at_exact_stream_offsets() -> None:
    assert Segmenter.at([3, 7]).pieces(b"0123456789") == [b"012", b"3456", b"789"]
    assert Segmenter.at([0, 10, 99]).pieces(b"0123456789") == [b"0123456789"]
    # Offsets count over the whole stream, across calls.
    seg = Segmenter.at([5, 6])
    assert seg.pieces(b"abc") == [b"abc"]
    assert seg.pieces(b"defg") == [b"de", b"f", b"g"]
    assert seg.pieces(b"hij") == [b"hij"]
    assert seg.position == 10


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    seg = from_env()
    assert seg is not None and (seg.mode, seg.seed, seg.max_piece) == ("random", 1, 1500)
    monkeypatch.setenv(ENV, "off")
    assert from_env() is None
    monkeypatch.setenv(ENV, "random:42")
    seg = from_env()
    assert seg is not None and (seg.mode, seg.seed) == ("random", 42)
    monkeypatch.setenv(ENV, "random:5:9")
    seg = from_env()
    assert seg is not None and (seg.seed, seg.max_piece) == (5, 9)
    monkeypatch.setenv(ENV, "sometimes")
    with pytest.raises(ValueError, match=ENV):
        from_env()


class _Recording(Segmenter):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.log: list[bytes] = []

    def pieces(self, data: bytes) -> list[bytes]:
        out = super().pieces(data)
        self.log += out
        return out


async def test_each_piece_reaches_an_in_process_client_as_its_own_read() -> None:
    """The property the whole mode rests on: no two pieces coalesce into one read."""
    seg = _Recording("random", 5, max_piece=40)

    async def handler(req: Request, resp: Response) -> None:
        await resp.start_stream(200)
        for i in range(20):
            await resp.write(sse({"i": i, "pad": "x" * i}))
        await resp.end()

    loop = asyncio.get_running_loop()
    reads: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    class Client(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            reads.append(data)
            if data.endswith(b"0\r\n\r\n") and not done.done():
                done.set_result(None)

    async with FakeHTTPServer(handler, segmenter=seg) as server:
        transport, _ = await loop.create_connection(Client, server.host, server.port)
        try:
            transport.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            await asyncio.wait_for(done, 5)
        finally:
            transport.close()
    assert b"".join(reads) == b"".join(seg.log)
    assert len(seg.log) > 40
    assert reads == seg.log, f"{len(seg.log)} pieces arrived in {len(reads)} reads"


# --- the daemon over chunked framing split at every position -------------------------------------

REPLY = Reply(text_chunks=["Split ", "any", "where", ", still whole."], input_tokens=21, output_tokens=8)
ANTHROPIC_KEY = "sk-ant-test-segment-0c1d"


@dataclass
class Fake:
    name: str
    make: Callable[[], Any]
    provider: Callable[[str], dict[str, Any]]
    model: str
    chat_path: str


FAKES = [
    Fake(
        "openai",
        lambda: FakeOpenAI(models=["gpt-4o-mini"]),
        lambda url: {"type": "openai", "base_url": url},
        "gpt-4o-mini",
        "/v1/chat/completions",
    ),
    Fake(
        "anthropic",
        lambda: FakeAnthropic(api_key=ANTHROPIC_KEY),
        lambda url: {"type": "anthropic", "base_url": url, "api_key": ANTHROPIC_KEY},
        "claude-sonnet-4-5",
        "/v1/messages",
    ),
    Fake(
        "ollama",
        lambda: FakeOllama(models=["llama3.2"]),
        lambda url: {"type": "ollama", "base_url": url},
        "llama3.2",
        "/api/chat",
    ),
]

# Fast retries, no breaker: a retried attempt still has to end within the test's bound.
ROUTING = {
    "retry": {"max_attempts": 2, "initial_backoff_seconds": 0.01, "max_backoff_seconds": 0.02},
    "breaker": {"consecutive_failures": 1000, "min_requests": 1000},
}


def framing_cuts(raw: bytes) -> list[int]:
    """Every offset inside the HTTP framing of a chunked response (not inside chunk data).

    For each chunk: after every byte of its size line (so inside the hex digits, between
    `\\r` and `\\n`, and right after the line), and at the CRLF after its data (before `\\r`,
    between `\\r` and `\\n`); inside the terminating `0\\r\\n\\r\\n`; and inside the `\\r\\n\\r\\n`
    ending the head.
    """
    head_end = raw.index(b"\r\n\r\n") + 4
    cuts = set(range(head_end - 3, head_end + 1))
    pos = head_end
    while True:
        line_end = raw.index(b"\r\n", pos)
        size = int(raw[pos:line_end].split(b";")[0], 16)
        cuts.update(range(pos + 1, line_end + 3))
        if size == 0:
            cuts.update(range(line_end + 2, line_end + 5))
            assert raw[line_end:] == b"\r\n\r\n", "a trailer-free terminator"
            break
        data_end = line_end + 2 + size
        assert raw[data_end : data_end + 2] == b"\r\n"
        cuts.update((data_end, data_end + 1))
        pos = data_end + 2
    return sorted(c for c in cuts if 0 < c < len(raw))


class SplitDelivery:
    """Serve a fake's captured streamed answer again, cut at one chosen offset per request."""

    def __init__(self, fake: Any, chat_path: str) -> None:
        self.fake = fake
        self.chat_path = chat_path
        self.inner = fake.server.handler
        self.raw: bytes | None = None
        self.cut: int | None = None
        self.served = 0
        fake.server.handler = self.handle

    async def handle(self, req: Request, resp: Response) -> None:
        if not (req.method == "POST" and req.path == self.chat_path):
            resp.segmenter = None
            await self.inner(req, resp)
            return
        if self.raw is None:
            self.raw = await capture_response(self.inner, req)
        resp.segmenter = Segmenter.at([self.cut]) if self.cut is not None else None
        await resp.write_raw(self.raw)
        resp.finished = True  # a whole chunked response: the connection may be reused
        self.served += 1


async def collect(s: Any, model: str, *, timeout: float = 5) -> tuple[str, pb.StreamEnd]:
    msgs = [
        m
        async for m in s.StreamComplete(
            pb.StreamCompleteRequest(
                model=model, messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])]
            ),
            timeout=timeout,
        )
    ]
    assert msgs and msgs[-1].HasField("end"), [m.WhichOneof("event") for m in msgs]
    return "".join(m.text_delta.text for m in msgs if m.HasField("text_delta")), msgs[-1].end


@pytest.fixture(params=FAKES, ids=[f.name for f in FAKES])
async def split_setup(request, daemon, channel_to) -> AsyncIterator[tuple[Fake, SplitDelivery, Any]]:
    case: Fake = request.param
    async with case.make() as fake:
        fake.reply = REPLY
        delivery = SplitDelivery(fake, case.chat_path)
        settings = broker_settings(
            [{"name": case.name, **case.provider(fake.url)}],
            health={"interval_seconds": 30, "timeout_seconds": 1},
            routing=ROUTING,
        )
        _, target = await daemon(settings)
        yield case, delivery, stub(channel_to(target))


async def test_a_split_anywhere_in_the_chunked_framing_changes_nothing(split_setup) -> None:
    case, delivery, s = split_setup
    model = f"{case.name}/{case.model}"
    async with asyncio.timeout(120):
        text, _ = await collect(s, model)  # unsplit: captures the fake's answer
        assert delivery.raw is not None and text == REPLY.text
        cuts = framing_cuts(delivery.raw)
        assert len(cuts) > 30
        wrong: list[str] = []
        slowest = 0.0
        for cut in cuts:
            delivery.cut = cut
            t0 = time.monotonic()
            try:
                text, end = await collect(s, model)
            except grpc.aio.AioRpcError as err:
                wrong.append(
                    f"cut at {cut} {delivery.raw[cut - 3 : cut + 3]!r}: {err.code().name} {err.details()}"
                )
                continue
            slowest = max(slowest, time.monotonic() - t0)
            got = (text, end.finish_reason, end.usage.input_tokens, end.usage.output_tokens)
            want = (REPLY.text, pb.FINISH_REASON_STOP, REPLY.input_tokens, REPLY.output_tokens)
            if got != want:
                wrong.append(f"cut at {cut} {delivery.raw[cut - 3 : cut + 3]!r}: {got}")
    assert not wrong, "\n".join(wrong)
    assert delivery.served == len(cuts) + 1
    print(f"segment {case.name}: {len(cuts)} framing cuts, all exact; slowest stream {slowest * 1000:.0f} ms")


# --- bad chunk sizes -----------------------------------------------------------------------------

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def openai_event(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return sse(
        {
            "id": "chatcmpl-seg",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


CONTENT = openai_event({"role": "assistant", "content": "Hi"})
BAD_SIZES = {
    "negative": b"-6\r\nabcdef\r\n",
    "not hex": b"zz\r\nabcdef\r\n",
    "past 64 bits": b"1ffffffffffffffff\r\nabcdef\r\n",
    "hex prefix": b"0x6\r\nabcdef\r\n",
}


class BadChunks:
    """An OpenAI-shaped stream whose chunk framing goes bad, first or after one content event."""

    def __init__(self, bad: bytes, after_content: bool) -> None:
        self.bad = bad
        self.after_content = after_content
        self.delivered = asyncio.Event()  # set by the test once the caller has the content
        self.chats = 0

    async def handle(self, req: Request, resp: Response) -> None:
        if req.method == "GET":
            await resp.send(200, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})
            return
        self.chats += 1
        await resp.write_raw(HEAD)
        # The head goes out alone, so the daemon has the response in hand when the bad
        # framing arrives in a later read (tests/hostile also sends it in the head's read).
        await asyncio.sleep(0.02)
        if self.after_content:
            await resp.write_raw(chunk(CONTENT))
            # The bad bytes follow only once the caller has seen the content, so the failure
            # is unambiguously mid-stream (not a parse error on bytes read together).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.delivered.wait(), 3)
        await resp.write_raw(self.bad + chunk(openai_event({}, "stop")) + chunk(b"data: [DONE]\n\n"))
        await resp.write_raw(b"0\r\n\r\n")
        await resp.close()


@pytest.mark.parametrize("after_content", [False, True], ids=["before-content", "after-content"])
@pytest.mark.parametrize("bad", list(BAD_SIZES), ids=list(BAD_SIZES))
async def test_a_bad_chunk_size_ends_the_call_quickly(
    bad: str, after_content: bool, daemon, channel_to
) -> None:
    fake = BadChunks(BAD_SIZES[bad], after_content)
    async with FakeHTTPServer(fake.handle) as server:
        settings = broker_settings(
            [
                {
                    "name": "up",
                    "type": "openai",
                    "base_url": f"{server.url}/v1",
                    "discovery": False,
                    "models": ["gpt-4o-mini"],
                }
            ],
            health={"interval_seconds": 30, "timeout_seconds": 1},
            routing=ROUTING,
        )
        _, target = await daemon(settings)
        s = stub(channel_to(target))
        texts: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async with asyncio.timeout(6):
                req = pb.StreamCompleteRequest(
                    model="up/gpt-4o-mini",
                    messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])],
                )
                async for m in s.StreamComplete(req, timeout=4):
                    if m.HasField("text_delta"):
                        texts.append(m.text_delta.text)
                        fake.delivered.set()
        took = time.monotonic() - t0
    code, reason = e.value.code(), reason_of(e.value)
    print(
        f"segment bad chunk size {bad!r} {'after content' if after_content else 'before content'}: "
        f"{code.name} {reason} in {took:.2f}s ({e.value.details()})"
    )
    want = "STREAM_INTERRUPTED" if after_content else "UPSTREAM_PROTOCOL_ERROR"
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, want), e.value.details()
    assert texts == (["Hi"] if after_content else [])
    assert took < 3, f"took {took:.2f}s"
