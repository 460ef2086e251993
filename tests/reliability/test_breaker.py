"""Circuit breakers: the state machine on a manual clock, then a real provider failing and recovering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker import errors
from broker.breaker import BreakerState, CircuitBreaker, counts_against_provider
from broker.config import BreakerConfig
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault
from tests.reliability.conftest import (
    FAST_ROUTING,
    openai_provider,
    settled,
    stream,
    stub,
    unary,
    until,
    user,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(b: CircuitBreaker) -> BreakerState:
    """Read through a call: mypy would otherwise keep an earlier assert's narrowing of b.state."""
    return b.state


def breaker(**kw: object) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(BreakerConfig.model_validate(kw), clock=clock), clock


def test_consecutive_failures_open_it_and_a_success_resets_the_count() -> None:
    b, _ = breaker(consecutive_failures=3, cooldown_seconds=10)
    assert not b.failure("500") and not b.failure("500")
    b.success()
    assert not b.failure("500") and not b.failure("500")
    assert state(b) is BreakerState.CLOSED
    assert b.failure("503") is True
    assert state(b) is BreakerState.OPEN and not b.acquire()
    assert "3 consecutive failures" in b.open_reason and "503" in b.open_reason


def test_error_rate_over_the_window_opens_it() -> None:
    b, clock = breaker(consecutive_failures=100, error_rate=0.5, min_requests=10, window_seconds=30)
    for i in range(10):  # alternate: never 100 in a row, but half of them fail
        clock.now += 1
        opened = b.failure("500") if i % 2 else b.success()
    assert opened is True and b.is_open
    assert "5 of the last 10" in b.open_reason


def test_old_outcomes_leave_the_window() -> None:
    b, clock = breaker(consecutive_failures=100, error_rate=0.5, min_requests=4, window_seconds=10)
    b.failure("x")
    b.failure("x")
    clock.now += 11  # those two are forgotten
    b.success()
    b.success()
    b.success()
    assert not b.failure("x"), "1 of 4 in the window is under the rate"
    assert state(b) is BreakerState.CLOSED


def test_cooldown_then_one_half_open_trial() -> None:
    b, clock = breaker(consecutive_failures=1, cooldown_seconds=10)
    b.failure("boom")
    clock.now += 9.5
    assert b.is_open and b.retry_in() == pytest.approx(0.5)
    clock.now += 0.5
    assert state(b) is BreakerState.HALF_OPEN
    assert b.acquire() is True
    assert b.acquire() is False, "only one trial at a time"
    b.release()  # the trial said nothing (the caller cancelled): the next request is the trial
    assert b.acquire() is True
    assert b.success() is True and state(b) is BreakerState.CLOSED
    assert b.acquire() and b.acquire()


def test_a_failed_trial_reopens_for_a_new_cooldown() -> None:
    b, clock = breaker(consecutive_failures=1, cooldown_seconds=10)
    b.failure("boom")
    clock.now += 10
    assert b.acquire()
    assert b.failure("still down") is True
    assert b.is_open and b.retry_in() == pytest.approx(10)
    assert "half-open trial failed" in b.open_reason


def test_disabled_breaker_never_opens() -> None:
    b, _ = breaker(enabled=False, consecutive_failures=1)
    for _ in range(5):
        assert b.acquire() and not b.failure("x")
    assert state(b) is BreakerState.CLOSED


def test_only_the_providers_failures_count() -> None:
    assert counts_against_provider(errors.UpstreamUnavailable("503"))
    assert counts_against_provider(errors.UpstreamTimeout("slow"))
    assert counts_against_provider(errors.UpstreamProtocolError("bad json"))
    for neutral in (
        errors.UpstreamRateLimited("429"),
        errors.UpstreamAuthFailed("401"),
        errors.InvalidRequest([("x", "y")]),
        errors.ContextLengthExceeded("too long"),
        errors.ModelNotFound("404"),
    ):
        assert not counts_against_provider(neutral), neutral


# --- end to end -------------------------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        yield fake


async def health(channel, service: str) -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(resp.status)


async def wait_health(channel, service: str, want: int, within: float) -> None:
    async def reached() -> bool:
        return await health(channel, service) == want

    await until(reached, within=within, what=f"{service!r} becomes {want}")


