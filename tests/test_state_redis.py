"""The Redis store on its own against a real redis-server: the keys it writes (one hash tag per
caller, every one with a TTL), stream-slot leases kept alive by the heartbeat and lost
without it, budgets judged during an outage by the spend last seen plus what is pending,
and the replay into a Redis that kept its data (append-only file) across its own restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker import errors
from broker.config import StateConfig
from broker.limits import KeyPolicy
from broker.metrics import BrokerMetrics
from broker.state.redis_state import RedisState
from broker.types import Cost, Usage
from tests.redisproc import (
    RedisProc,
    hang_guard,  # noqa: F401 (a fixture, for pytestmark)
    running_redis,
)

pytestmark = pytest.mark.usefixtures("hang_guard")

USD = 1_000_000


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisProc]:
    async with running_redis(tmp_path / "redis", persist=True) as server:
        yield server


@pytest.fixture
async def stores(redis: RedisProc) -> AsyncIterator[list[RedisState]]:
    made: list[RedisState] = []

    async def close() -> None:
        for s in made:
            await s.close()

    config = StateConfig(redis_url=redis.url, stream_lease_seconds=0.6, reconnect_max_backoff_seconds=0.2)
    for _ in range(2):
        s = RedisState(config, BrokerMetrics(process=False))
        await s.start()
        made.append(s)
    yield made
    await close()


async def spend(store: RedisState, policy: KeyPolicy, micro: int) -> None:
    t = await store.admit(policy)
    t.charge(Usage(input_tokens=1, output_tokens=1), Cost(known=True, input_micro_usd=micro))
    done = store.finish(t)
    if done is not None:
        await done


async def test_keys_share_the_callers_hash_tag_and_all_expire(
    stores: list[RedisState], redis: RedisProc
) -> None:
    a, _ = stores
    policy = KeyPolicy(
        "team-a",
        requests_per_minute=60,
        burst=60,
        tokens_per_minute=1000,
        max_streams=5,
        budget_day_micro_usd=USD,
    )
    t = await a.admit(policy)
    t.charge(Usage(input_tokens=10, output_tokens=5), Cost(known=True, input_micro_usd=7))
    done = a.finish(t)
    assert done is not None
    await done
    client = redis.client()
    try:
        keys = sorted(str(k) for k in await client.keys("*"))  # str: decode_responses
        assert all(k.startswith("modelbroker:{team-a}:") for k in keys), keys
        assert {k.split(":")[2] for k in keys} == {"rpm", "tpm", "day", "month"}  # the slot set emptied
        ttls = {k.split(":")[2]: await client.ttl(k) for k in keys}
        assert all(ttl > 0 for ttl in ttls.values()), ttls
        assert ttls["day"] > 86_400 - 1 - time.time() % 86_400, "a day's counters outlive the day"
        day = await client.hgetall(next(k for k in keys if ":day:" in k))
        assert day == {"requests": "1", "spend": "7", "input_tokens": "10", "output_tokens": "5"}
    finally:
        await client.aclose()


async def test_the_heartbeat_keeps_a_live_slot_and_a_dead_one_runs_out(stores: list[RedisState]) -> None:
    a, b = stores
    policy = KeyPolicy("slots", max_streams=1)
    held = await a.admit(policy)
    # Three leases long, the slot stays taken: A refreshes it every third of a lease.
    for _ in range(6):
        await asyncio.sleep(0.3)
        with pytest.raises(errors.CallerTooManyStreams):
            await b.admit(policy)
    assert held.slot
    await a.close()  # A stops without handing the slot back, as a killed replica would
    t0 = time.monotonic()
    while True:
        try:
            ticket = await b.admit(policy)
            break
        except errors.CallerTooManyStreams:
            assert time.monotonic() - t0 < 2.0, "the dead slot's lease never ran out"
            await asyncio.sleep(0.05)
    done = b.finish(ticket)
    assert done is not None
    await done
    assert (await b.usage([policy]))[0].streams_in_flight == 0


async def test_an_outage_judges_budgets_by_known_spend_and_replays_into_a_restarted_redis(
    stores: list[RedisState], redis: RedisProc
) -> None:
    a, b = stores
    policy = KeyPolicy("budget", budget_day_micro_usd=12 * USD)
    await spend(a, policy, 10 * USD)  # Redis: $10 (its append-only file keeps it)
    await redis.kill()
    await spend(a, policy, 5 * USD)  # the call that finds Redis gone: admitted in Redis, charge kept
    assert a.available is False
    with pytest.raises(errors.BudgetExceeded):  # $10 last seen + $5 pending >= $12, Redis or not
        await a.admit(policy)
    with pytest.raises(errors.StateUnavailable):
        await a.usage([policy])
    await redis.start()
    for _ in range(100):
        if a.available:
            break
        await asyncio.sleep(0.05)
    assert a.available, "the reconnect probe never saw Redis again"
    (u,) = await b.usage([policy])
    assert u.day.spend_micro_usd == 15 * USD and u.day.requests == 2
    with pytest.raises(errors.BudgetExceeded):
        await b.admit(policy)
    assert (
        a.metrics is not None
        and a.metrics.registry.get_sample_value("modelbroker_state_unavailable_total") == 1
    )


async def test_fail_closed_refuses_limited_keys_while_redis_is_away(redis: RedisProc) -> None:
    store = RedisState(StateConfig(redis_url=redis.url, on_unavailable="fail_closed"))
    await store.start()
    try:
        limited, free = KeyPolicy("limited", requests_per_minute=5, burst=5), KeyPolicy("free")
        await store.admit(limited)
        await redis.kill()
        with pytest.raises(errors.StateUnavailable) as e:
            await store.admit(limited)
        assert e.value.retry_after == 5.0 and "fail_closed" in e.value.message
        assert not store.ready()
        assert (await store.admit(free)).local
    finally:
        await store.close()
