"""Retries: full-jitter backoff, Retry-After / retry-after-ms, the caller's deadline, the budget."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from broker import errors
from broker.config import RetryConfig
from broker.retry import RetryBudget, RetryPolicy
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault
from tests.reliability.conftest import FAST_ROUTING, openai_provider, settled, stream, stub, unary, user


def policy(**kw: object) -> RetryPolicy:
    return RetryPolicy(RetryConfig.model_validate(kw), rng=random.Random(7))


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    p = policy(initial_backoff_seconds=0.1, max_backoff_seconds=1.0)
    for attempt, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)):
        samples = [p.backoff(attempt) for _ in range(2000)]
        assert all(0 <= d <= cap for d in samples), attempt
        # Full jitter spreads over the whole range (not cap/2 + noise): both ends are used.
        assert min(samples) < cap * 0.05 and max(samples) > cap * 0.95, attempt


def test_delay_honours_retry_after_unless_a_fallback_waits_or_it_is_too_long() -> None:
    p = policy(max_attempts=3, max_retry_after_seconds=5)
    limited = errors.UpstreamRateLimited("429", retry_after=2.5)
    assert p.delay(limited, 1, deadline=None, fallback_waiting=False) == 2.5
    assert p.delay(limited, 1, deadline=None, fallback_waiting=True) is None, "a fallback beats waiting"
    long_wait = errors.UpstreamRateLimited("429", retry_after=30)
    assert p.delay(long_wait, 1, deadline=None, fallback_waiting=False) is None


def test_delay_never_runs_past_the_deadline() -> None:
    p = policy(max_attempts=3, max_retry_after_seconds=5)
    limited = errors.UpstreamRateLimited("429", retry_after=2.0)
    assert p.delay(limited, 1, deadline=101.0, fallback_waiting=False, now=100.0) is None
    assert p.delay(limited, 1, deadline=103.0, fallback_waiting=False, now=100.0) == 2.0
    down = errors.UpstreamUnavailable("503")
    assert p.delay(down, 1, deadline=100.0, fallback_waiting=False, now=100.0) is None


def test_delay_refuses_what_must_not_be_retried() -> None:
    p = policy(max_attempts=2)
    down = errors.UpstreamUnavailable("503")
    assert p.delay(down, 1, deadline=None, fallback_waiting=False) is not None
    assert p.delay(down, 2, deadline=None, fallback_waiting=False) is None, "attempts used up"
    assert p.delay(errors.UpstreamTimeout("slow"), 1, deadline=None, fallback_waiting=False) is None
    assert p.delay(errors.InvalidRequest([("a", "b")]), 1, deadline=None, fallback_waiting=False) is None


def test_budget_allows_a_floor_plus_a_ratio_of_requests_in_the_window() -> None:
    now = [0.0]
    cfg = RetryConfig(budget_ratio=0.5, budget_min_retries_per_second=0.1, budget_window_seconds=10)
    budget = RetryBudget(cfg, clock=lambda: now[0])
    assert budget.try_spend() and not budget.try_spend(), "floor: 0.1/s x 10 s = 1 retry"
    for _ in range(4):
        budget.record_request()
    assert budget.try_spend() and budget.try_spend()  # 1 + 0.5 x 4 = 3 in all
    assert not budget.try_spend()
    now[0] = 11.0  # everything left the window
    assert budget.try_spend() and not budget.try_spend()


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        yield fake


def req() -> pb.CompleteRequest:
    return pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")])


async def broker_with(upstream: FakeOpenAI, daemon, channel_to, **retry: object):
    routing = {**FAST_ROUTING, "retry": {**FAST_ROUTING["retry"], **retry}}
    server, target = await daemon(broker_settings([openai_provider("openai", upstream.url)], routing=routing))
    return server, stub(channel_to(target))


async def test_a_transient_5xx_is_retried_on_the_same_provider(upstream, daemon, channel_to) -> None:
    server, s = await broker_with(upstream, daemon, channel_to)
    for call, fault in ((unary, Fault("status", status=503)), (stream, Fault("reset_before_headers"))):
        upstream.faults.append(fault)
        before_calls = len(upstream.chat_bodies)
        before = set(asyncio.all_tasks())
        r = pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")])
        out = await (unary(s, req()) if call is unary else stream(s, r))
        assert out.status == "OK" and out.text == "Hello there!"
        assert len(upstream.chat_bodies) == before_calls + 2
        assert await settled(server, before) == []


async def test_retry_after_ms_is_waited_out(upstream, daemon, channel_to) -> None:
    _, s = await broker_with(upstream, daemon, channel_to, initial_backoff_seconds=0, max_backoff_seconds=0)
    upstream.faults.append(Fault("status", status=429, headers={"retry-after-ms": "400"}))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = await unary(s, req())
    assert out.status == "OK"
    assert len(upstream.chat_bodies) == 2
    # The backoff is 0 here, so only the server's own delay can account for the wait.
    assert loop.time() - t0 >= 0.4


async def test_retry_after_past_the_deadline_is_not_waited(upstream, daemon, channel_to) -> None:
    _, s = await broker_with(upstream, daemon, channel_to, max_retry_after_seconds=60)
    upstream.faults.append(Fault("status", status=429, headers={"retry-after": "3"}))
    out = await unary(s, req(), timeout=2.0)
    # The caller hears the rate limit and when to come back, not a deadline it would have hit.
    assert out.status == "RESOURCE_EXHAUSTED UPSTREAM_RATE_LIMITED"
    assert out.retry_delay == 3.0
    assert len(upstream.chat_bodies) == 1


async def test_the_budget_caps_retries_against_a_failing_provider(upstream, daemon, channel_to) -> None:
    # No ratio, a floor of 2 retries per 10 s: five failing requests get two retries in all.
    _, s = await broker_with(
        upstream,
        daemon,
        channel_to,
        budget_ratio=0,
        budget_min_retries_per_second=0.2,
        budget_window_seconds=10,
    )
    upstream.faults[:] = [Fault("status", status=500)] * 20
    for _ in range(5):
        assert (await unary(s, req())).status == "UNAVAILABLE UPSTREAM_UNAVAILABLE"
    assert len(upstream.chat_bodies) == 5 + 2
