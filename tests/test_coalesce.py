"""coalesced(): merge text deltas only for a caller that has fallen behind; keep every guarantee."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest

from broker.coalesce import COALESCE_BACKLOG, MAX_MERGED_CHARS, MAX_QUEUED, coalesced
from broker.types import ReasoningDeltaEvent, TextDeltaEvent, ToolCallDeltaEvent

T = TextDeltaEvent


async def burst(items: list[Any]) -> AsyncIterator[Any]:
    """An upstream that has everything ready at once (yields without ever waiting)."""
    for item in items:
        yield item


async def collect(source: AsyncIterator[Any], write_time: float = 0.0) -> list[Any]:
    """What a caller receives; each message takes `write_time` to write (grpc's write)."""
    got = []
    async with aclosing(coalesced(source)) as out:
        async for x in out:
            got.append(x)
            if write_time:
                await asyncio.sleep(write_time)
    return got


async def test_a_caller_that_keeps_up_gets_every_delta_on_its_own() -> None:
    async def paced() -> AsyncIterator[Any]:
        for i in range(30):
            await asyncio.sleep(0.001)  # the upstream is slower than the caller
            yield T(f"t{i} ")

    out = await collect(paced())
    assert out == [T(f"t{i} ") for i in range(30)]


async def test_a_caller_faster_than_a_burst_gets_every_delta_on_its_own() -> None:
    items = [T(str(i)) for i in range(50)]
    assert await collect(burst(items)) == items


async def test_a_short_backlog_keeps_its_granularity() -> None:
    items = ["start", *[T(str(i)) for i in range(COALESCE_BACKLOG - 1)]]
    assert await collect(burst(items), write_time=0.01) == items


async def test_a_backlog_is_merged_in_order_with_other_events_kept_apart() -> None:
    call = ToolCallDeltaEvent(index=0, id="c1", name="f", arguments_delta="{}")
    items: list[Any] = [
        "start",
        *[T(f"a{i}") for i in range(20)],
        call,
        *[T(f"b{i}") for i in range(20)],
        "end",
    ]
    # "start" reaches an idle caller and goes alone; the rest queues while it is written.
    out = await collect(burst(items), write_time=0.01)
    assert out == [
        "start",
        T("".join(f"a{i}" for i in range(20))),
        call,
        T("".join(f"b{i}" for i in range(20))),
        "end",
    ]


async def test_a_reasoning_backlog_merges_per_block_and_keeps_the_signature_last() -> None:
    R = ReasoningDeltaEvent
    items: list[Any] = [
        "start",
        *[R(0, f"x{i}") for i in range(12)],
        R(0, signature="SIG0"),
        R(1, redacted_data="OPAQUE"),
        *[R(2, f"y{i}") for i in range(12)],
        *[T(f"t{i}") for i in range(12)],
        "end",
    ]
    out = await collect(burst(items), write_time=0.01)
    assert out == [
        "start",
        R(0, "".join(f"x{i}" for i in range(12)), "SIG0"),  # the signature ends its block's run
        R(1, redacted_data="OPAQUE"),  # opaque blocks are never merged
        R(2, "".join(f"y{i}" for i in range(12))),
        T("".join(f"t{i}" for i in range(12))),
        "end",
    ]


async def test_a_merged_delta_stops_growing_at_the_size_limit() -> None:
    piece = "x" * (MAX_MERGED_CHARS // 4)
    out = await collect(burst(["start", *[T(piece) for i in range(COALESCE_BACKLOG + 4)]]), write_time=0.01)
    out = out[1:]
    assert "".join(x.text for x in out) == piece * (COALESCE_BACKLOG + 4)
    assert len(out) > 1 and all(len(x.text) <= MAX_MERGED_CHARS + len(piece) for x in out)


async def test_an_error_comes_after_everything_before_it() -> None:
    async def failing() -> AsyncIterator[Any]:
        yield "start"
        yield T("partial")
        raise RuntimeError("upstream broke")

    got: list[Any] = []
    with pytest.raises(RuntimeError, match="upstream broke"):
        async with aclosing(coalesced(failing())) as out:
            async for x in out:
                got.append(x)
    assert got == ["start", T("partial")]


class Upstream:
    """A source that never ends by itself, and records when it was closed."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed = asyncio.Event()

    async def stream(self) -> AsyncIterator[Any]:
        try:
            while True:
                self.sent += 1
                yield T("x")
                if self.sent % 3 == 0:
                    await asyncio.sleep(0)
        finally:
            self.closed.set()


async def test_cancelled_while_waiting_for_the_upstream_closes_it_before_returning() -> None:
    closed = asyncio.Event()
    first = asyncio.Event()

    async def slow_upstream() -> AsyncIterator[Any]:
        try:
            yield T("first")
            await asyncio.Event().wait()  # the model is thinking
            yield T("never")
        finally:
            closed.set()

    async def handler() -> None:
        async for _ in coalesced(slow_upstream()):
            first.set()

    task = asyncio.create_task(handler())
    await asyncio.wait_for(first.wait(), 5)
    await asyncio.sleep(0.01)  # the relay is now waiting for the upstream
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set(), "the upstream must be closed by the time the handler has returned"


async def test_cancelled_while_the_caller_is_busy_closes_the_upstream_promptly() -> None:
    # As when grpc is writing a message and the caller goes away: the relay is parked at
    # its yield and is closed by the event loop's async-generator finalizer.
    up = Upstream()
    received = asyncio.Event()

    async def handler() -> None:
        async for _ in coalesced(up.stream()):
            received.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(handler())
    await asyncio.wait_for(received.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(up.closed.wait(), 1)


async def test_closing_the_relay_closes_the_source() -> None:
    up = Upstream()
    relay = coalesced(up.stream())
    assert await anext(relay) == T("x")
    await relay.aclose()
    assert up.closed.is_set()


async def test_a_caller_that_stops_reading_stops_the_upstream_reads() -> None:
    up = Upstream()
    relay = coalesced(up.stream())
    await anext(relay)
    for _ in range(50):  # let the reader run as far as it can
        await asyncio.sleep(0)
    assert up.sent <= MAX_QUEUED + 2, "the read-ahead must be bounded"
    await relay.aclose()
    assert up.closed.is_set()
