"""Redis down or slow: the documented policy, no call left hanging, recovery when it returns.

- fail_open (the default), three real daemons under load: Redis SIGKILLed mid-load, every
  call still answered (per-process limits meanwhile) and none slow; each daemon logs
  `state_unavailable`, then `state_available` once Redis is back, and the charges made in
  the outage are replayed into it.
- fail_closed, one daemon: keys with limits are refused UNAVAILABLE STATE_UNAVAILABLE and
  readiness turns NOT_SERVING; a key with nothing to enforce still gets in; all back once
  Redis answers. `modelbroker_state_unavailable_total` counts the transition.
- a Redis that answers too slowly (DEBUG SLEEP) costs one call at most `state.timeout_seconds`.

The outage timeline is printed (run with -s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import Daemon as InProcess
from tests.conftest import broker_settings, reason_of, stub
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.redisproc import (
    RedisProc,
    hang_guard,  # noqa: F401 (a fixture, for pytestmark)
    running_redis,
)
from tests.state_cluster import PRICED, Cluster, bearer, config, key, user

pytestmark = pytest.mark.usefixtures("hang_guard")

UPSTREAM_KEY = "sk-test-openai-3f9a7c2e1b0d4e5f"
READINESS = "modelbroker.v1.ModelBroker"


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisProc]:
    async with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=UPSTREAM_KEY, models=["priced-model", "unpriced-model"]) as fake:
        fake.reply = Reply(text_chunks=["ok"], input_tokens=3, output_tokens=2)
        yield fake


async def test_fail_open_three_replicas_keep_serving_through_a_redis_crash_and_catch_up(
    tmp_path: Path, upstream: FakeOpenAI, redis: RedisProc
) -> None:
    c = Cluster(tmp_path, upstream)
    c.configure(
        config(
            upstream.url,
            redis.url,
            [key("load", requests_per_minute=100_000)],
            reconnect_max_backoff_seconds=0.5,
        )
    )
    daemons = await c.start(3)
    t0 = time.monotonic()
    calls: list[tuple[float, float, str]] = []  # (start, latency, outcome), times from t0
    stop = asyncio.Event()

    async def load(i: int) -> None:
        while not stop.is_set():
            began = time.monotonic()
            outcome = await daemons[i].complete("load", timeout=5)
            calls.append((began - t0, time.monotonic() - began, outcome))

    try:
        loaders = [asyncio.create_task(load(i)) for i in range(3)]
        await asyncio.sleep(1.0)
        killed = await redis.kill() - t0
        await asyncio.sleep(1.5)
        restarted_at = time.monotonic() - t0
        await redis.start()  # same port, empty: nothing persisted
        back = [False] * 3
        for _ in range(60):  # every daemon sees Redis again within its backoff (<= 0.5 s)
            back = [bool(d.logged("state_available")) for d in daemons]
            if all(back):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*loaders)

        outcomes = {o for _, _, o in calls}
        failed = [e for d in daemons for e in d.logged("request") if e.get("status") != "OK"]
        assert outcomes == {"OK"}, f"fail_open: every call is served, got {outcomes}: {failed[:3]}"
        slowest = max(latency for _, latency, _ in calls)
        assert slowest < 1.0, f"a call took {slowest:.2f}s: no call may wait on a dead Redis"
        assert all(back), "every daemon must log state_available once Redis is back"
        timeline = [f"t={killed:.2f}s redis-server SIGKILLed (load: 3 callers, one per replica)"]
        for n, d in enumerate(daemons, 1):
            down, up = d.logged("state_unavailable")[0], d.logged("state_available")[0]
            assert down["on_unavailable"] == "fail_open"
            timeline.append(
                f"replica {n}: state_unavailable ({down['error']}); state_available after {up['down_seconds']}s, {up['replayed_requests']} admissions replayed"
            )
        timeline.append(f"t={restarted_at:.2f}s redis-server started again")
        during = [x for x in calls if killed + 0.3 < x[0] and x[0] + x[1] < restarted_at]
        timeline.append(
            f"{len(calls)} calls, all OK, slowest {slowest * 1000:.0f} ms; {len(during)} wholly inside the outage"
        )

        # The outage's admissions were replayed into the new (empty) Redis, and from now on
        # every call is counted there again, by every replica.
        usage = (await daemons[0].usage("admin", "load")).keys[0]
        assert usage.day.requests >= len(during) > 0
        before = usage.day.requests
        for d in daemons:
            assert await d.complete("load") == "OK"
        after = (await daemons[2].usage("admin", "load")).keys[0].day.requests
        assert after - before == 3
        timeline.append(
            f"after recovery: Redis counts {before} requests (outage replayed), then +3 exactly for 3 more calls"
        )
        print("\n" + "\n".join(timeline))
    finally:
        stop.set()
        await c.close()


def settings_for(upstream: FakeOpenAI, redis: RedisProc, **state: Any) -> Any:
    return broker_settings(
        [{"name": "openai", "type": "openai", "base_url": upstream.url, "api_key": UPSTREAM_KEY,
          "models": ["priced-model"], "discovery": False}],
        auth={"keys": [key("limited", requests_per_minute=1000), key("free")]},
        models=[{"id": PRICED, "input_usd_per_mtok": 1, "output_usd_per_mtok": 1}],
        state={"redis_url": redis.url, **state},
    )  # fmt: skip


async def readiness(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        answer = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=READINESS), timeout=2
        )
        return int(answer.status)


async def outcome(ch: grpc.aio.Channel, who: str) -> str:
    try:
        await stub(ch).Complete(
            pb.CompleteRequest(model=PRICED, messages=[user()]), timeout=5, metadata=bearer(who)
        )
    except grpc.aio.AioRpcError as err:
        return f"{err.code().name} {reason_of(err)}"
    return "OK"


async def eventually(what: str, check: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds:g}s: {what}")


async def test_fail_closed_refuses_limited_keys_and_turns_readiness_off_until_redis_returns(
    upstream: FakeOpenAI, redis: RedisProc, daemon: InProcess, channel_to: Any
) -> None:
    server, target = await daemon(
        settings_for(upstream, redis, on_unavailable="fail_closed", reconnect_max_backoff_seconds=0.3)
    )
    ch = channel_to(target)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    await eventually("ready", lambda: _is(readiness(target), serving))
    assert await outcome(ch, "limited") == "OK"

    await redis.kill()
    t0 = time.monotonic()
    first = await outcome(ch, "limited")  # the call that meets the dead Redis
    took = time.monotonic() - t0
    assert first == "UNAVAILABLE STATE_UNAVAILABLE" and took < 1.0
    assert await outcome(ch, "limited") == "UNAVAILABLE STATE_UNAVAILABLE"
    assert await outcome(ch, "free") == "OK", "a key with nothing to enforce is not refused"
    await eventually("NOT_SERVING", lambda: _is(readiness(target), not_serving))
    registry = server.metrics.registry
    assert registry.get_sample_value("modelbroker_state_unavailable_total") == 1
    assert registry.get_sample_value("modelbroker_state_available") == 0
    refused = registry.get_sample_value(
        "modelbroker_refused_requests_total",
        {"rpc": "Complete", "status": "UNAVAILABLE", "reason": "STATE_UNAVAILABLE"},
    )
    assert refused == 2

    await redis.start()
    await eventually("SERVING again", lambda: _is(readiness(target), serving))
    assert await outcome(ch, "limited") == "OK"
    assert registry.get_sample_value("modelbroker_state_available") == 1
    # The free key's call during the outage was replayed into the new Redis.
    usage = await stub(ch).GetUsage(pb.GetUsageRequest(), timeout=5, metadata=bearer("free"))
    assert usage.keys[0].day.requests == 1


async def _is(answer: Any, want: int) -> bool:
    return bool(await answer == want)


async def test_a_slow_redis_costs_one_call_at_most_the_timeout(
    upstream: FakeOpenAI, redis: RedisProc, daemon: InProcess, channel_to: Any
) -> None:
    server, target = await daemon(settings_for(upstream, redis, timeout_seconds=0.2))
    ch = channel_to(target)
    assert await outcome(ch, "limited") == "OK"
    slow = redis.client()
    try:
        # Redis answers nothing for 1.5 s (a blocked server): admissions time out after 0.2 s.
        sleeping = asyncio.create_task(slow.execute_command("DEBUG", "SLEEP", "1.5"))  # type: ignore[no-untyped-call]
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        assert await outcome(ch, "limited") == "OK"  # fail_open: admitted by this process
        took = time.monotonic() - t0
        assert took < 1.0, f"the call took {took:.2f}s while Redis slept"
        assert server.metrics.registry.get_sample_value("modelbroker_state_degraded_admissions_total") == 1
        await sleeping
        gauge = "modelbroker_state_available"
        await eventually(
            "available again", lambda: _true(server.metrics.registry.get_sample_value(gauge) == 1)
        )
        assert server.metrics.registry.get_sample_value("modelbroker_state_unavailable_total") == 1
    finally:
        await slow.aclose()


async def _true(v: bool) -> bool:
    return v
