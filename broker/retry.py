"""Retries of one candidate: exponential backoff with full jitter, Retry-After, deadline, budget.

Full jitter (delay = uniform(0, min(cap, base * 2**n))) spreads the retries of many
callers that failed together, so they do not hit a recovering provider in lockstep. A
server's own Retry-After / retry-after-ms wins over the computed delay; if it asks for
longer than `max_retry_after_seconds`, or a fallback is waiting, the broker moves on
rather than sit idle. A retry never starts if its delay would run past the caller's
deadline. Timeouts are not retried on the same candidate: they already spent the time a
retry would need.

The budget caps retries at `budget_ratio` of the requests a provider got in the last
`budget_window_seconds`, plus a small floor (`budget_min_retries_per_second`), so a
provider that fails every request sees at most that much extra load from retries.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable

from broker import errors
from broker.config import RetryConfig


class RetryPolicy:
    def __init__(self, settings: RetryConfig, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()

    def backoff(self, attempt: int) -> float:
        """Full-jitter delay before retry number `attempt` (1 = the first retry)."""
        s = self.settings
        cap = min(s.max_backoff_seconds, s.initial_backoff_seconds * 2 ** (attempt - 1))
        return self._rng.uniform(0.0, cap)

    def delay(
        self,
        exc: errors.BrokerError,
        attempts: int,
        *,
        deadline: float | None,
        fallback_waiting: bool,
        now: float | None = None,
    ) -> float | None:
        """Seconds to wait before retrying the same candidate, or None to move on.

        `attempts` is how many attempts this candidate has had so far.
        """
        s = self.settings
        if not exc.retryable or attempts >= s.max_attempts or isinstance(exc, errors.UpstreamTimeout):
            return None
        if exc.retry_after is not None and exc.retry_after > 0:
            # The server said when; a fallback now beats waiting, and a long wait is not ours to take.
            if fallback_waiting or exc.retry_after > s.max_retry_after_seconds:
                return None
            wait = exc.retry_after
        else:
            wait = self.backoff(attempts)
        if deadline is not None:
            now = time.monotonic() if now is None else now
            if now + wait >= deadline:
                return None
        return wait


class RetryBudget:
    """Per provider: retries allowed = floor + ratio x requests, over a sliding window."""

    def __init__(self, settings: RetryConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        horizon = now - self.settings.budget_window_seconds
        for q in (self._requests, self._retries):
            while q and q[0] < horizon:
                q.popleft()

    def record_request(self) -> None:
        """A first attempt at this provider deposits into the budget (retries do not)."""
        now = self._clock()
        self._trim(now)
        self._requests.append(now)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        now = self._clock()
        self._trim(now)
        s = self.settings
        allowed = s.budget_min_retries_per_second * s.budget_window_seconds + s.budget_ratio * len(
            self._requests
        )
        if len(self._retries) + 1 > allowed:
            return False
        self._retries.append(now)
        return True
