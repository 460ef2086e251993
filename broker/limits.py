"""Admission limits: what a key is allowed (`KeyPolicy`), the refusals, and the daemon's own cap.

Where a key's usage is counted is the state store's (broker/state/): per process by default,
or in Redis (`state.redis_url`), where every limit holds across all processes and replicas.
Both build their refusals here, so a caller reads the same status whichever is in use.

Token buckets refill continuously, so a caller over `requests_per_minute` waits only until
the next request's worth has refilled (RetryInfo says how long), not for a minute boundary.
Tokens are known only after a request finishes, so `tokens_per_minute` is charged after
the fact: the bucket may go negative, and new requests are refused until it is back to zero.

The daemon-wide cap (`server.max_concurrent_streams`) is this process's capacity, so it
stays in the process whatever the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from broker import errors
from broker.catalog.cost import micro_usd_from_usd
from broker.config import CallerKey

# No clock tells when a stream slot frees up; this is a nominal "try again soon".
STREAM_RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """One key's configured limits and budgets (None: unlimited)."""

    name: str
    requests_per_minute: int | None = None
    burst: int | None = None  # set whenever requests_per_minute is
    tokens_per_minute: int | None = None
    max_streams: int | None = None
    budget_day_micro_usd: int | None = None
    budget_month_micro_usd: int | None = None

    @classmethod
    def from_config(cls, key: CallerKey) -> KeyPolicy:
        burst = None
        if key.requests_per_minute is not None:
            burst = key.burst if key.burst is not None else key.requests_per_minute
        return cls(
            key.name,
            key.requests_per_minute,
            burst,
            key.tokens_per_minute,
            key.max_concurrent_streams,
            None if key.budget_usd_per_day is None else micro_usd_from_usd(key.budget_usd_per_day),
            None if key.budget_usd_per_month is None else micro_usd_from_usd(key.budget_usd_per_month),
        )

    @property
    def has_budget(self) -> bool:
        return self.budget_day_micro_usd is not None or self.budget_month_micro_usd is not None

    @property
    def limited(self) -> bool:
        """Any limit or budget: admission has something to enforce for this key."""
        return self.has_budget or any(
            v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.max_streams)
        )


# --- refusals (the same words from every store) ------------------------------------------------


def too_many_streams(policy: KeyPolicy, in_flight: int) -> errors.CallerTooManyStreams:
    return errors.CallerTooManyStreams(
        f"key {policy.name!r} already has {in_flight} completions in flight "
        f"(max_concurrent_streams {policy.max_streams})",
        retry_after=STREAM_RETRY_SECONDS,
        metadata={"caller": policy.name, "limit": "max_concurrent_streams"},
    )


def over_tokens(policy: KeyPolicy, wait: float) -> errors.CallerTokenLimited:
    return errors.CallerTokenLimited(
        f"key {policy.name!r} is over its tokens_per_minute ({policy.tokens_per_minute}); "
        f"retry in {wait:.2f}s",
        retry_after=wait,
        metadata={"caller": policy.name, "limit": "tokens_per_minute"},
    )


def over_rate(policy: KeyPolicy, wait: float) -> errors.CallerRateLimited:
    return errors.CallerRateLimited(
        f"key {policy.name!r} is over its requests_per_minute ({policy.requests_per_minute}); "
        f"retry in {wait:.2f}s",
        retry_after=wait,
        metadata={"caller": policy.name, "limit": "requests_per_minute"},
    )


class TokenBucket:
    """`capacity` tokens, refilled at `per_second`; `charge` may take it below zero."""

    def __init__(self, capacity: float, per_second: float) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self._level = capacity
        self._at = time.monotonic()

    def level(self) -> float:
        now = time.monotonic()
        self._level = min(self.capacity, self._level + (now - self._at) * self.per_second)
        self._at = now
        return self._level

    def take(self, n: float = 1.0) -> float:
        """Take n now and return 0, or take nothing and return the seconds until n are there."""
        level = self.level()
        if level >= n:
            self._level = level - n
            return 0.0
        return (n - level) / self.per_second

    def charge(self, n: float) -> None:
        self._level = self.level() - n

    def debt_seconds(self) -> float:
        """Seconds until the level is back to zero (0 when it is not negative)."""
        level = self.level()
        return 0.0 if level >= 0 else -level / self.per_second


class StreamCap:
    """The daemon-wide cap on completions in flight (this process's capacity)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.in_flight = 0

    def check(self) -> None:
        if self.in_flight >= self.maximum:
            raise errors.BrokerOverloaded(
                f"the broker already has {self.in_flight} completions in flight "
                f"(server.max_concurrent_streams {self.maximum}); retry shortly or use another replica",
                retry_after=STREAM_RETRY_SECONDS,
                metadata={"limit": "max_concurrent_streams"},
            )
