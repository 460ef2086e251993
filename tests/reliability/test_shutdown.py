"""Graceful shutdown of a real `model-broker serve` process on SIGTERM and SIGINT.

The order a platform relies on: every health status turns NOT_SERVING (and open Watch
streams end, so they cannot hold the drain), new RPCs are refused, every in-flight stream
finishes normally within `shutdown_grace_seconds`, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.procs import ServeDaemon, start_serve, write_config
from tests.reliability.conftest import openai_provider, stub, until, user

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WORDS = [f"w{i} " for i in range(12)]
GRACE = 20.0


Daemon = ServeDaemon


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        fake.reply = Reply(text_chunks=WORDS, chunk_delay=0.1)  # each stream lasts about 1.3 s
        yield fake


@pytest.fixture
async def serve(upstream: FakeOpenAI, tmp_path: Path) -> AsyncIterator[Daemon]:
    config = {
        "providers": [openai_provider("openai", upstream.url)],
        "health": {"interval_seconds": 0.5},
        "server": {"shutdown_grace_seconds": GRACE},
    }
    proc = await start_serve(write_config(config, tmp_path))
    daemon = Daemon(proc)
    try:
        await asyncio.wait_for(daemon.serving.wait(), 30)
        yield daemon
    finally:
        await daemon.close()


async def one_stream(
    s, started: asyncio.Event, count: list[int], total: int
) -> list[pb.StreamCompleteResponse]:
    msgs: list[pb.StreamCompleteResponse] = []
    req = pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("count")])
    async for m in s.StreamComplete(req, timeout=GRACE + 10):
        msgs.append(m)
        if len(msgs) == 1:
            count[0] += 1
            if count[0] == total:
                started.set()
    return msgs


@pytest.mark.parametrize(
    ("sig", "streams"), [(signal.SIGTERM, 100), (signal.SIGINT, 20)], ids=["SIGTERM", "SIGINT"]
)
async def test_signal_drains_in_flight_streams_and_exits_0(serve: Daemon, sig: int, streams: int) -> None:
    target = f"127.0.0.1:{serve.port}"
    async with (
        grpc.aio.insecure_channel(target) as health_channel,
        grpc.aio.insecure_channel(target) as work_channel,
    ):
        health = health_pb2_grpc.HealthStub(health_channel)
        ready = health_pb2.HealthCheckRequest(service="modelbroker.v1.ModelBroker")

        async def is_ready() -> bool:
            return bool((await health.Check(ready, timeout=5)).status == SERVING)

        await until(is_ready, within=10, what="readiness SERVING")
        watch = health.Watch(ready, timeout=GRACE + 10)
        assert (await watch.read()).status == SERVING

        s = stub(work_channel)
        started, count = asyncio.Event(), [0]
        tasks = [asyncio.create_task(one_stream(s, started, count, streams)) for _ in range(streams)]
        try:
            await asyncio.wait_for(started.wait(), 15)  # every stream is under way
            serve.proc.send_signal(sig)

            # 1. health turns NOT_SERVING, and the Watch then ends instead of holding the drain
            assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
            assert await asyncio.wait_for(watch.read(), 5) is grpc.aio.EOF
            # 2. a new RPC is refused
            async with grpc.aio.insecure_channel(target) as late_channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub(late_channel).Complete(
                        pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("late")]), timeout=5
                    )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # 3. every in-flight stream completes normally
            results = await asyncio.wait_for(asyncio.gather(*tasks), GRACE)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    for msgs in results:
        kinds = [m.WhichOneof("event") for m in msgs]
        assert kinds[0] == "start" and kinds[-1] == "end"
        assert "".join(m.text_delta.text for m in msgs if m.HasField("text_delta")) == "".join(WORDS)
        assert msgs[-1].end.finish_reason == pb.FINISH_REASON_STOP

    # 4. the process exits 0, having logged each step
    assert await asyncio.wait_for(serve.proc.wait(), GRACE) == 0
    await serve.output_closed()
    names = [e.get("event") for e in serve.events]
    assert names.index("shutdown_requested") < names.index("health_shutdown") < names.index("stopped")
    ok = [e for e in serve.logged("request") if e.get("rpc") == "StreamComplete" and e.get("status") == "OK"]
    assert len(ok) == streams
