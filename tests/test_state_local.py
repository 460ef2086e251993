"""The state's pieces without Redis: budget windows, the config it reads, the per-process store,
and the warnings `serve` prints. No clock is waited on: windows take the time as an argument,
and buckets are sized so nothing refills during a test."""

from __future__ import annotations

import datetime as dt

import pytest

from broker import errors
from broker.config import ConfigError, settings_from_dict
from broker.limits import KeyPolicy
from broker.redact import redact
from broker.state import Charge, Ticket, state_warnings
from broker.state.budget import check, windows
from broker.state.local_state import LocalState
from broker.types import Cost, Usage
from tests.state_cluster import key


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()


def test_windows_are_the_utc_day_and_month_and_roll_over_at_their_ends() -> None:
    day, month = windows(at(2025, 12, 31, 23, 59, 59))
    assert (day.id, month.id) == ("20251231", "202512")
    assert day.reset == at(2026, 1, 1) and month.reset == at(2026, 1, 1)
    assert day.label == "2025-12-31" and month.label == "2025-12"
    day, month = windows(at(2024, 2, 29, 12))
    assert month.start == at(2024, 2, 1) and month.reset == at(2024, 3, 1)
    assert day.expire_at == at(2024, 3, 2), "a day's counters are kept one more day"
    assert windows(at(2026, 1, 1))[0].id == "20260101"


def test_windows_remembered_within_a_day_are_the_windows_computed_afresh() -> None:
    from broker.state import budget

    instants = [at(2025, 12, 31, 23, 59, 59), at(2025, 12, 31, 23, 59, 59) + 0.999, at(2026, 1, 1)]
    instants += [at(2026, 1, 1) - 1e-6, at(2026, 1, 1, 0, 0, 1), at(2024, 2, 29), at(2024, 2, 28, 23, 59, 59)]
    instants += [at(2024, 3, 1), at(2024, 2, 29, 12), at(2030, 6, 15, 8), 0.0, at(2024, 3, 1) - 0.5]
    for now in instants + instants[::-1]:
        assert windows(now) == budget._windows(now), now
        assert windows(now) == budget._windows(now), now  # remembered this time


def test_budget_check_refuses_at_the_budget_with_retry_to_the_reset() -> None:
    policy = KeyPolicy("team-a", budget_day_micro_usd=25_000_000, budget_month_micro_usd=500_000_000)
    day, month = windows(at(2025, 3, 10, 18))
    now = at(2025, 3, 10, 18)
    check(policy, day, month, 24_999_999, 400_000_000, now)  # under both: admitted
    with pytest.raises(errors.BudgetExceeded) as e:
        check(policy, day, month, 25_000_000, 400_000_000, now)
    assert e.value.retry_after == 6 * 3600 and e.value.metadata["limit"] == "budget_usd_per_day"
    assert "has spent $25.00 of its $25.00 budget for 2025-03-10" in e.value.message
    with pytest.raises(errors.BudgetExceeded) as e:
        check(policy, day, month, 30_000_000, 500_000_000, now)  # both over: the month's reset
    assert (
        e.value.retry_after == at(2025, 4, 1) - now
        and e.value.metadata["resets_at"] == "2025-04-01T00:00:00Z"
    )


def test_budgets_convert_exactly_to_micro_usd() -> None:
    s = settings_from_dict(
        {"auth": {"keys": [key("a", budget_usd_per_day=0.1, budget_usd_per_month=25), key("b", admin=True)]}},
        env={},
    )
    a, b = (KeyPolicy.from_config(k) for k in s.auth.keys)
    assert (a.budget_day_micro_usd, a.budget_month_micro_usd) == (100_000, 25_000_000)
    assert a.has_budget and a.limited and not b.limited and s.auth.keys[1].admin


