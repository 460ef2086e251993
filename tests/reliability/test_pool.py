"""The broker's own connection pool: the default never refuses what the server admits, and a
pool that must refuse says so, never asks the upstream, and never marks the provider sick."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.reliability.conftest import FAST_ROUTING, openai_provider, stream, stub, unary, user

STREAMS = 300


def completions(fake: FakeOpenAI) -> int:
    return len([r for r in fake.requests if r.path.endswith("/chat/completions")])


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - the fake exposes a list, not an event
            await asyncio.sleep(0.01)


async def test_the_default_pool_serves_every_stream_the_server_admits(daemon, channel_to) -> None:
    # Before: 200 connections by default, and 300 of 500 streams failed after 5 s with
    # "no response within 60s" though the upstream was never asked.
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        fake.reply = Reply(text_chunks=["a", "b", "c"], chunk_delay=0.3)
        settings = broker_settings(
            [openai_provider("openai", fake.url)],
            routing=FAST_ROUTING,
            server={"max_concurrent_streams": STREAMS},
        )
        _, target = await daemon(settings)
        s = stub(channel_to(target))
        req = pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")])
        outs = await asyncio.wait_for(
            asyncio.gather(*(stream(s, req, timeout=20) for _ in range(STREAMS))), 30
        )
        assert [o.status for o in outs] == ["OK"] * STREAMS
        assert {o.text for o in outs} == {"abc"}
        assert len([r for r in fake.requests if r.path.endswith("/chat/completions")]) == STREAMS


async def test_a_full_pool_says_so_and_leaves_the_provider_healthy(daemon, channel_to) -> None:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake, FakeOpenAI(api_key=OPENAI_TEST_KEY) as spare:
        fake.reply = Reply(text_chunks=["slow"], chunk_delay=2.0)
        spare.reply = Reply(text_chunks=["spare"])
        settings = broker_settings(
            [
                openai_provider("openai", fake.url, max_connections=2, pool_timeout_seconds=0.3),
                openai_provider("spare", spare.url),
            ],
            routing=FAST_ROUTING,
            aliases={"either": ["openai/gpt-4o-mini", "spare/gpt-4o-mini"]},
        )
        _, target = await daemon(settings)
        ch = channel_to(target)
        s = stub(ch)
        req = pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")])
        holders = [asyncio.create_task(stream(s, req, timeout=10)) for _ in range(2)]
        await until(lambda: completions(fake) >= 2)

        refused = await unary(
            s, pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]), timeout=5
        )
        assert refused.status == "UNAVAILABLE BROKER_POOL_FULL"
        calls = [r for r in fake.requests if r.path.endswith("/chat/completions")]
        assert len(calls) == 2, "the refused request never reached the upstream"

        # The pool is the broker's limit, not the provider's fault: health stays SERVING,
        # and a fallback group moves on to another provider.
        health = health_pb2_grpc.HealthStub(ch)
        answer = await health.Check(health_pb2.HealthCheckRequest(service="provider/openai"), timeout=2)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        moved = await stream(s, pb.StreamCompleteRequest(model="either", messages=[user("hi")]), timeout=5)
        assert (moved.status, moved.provider, moved.text) == ("OK", "spare", "spare")

        done = await asyncio.gather(*holders)
        assert [o.status for o in done] == ["OK", "OK"]


async def test_a_deadline_shorter_than_the_pool_wait_bounds_it(daemon, channel_to) -> None:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        fake.reply = Reply(text_chunks=["slow"], chunk_delay=2.0)
        settings = broker_settings(
            [openai_provider("openai", fake.url, max_connections=1, pool_timeout_seconds=30)],
            routing={**FAST_ROUTING, "retry": {**FAST_ROUTING["retry"], "max_attempts": 1}},
        )
        _, target = await daemon(settings)
        s = stub(channel_to(target))
        req = pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")])
        holder = asyncio.create_task(stream(s, req, timeout=10))
        await until(lambda: completions(fake) >= 1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            await s.Complete(
                pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]), timeout=0.5
            )
            raise AssertionError("a full pool answered")
        except grpc.aio.AioRpcError as err:
            assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        assert loop.time() - t0 < 2.0, "the wait ended with the caller's deadline, not the 30 s pool timeout"
        assert (await holder).status == "OK"
