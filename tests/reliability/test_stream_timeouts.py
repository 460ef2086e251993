"""Time to first token and stall timeouts, per provider, inside a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply
from tests.reliability.conftest import FAST_ROUTING, openai_provider, stream, stub, unary, until, user


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeOpenAI]]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as slow, FakeOpenAI(api_key=OPENAI_TEST_KEY) as other:
        yield slow, other


@pytest.fixture
async def broker(fakes, daemon, channel_to):
    slow, other = fakes
    settings = broker_settings(
        [
            openai_provider("slow", slow.url, ttft_timeout_seconds=0.3, stall_timeout_seconds=0.5),
            openai_provider("other", other.url),  # defaults: 120 s and 60 s
        ],
        routing=FAST_ROUTING,
    )
    _, target = await daemon(settings)
    return stub(channel_to(target))


async def test_headers_without_a_first_token_is_a_ttft_timeout_and_moves_on(broker, fakes) -> None:
    slow, _ = fakes
    # 200 OK and the role chunk at once, the first content a second later: a TTFT problem.
    slow.reply = Reply(text_chunks=["late"], chunk_delay=1.0)
    alone = await unary(broker, pb.CompleteRequest(model="slow/gpt-4o-mini", messages=[user("hi")]))
    assert alone.status == "DEADLINE_EXCEEDED UPSTREAM_TIMEOUT"
    assert len(slow.chat_bodies) == 1, "a timeout is not retried on the same provider"
    out = await stream(
        broker,
        pb.StreamCompleteRequest(
            model="slow/gpt-4o-mini", messages=[user("hi")], fallback_models=["other/gpt-4o-mini"]
        ),
    )
    assert (out.status, out.provider) == ("OK", "other")

    async def closed() -> bool:
        return bool(slow.server.disconnects.qsize() >= 2)

    await until(closed, within=2, what="both timed-out requests closed upstream")


async def test_a_slow_but_steady_stream_is_not_a_stall(broker, fakes) -> None:
    slow, _ = fakes
    # 8 chunks 0.2 s apart: 1.6 s in all, over the 0.5 s stall limit, but never 0.5 s silent.
    slow.reply = Reply(text_chunks=[f"{i} " for i in range(8)], chunk_delay=0.2)
    out = await stream(broker, pb.StreamCompleteRequest(model="slow/gpt-4o-mini", messages=[user("hi")]))
    assert out.status == "OK" and out.deltas == 8


async def test_stall_limits_are_per_provider(broker, fakes) -> None:
    _, other = fakes
    # A 0.6 s pause would stall "slow" (0.5 s) but not "other" (default 60 s).
    other.reply = Reply(text_chunks=["a", "b"], chunk_delay=0.6)
    out = await stream(broker, pb.StreamCompleteRequest(model="other/gpt-4o-mini", messages=[user("hi")]))
    assert out.status == "OK" and out.text == "ab"


async def _stream_details(s: Any, model: str) -> tuple[str, str, int]:
    """(status, message, text deltas) of a StreamComplete that is expected to fail."""
    deltas = 0
    try:
        async for m in s.StreamComplete(
            pb.StreamCompleteRequest(model=model, messages=[user("hi")]), timeout=10
        ):
            deltas += m.HasField("text_delta")
    except grpc.aio.AioRpcError as err:
        return err.code().name, err.details() or "", deltas
    raise AssertionError("the stream was expected to fail")


async def test_a_stall_has_one_timer_and_one_message(daemon, channel_to) -> None:
    """Mid-stream silence is timed by the completion's timer alone, with one wording: its own
    limit (stall_timeout_seconds), or read_timeout_seconds when that is shorter."""
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as up:
        settings = broker_settings(
            [
                openai_provider("stall", up.url, stall_timeout_seconds=0.3),
                openai_provider("reads", up.url, read_timeout_seconds=0.4),  # stall: 60 s
            ],
            routing=FAST_ROUTING,
        )
        _, target = await daemon(settings)
        s = stub(channel_to(target))
        for model, limit in (("stall/gpt-4o-mini", "0.3"), ("reads/gpt-4o-mini", "0.4")):
            up.faults[:] = [Fault("stall_mid_stream", after_chunks=1, seconds=5)]
            code, details, deltas = await _stream_details(s, model)
            assert (code, deltas) == ("UNAVAILABLE", 1), details
            provider = model.split("/")[0]
            assert f"{provider}: stream stalled (no data for {limit}s)" in details, details