def problems(raw: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        settings_from_dict(raw, env={})
    return e.value.problems


def test_state_config_is_checked_and_a_password_never_echoed() -> None:
    s = settings_from_dict({"state": {"redis_url": "redis://:s3cret-redis-pass@10.0.0.5:6379/2"}}, env={})
    assert s.state.on_unavailable == "fail_open" and s.state.unpriced == "deny"
    assert "s3cret-redis-pass" not in redact("connecting to redis://:s3cret-redis-pass@10.0.0.5:6379/2")
    out = problems({"state": {"redis_url": "http://user:hunter2hunter2@host"}})
    assert out == ["state.redis_url: must be a redis://, rediss:// or unix:// URL"]
    assert problems({"state": {"on_unavailable": "ignore"}})[0].startswith("state.on_unavailable:")
    assert problems({"state": {"key_prefix": "a b"}})[0].startswith("state.key_prefix:")
    assert problems({"state": {"timeout_seconds": 0}})[0].startswith("state.timeout_seconds:")
    assert (
        problems({"auth": {"keys": [key("a", budget_usd_per_day=-1)]}})[0]
        == "auth.keys[0].budget_usd_per_day: Input should be greater than or equal to 0"
    )
    assert settings_from_dict({"state": {"redis_url": ""}}, env={}).state.redis_url is None


async def test_the_local_store_admits_exactly_the_limits_and_frees_slots() -> None:
    store = LocalState()
    rate = KeyPolicy("rate", requests_per_minute=1, burst=3)  # one a minute: no refill here
    outcomes = []
    for _ in range(5):
        try:
            await store.admit(rate)
            outcomes.append("OK")
        except errors.BrokerError as exc:
            outcomes.append(exc.reason)
    assert outcomes == ["OK"] * 3 + ["CALLER_RATE_LIMITED"] * 2

    streams = KeyPolicy("streams", max_streams=2)
    a, b = await store.admit(streams), await store.admit(streams)
    with pytest.raises(errors.CallerTooManyStreams):
        await store.admit(streams)
    assert store.finish(a) is None and store.finish(a) is None  # done at once; once only
    await store.admit(streams)
    store.finish(b)

    tokens = KeyPolicy("tokens", tokens_per_minute=1000)
    t = await store.admit(tokens)
    t.charge(Usage(input_tokens=900, output_tokens=200), Cost(known=False))
    store.finish(t)
    with pytest.raises(errors.CallerTokenLimited) as e:
        await store.admit(tokens)
    assert 5 < (e.value.retry_after or 0) <= 6, "100 tokens of debt at 1000 a minute"
    (u,) = await store.usage([tokens])
    assert (u.day.requests, u.day.input_tokens, u.day.output_tokens, u.day.unpriced_requests) == (
        1,
        900,
        200,
        1,
    )


async def test_the_local_store_keeps_spend_against_the_budget() -> None:
    store = LocalState()
    policy = KeyPolicy("b", budget_day_micro_usd=10)
    for _ in range(2):
        t = await store.admit(policy)
        t.charge(Usage(input_tokens=1), Cost(known=True, input_micro_usd=5))
        store.finish(t)
    with pytest.raises(errors.BudgetExceeded):
        await store.admit(policy)
    # Another store's figures (Redis's, while it is away) can be the judge instead.
    assert store.take(policy, spent=(9, 9)).local


def test_a_ticket_sums_what_it_is_charged() -> None:
    t = Ticket(KeyPolicy("x"))
    t.charge(Usage(input_tokens=10, output_tokens=5), Cost(known=True, input_micro_usd=3, output_micro_usd=4))
    t.charge(Usage(input_tokens=1), Cost(known=False))
    c = Charge.of(t)
    assert (c.spend_micro_usd, c.input_tokens, c.output_tokens, c.unpriced_requests, c.tokens) == (
        7,
        11,
        5,
        1,
        16,
    )


def test_serve_warnings_name_the_keys_that_would_not_hold() -> None:
    s = settings_from_dict(
        {"auth": {"keys": [key("a", requests_per_minute=5), key("b"), key("c", budget_usd_per_day=1)]}},
        env={},
    )
    one, budgets = state_warnings(s, 1), state_warnings(s, 4)
    assert len(one) == 1 and "budgets of keys c" in one[0]
    assert "--workers 4 without state.redis_url" in budgets[0] and "keys a, c get up to 4x" in budgets[0]
    shared = settings_from_dict(
        {
            **s.model_dump(mode="json", exclude_defaults=True),
            "state": {"redis_url": "redis://127.0.0.1:6379"},
        },
        env={},
    )
    assert state_warnings(shared, 4) == []
