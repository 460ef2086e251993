"""Admission limits for completions: per-caller rates and streams, and the daemon's own cap.

Everything here lives in this process. Behind `serve --workers N` or N replicas a caller
can get N times its configured rate; limits shared across processes belong in Redis
(DESIGN.md: state shared across replicas lives in Redis, never in a home-made store),
which is out of scope here.

Token buckets refill continuously, so a caller over `requests_per_minute` waits only until
the next request's worth has refilled (RetryInfo says how long), not for a minute boundary.
Tokens are known only after a request finishes, so `tokens_per_minute` is charged after
the fact: the bucket may go negative, and new requests are refused until it is back to zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from broker import errors
from broker.config import CallerKey

# No clock tells when a stream slot frees up; this is a nominal "try again soon".
STREAM_RETRY_SECONDS = 1.0

Release = Callable[[], None]


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


@dataclass(eq=False)
class CallerLimits:
    """One key's limits and what it is using now."""

    name: str
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    max_streams: int | None = None
    streams: int = field(default=0)

    @classmethod
    def from_config(cls, key: CallerKey) -> CallerLimits:
        requests = tokens = None
        if key.requests_per_minute is not None:
            burst = key.burst if key.burst is not None else key.requests_per_minute
            requests = TokenBucket(burst, key.requests_per_minute / 60.0)
        if key.tokens_per_minute is not None:
            tokens = TokenBucket(key.tokens_per_minute, key.tokens_per_minute / 60.0)
        return cls(key.name, requests, tokens, key.max_concurrent_streams)

    def check(self) -> None:
        """Raise if a new completion is over a limit; takes a request token only when all pass."""
        meta = {"caller": self.name}
        if self.max_streams is not None and self.streams >= self.max_streams:
            raise errors.CallerTooManyStreams(
                f"key {self.name!r} already has {self.streams} completions in flight "
                f"(max_concurrent_streams {self.max_streams})",
                retry_after=STREAM_RETRY_SECONDS,
                metadata={**meta, "limit": "max_concurrent_streams"},
            )
        if self.tokens is not None:
            wait = self.tokens.debt_seconds()
            if wait > 0:
                raise errors.CallerTokenLimited(
                    f"key {self.name!r} is over its tokens_per_minute "
                    f"({self.tokens.capacity:g}); retry in {wait:.2f}s",
                    retry_after=wait,
                    metadata={**meta, "limit": "tokens_per_minute"},
                )
        if self.requests is not None:
            wait = self.requests.take()
            if wait > 0:
                raise errors.CallerRateLimited(
                    f"key {self.name!r} is over its requests_per_minute "
                    f"({self.requests.per_second * 60:g}); retry in {wait:.2f}s",
                    retry_after=wait,
                    metadata={**meta, "limit": "requests_per_minute"},
                )

    def record_tokens(self, n: int) -> None:
        if self.tokens is not None and n > 0:
            self.tokens.charge(n)


class StreamCap:
    """The daemon-wide cap on completions in flight."""

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


def admit(cap: StreamCap, caller: CallerLimits | None) -> Release:
    """Admit one completion or raise; the returned function must be called once when it ends.

    Checks and counts happen with no await in between, so concurrent calls on the event
    loop cannot both squeeze into the last slot.
    """
    cap.check()
    if caller is not None:
        caller.check()
        caller.streams += 1
    cap.in_flight += 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        cap.in_flight -= 1
        if caller is not None:
            caller.streams -= 1

    return release
