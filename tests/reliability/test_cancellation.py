"""Cancellation and deadlines close the upstream HTTP request at once (within 100 ms).

The fake upstream notes the moment it sees the broker close the connection
(`server.disconnects`, the same event loop's clock as the test's); the test notes the
moment its caller cancelled, or its deadline passed. Generation that nobody will read
must stop costing money, so the gap is asserted and reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply
from tests.reliability.conftest import FAST_ROUTING, openai_provider, settled, stub, until, user

LIMIT_MS = 100.0
RUNS = 5
# A long, slow answer: the caller always goes away while the upstream is still generating.
SLOW = Reply(text_chunks=[f"tok{i} " for i in range(100)], chunk_delay=0.05)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        fake.reply = SLOW
        yield fake


@pytest.fixture
async def broker(upstream, daemon, channel_to):
    server, target = await daemon(
        broker_settings([openai_provider("openai", upstream.url)], routing=FAST_ROUTING)
    )
    return server, stub(channel_to(target))


async def closed_at(upstream: FakeOpenAI) -> float:
    return await asyncio.wait_for(upstream.server.disconnects.get(), 2.0)


async def wait_for_chat(upstream: FakeOpenAI, count: int) -> None:
    async def arrived() -> bool:
        return len(upstream.chat_bodies) >= count

    await until(arrived, within=5, what=f"{count} chat requests upstream")


def request() -> pb.StreamCompleteRequest:
    return pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("write a lot")])


async def test_stream_cancel_closes_the_upstream(broker, upstream, report) -> None:
    server, s = broker
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    for _ in range(RUNS):
        before = set(asyncio.all_tasks())
        call = s.StreamComplete(request(), timeout=10)
        deltas = 0
        async with asyncio.timeout(5):
            async for m in call:
                deltas += m.HasField("text_delta")
                if deltas == 2:
                    break
        cancelled = loop.time()
        call.cancel()
        gaps.append((await closed_at(upstream) - cancelled) * 1000)
        assert await settled(server, before) == []
    report.cancel_ms["StreamComplete, caller cancels mid-stream"] = gaps
    assert max(gaps) < LIMIT_MS, gaps


async def test_unary_cancel_closes_the_upstream(broker, upstream, report) -> None:
    server, s = broker
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    for i in range(RUNS):
        before = set(asyncio.all_tasks())
        call = s.Complete(pb.CompleteRequest.FromString(request().SerializeToString()), timeout=10)
        await wait_for_chat(upstream, i + 1)
        await asyncio.sleep(0.1)  # the answer is streaming into the broker's buffer
        cancelled = loop.time()
        call.cancel()
        gaps.append((await closed_at(upstream) - cancelled) * 1000)
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await settled(server, before) == []
    report.cancel_ms["Complete, caller cancels while the broker buffers"] = gaps
    assert max(gaps) < LIMIT_MS, gaps


async def test_deadline_mid_stream_closes_the_upstream(broker, upstream, report) -> None:
    server, s = broker
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    for _ in range(RUNS):
        before = set(asyncio.all_tasks())
        timeout = 0.4
        deadline = loop.time() + timeout
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _m in s.StreamComplete(request(), timeout=timeout):
                pass
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gaps.append((await closed_at(upstream) - deadline) * 1000)
        assert await settled(server, before) == []
    report.cancel_ms["StreamComplete, deadline passes mid-stream"] = gaps
    assert max(gaps) < LIMIT_MS, gaps


async def test_deadline_bounds_the_wait_for_headers(broker, upstream, report) -> None:
    """An upstream that says nothing: the caller's remaining deadline is the upstream timeout."""
    server, s = broker
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    for _ in range(3):
        upstream.faults.append(Fault("stall_before_headers", seconds=10))
        before = set(asyncio.all_tasks())
        timeout = 0.4
        deadline = loop.time() + timeout
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.Complete(
                pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("x")]), timeout=timeout
            )
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gaps.append((await closed_at(upstream) - deadline) * 1000)
        assert await settled(server, before) == []
    report.cancel_ms["Complete, deadline passes before the upstream answers"] = gaps
    assert max(gaps) < LIMIT_MS, gaps
    assert len(upstream.chat_bodies) == 3, "a request past its deadline must not be retried"
