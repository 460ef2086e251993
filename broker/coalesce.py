"""Relaying a completion to a caller that may read slower than the upstream writes.

Each message the daemon sends a caller costs a gRPC write (serialisation, an HTTP/2 frame,
a syscall, a completion through grpc's poller): far more than reading one SSE chunk from
an upstream. When the caller keeps up, every text delta goes out on its own, as soon as
it arrives. When it falls behind (a slow client, a full HTTP/2 window, a busy daemon) by
COALESCE_BACKLOG outputs or more, the text deltas waiting for it are sent as one message:
fewer, larger writes, the same text in the same order, and nothing ever waits for more
data. A caller a few deltas behind still gets them one by one, so a short burst from the
upstream keeps its granularity. A merged delta stays below MAX_MERGED_CHARS (plus one
delta, itself at most completion.MAX_DELTA_CHARS), far below any gRPC message limit.

How: a reader task pulls the source (the completion) into a short queue while the
consumer (the servicer's StreamComplete loop) writes; each time the consumer comes back
for more, it takes everything queued and merges runs of consecutive TextDeltaEvents. The
queue is bounded, in outputs and in characters of text, so a caller that stops reading
stops the upstream reads too, and what waits for it stays a few MiB whatever the deltas weigh.

What does not change: the order of everything, where fallback ends (the completion
decides that before yielding its first content, as before), errors (raised to the
consumer after everything queued before them), and cancellation: when the consumer is
cancelled or closed, the reader task is cancelled and awaited, so the cancellation runs
through the completion and the provider and closes the upstream HTTP request before the
handler returns.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

from broker.types import ReasoningDeltaEvent, TextDeltaEvent, ToolCallDeltaEvent

T = TypeVar("T")

# Outputs read ahead of the caller, at most; beyond this the reader waits (backpressure).
MAX_QUEUED = 256
# ...and characters of text and tool-call arguments read ahead, at most (the reader waits
# once past it; a single larger output still goes through).
MAX_QUEUED_CHARS = 4 * 1024 * 1024
# Merging starts when this many outputs wait for the caller (the one about to be sent included).
COALESCE_BACKLOG = 8
# While reading ahead, the reader lets the event loop run after this many queued outputs.
YIELD_EVERY = 16
# A merged delta stops growing here, far below the gRPC message limit.
MAX_MERGED_CHARS = 64 * 1024


def _chars(item: object) -> int:
    if isinstance(item, (TextDeltaEvent, ReasoningDeltaEvent)):
        return len(item.text)
    if isinstance(item, ToolCallDeltaEvent):
        return len(item.arguments_delta)
    return 0


def _joins(first: ReasoningDeltaEvent, nxt: object) -> bool:
    """`nxt` continues `first`'s block: same index, and neither ends it nor is opaque."""
    return (
        isinstance(nxt, ReasoningDeltaEvent)
        and nxt.index == first.index
        and not (first.signature or first.redacted_data or nxt.redacted_data)
    )


def _merge_reasoning(item: ReasoningDeltaEvent, queue: deque[Any]) -> tuple[ReasoningDeltaEvent, int]:
    """A run of one block's reasoning deltas as one; a signature (the block's last delta)
    ends the run and stays on the merged delta. Returns it and the characters taken."""
    parts, size, taken, signature = [item.text], len(item.text), 0, ""
    while queue and size < MAX_MERGED_CHARS and not signature and _joins(item, queue[0]):
        nxt = queue.popleft()
        parts.append(nxt.text)
        size += len(nxt.text)
        taken += len(nxt.text)
        signature = nxt.signature
    return ReasoningDeltaEvent(item.index, "".join(parts), signature), taken


async def coalesced(source: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """`source`'s items in order, consecutive waiting TextDeltaEvents merged into one."""
    loop = asyncio.get_running_loop()
    queue: deque[T] = deque()
    consumer_waiting: asyncio.Future[None] | None = None
    reader_waiting: asyncio.Future[None] | None = None
    finished = False
    failure: Exception | None = None
    queued_chars = 0  # of the items in `queue` (see _chars)

    def wake_consumer() -> None:
        if consumer_waiting is not None and not consumer_waiting.done():
            consumer_waiting.set_result(None)

    async def read() -> None:
        nonlocal finished, failure, reader_waiting, queued_chars
        try:
            try:
                async for item in source:
                    queue.append(item)
                    queued_chars += _chars(item)
                    if consumer_waiting is not None and not consumer_waiting.done():
                        consumer_waiting.set_result(None)
                        # The caller was idle: let its write of this item start before reading
                        # on, so the first token is not held behind parsing the rest of a burst.
                        await asyncio.sleep(0)
                    elif len(queue) % YIELD_EVERY == 0:
                        # A burst is parsed without any I/O wait: let the loop run grpc's
                        # write completions now and then, so the caller is not kept waiting
                        # for the whole burst to be parsed.
                        await asyncio.sleep(0)
                    while len(queue) >= MAX_QUEUED or (queued_chars > MAX_QUEUED_CHARS and len(queue) > 1):
                        reader_waiting = loop.create_future()
                        await reader_waiting
            finally:
                # Wherever the reader stopped (cancelled mid-read or waiting for room in the
                # queue), the source is closed before the reader ends, and with it the upstream.
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()
        except Exception as exc:  # handed to the consumer, raised there after what came before it
            failure = exc
        finally:
            finished = True
            wake_consumer()

    reader = asyncio.create_task(read())
    try:
        while True:
            if not queue:
                if finished:
                    break
                consumer_waiting = loop.create_future()
                await consumer_waiting
                consumer_waiting = None
                continue
            item = queue.popleft()
            queued_chars -= _chars(item)
            if (
                isinstance(item, TextDeltaEvent)
                and len(queue) + 1 >= COALESCE_BACKLOG
                and isinstance(queue[0], TextDeltaEvent)
            ):
                parts = [item.text]
                size = len(item.text)
                while queue and size < MAX_MERGED_CHARS and isinstance(queue[0], TextDeltaEvent):
                    nxt = queue.popleft()
                    assert isinstance(nxt, TextDeltaEvent)
                    parts.append(nxt.text)
                    size += len(nxt.text)
                    queued_chars -= len(nxt.text)
                item = TextDeltaEvent("".join(parts))  # type: ignore[assignment]
            elif (
                isinstance(item, ReasoningDeltaEvent)
                and len(queue) + 1 >= COALESCE_BACKLOG
                and _joins(item, queue[0])
            ):
                item, merged = _merge_reasoning(item, queue)  # type: ignore[assignment]
                queued_chars -= merged
            if (
                reader_waiting is not None
                and not reader_waiting.done()
                and len(queue) < MAX_QUEUED
                and (queued_chars <= MAX_QUEUED_CHARS or len(queue) <= 1)
            ):
                reader_waiting.set_result(None)
            yield item
        if failure is not None:
            raise failure
    finally:
        if not reader.done():
            # The caller went away (or stopped reading us): stop the source now, which
            # closes the upstream, and wait for that before the handler returns.
            reader.cancel()
        # wait() does not raise the reader's CancelledError, but does raise our own.
        await asyncio.wait((reader,))