async def test_breaker_opens_turns_health_not_serving_then_recovers(upstream, daemon, channel_to) -> None:
    routing = {
        "retry": {**FAST_ROUTING["retry"], "max_attempts": 1},
        "breaker": {"consecutive_failures": 3, "cooldown_seconds": 1.0},
    }
    server, target = await daemon(broker_settings([openai_provider("openai", upstream.url)], routing=routing))
    channel = channel_to(target)
    s = stub(channel)
    req = pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")])
    assert await health(channel, "provider/openai") == SERVING

    upstream.faults[:] = [Fault("status", status=500)] * 3
    before = set(asyncio.all_tasks())
    for _ in range(3):
        assert (await unary(s, req)).status == "UNAVAILABLE UPSTREAM_UNAVAILABLE"
    # Opened by the third failure: health follows at once, not at the next check round.
    assert await health(channel, "provider/openai") == NOT_SERVING
    assert await health(channel, "modelbroker.v1.ModelBroker") == NOT_SERVING, (
        "readiness: no provider serving"
    )
    assert await health(channel, "") == SERVING, "liveness never depends on providers"
    info = (await s.ListProviders(pb.ListProvidersRequest(), timeout=5)).providers[0]
    assert info.breaker_state == pb.BREAKER_STATE_OPEN
    assert info.health == pb.PROVIDER_HEALTH_NOT_SERVING
    assert info.last_error.startswith("circuit breaker open: 3 consecutive failures")

    # While open the provider is not called at all: the caller fails fast, told when to retry.
    calls = len(upstream.chat_bodies)
    fast = await stream(s, pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]))
    assert fast.status == "UNAVAILABLE NO_HEALTHY_PROVIDER"
    assert fast.retry_delay is not None and 0 < fast.retry_delay <= 1.0
    assert len(upstream.chat_bodies) == calls
    assert await settled(server, before) == []

    # The upstream is fixed; after the cooldown the breaker lets a trial through (health
    # SERVING again so traffic can come), and the trial's success closes it.
    await wait_health(channel, "provider/openai", SERVING, within=1.0 + 2 * 0.2 + 2.0)
    info = (await s.ListProviders(pb.ListProvidersRequest(), timeout=5)).providers[0]
    assert info.breaker_state == pb.BREAKER_STATE_HALF_OPEN
    ok = await unary(s, req)
    assert ok.status == "OK" and ok.provider == "openai"
    info = (await s.ListProviders(pb.ListProvidersRequest(), timeout=5)).providers[0]
    assert info.breaker_state == pb.BREAKER_STATE_CLOSED
    assert await health(channel, "modelbroker.v1.ModelBroker") == SERVING


@pytest.mark.parametrize(("readiness", "ready"), [("any", SERVING), ("all", NOT_SERVING)])
async def test_open_breaker_routes_to_the_fallback_without_calling_the_provider(
    daemon, channel_to, readiness: str, ready: int
) -> None:
    routing = {
        "retry": {**FAST_ROUTING["retry"], "max_attempts": 1},
        "breaker": {"consecutive_failures": 2, "cooldown_seconds": 30},
    }
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as primary, FakeOpenAI(api_key=OPENAI_TEST_KEY) as backup:
        settings = broker_settings(
            [openai_provider("primary", primary.url), openai_provider("backup", backup.url)],
            routing=routing,
            health={"interval_seconds": 0.2, "timeout_seconds": 1.0, "readiness": readiness},
        )
        _, target = await daemon(settings)
        channel = channel_to(target)
        s = stub(channel)
        req = pb.CompleteRequest(
            model="primary/gpt-4o-mini", messages=[user("hi")], fallback_models=["backup/gpt-4o-mini"]
        )
        primary.faults[:] = [Fault("status", status=503)] * 2
        for _ in range(2):  # each fails over to the backup, and counts against the primary
            assert (await unary(s, req)).provider == "backup"
        assert await health(channel, "provider/primary") == NOT_SERVING
        # Readiness follows the policy over provider health, breakers included.
        assert await health(channel, "modelbroker.v1.ModelBroker") == ready
        calls = len(primary.chat_bodies)
        for _ in range(3):
            assert (await unary(s, req)).provider == "backup"
        assert len(primary.chat_bodies) == calls, "an open breaker means the provider is skipped"
