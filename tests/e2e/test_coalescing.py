"""Through a real daemon: text deltas are merged only for a caller that has fallen behind."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings, stub
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        yield fake


@pytest.fixture
async def s(upstream, daemon, channel_to):
    provider = {"name": "openai", "type": "openai", "base_url": upstream.url, "api_key": OPENAI_TEST_KEY}
    _, target = await daemon(broker_settings([provider]))
    return stub(channel_to(target))


async def deltas(s, model: str = "openai/gpt-4o-mini") -> tuple[list[str], list[str]]:
    req = pb.StreamCompleteRequest(
        model=model, messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])]
    )
    kinds, texts = [], []
    async for m in s.StreamComplete(req, timeout=20):
        kinds.append(m.WhichOneof("event"))
        if m.HasField("text_delta"):
            texts.append(m.text_delta.text)
    return kinds, texts


async def test_a_burst_the_caller_cannot_keep_up_with_arrives_merged_and_whole(s, upstream) -> None:
    chunks = [f" w{i}" for i in range(300)]
    upstream.reply = Reply(text_chunks=chunks)  # written back to back, faster than any caller
    # In one piece: cut into random segments (MB_TEST_SEGMENT), each awaited, the burst can
    # arrive slowly enough for the caller to keep up, and then nothing is merged (rightly).
    upstream.server.segmenter = None
    kinds, texts = await deltas(s)
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert "".join(texts) == "".join(chunks), "merging must not lose, reorder or duplicate text"
    assert len(texts) < len(chunks)


async def test_a_caller_that_keeps_up_gets_every_delta(s, upstream) -> None:
    chunks = [f" w{i}" for i in range(10)]
    upstream.reply = Reply(text_chunks=chunks, chunk_delay=0.02)  # a model's pace
    _, texts = await deltas(s)
    assert texts == chunks
