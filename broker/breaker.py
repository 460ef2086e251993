"""A circuit breaker per provider: passive health from the outcomes of real requests.

CLOSED: requests flow; failures are counted. It OPENs on `consecutive_failures` in a row,
or when at least `min_requests` outcomes in the last `window_seconds` show an error rate
of `error_rate` or more. OPEN: the provider is skipped (routing moves on, health says
NOT_SERVING) for `cooldown_seconds`. Then HALF_OPEN: one trial request at a time; its
success closes the breaker, its failure re-opens it for another cooldown.

Only failures that say the provider is sick count (5xx, 529, connection errors,
timeouts, broken streams); the caller's own mistakes, rate limits (the provider is
healthy, just busy: Retry-After handles them), a wrong key and cancellations are
neutral. The OPEN -> HALF_OPEN step happens lazily, on the next look at the state, so
the breaker needs no timer task.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable

from broker import errors
from broker.config import BreakerConfig

# Failures that say the provider (not the request, not our key) is in trouble.
_SICK = (
    errors.UpstreamUnavailable,
    errors.UpstreamTimeout,
    errors.UpstreamProtocolError,
)


def counts_against_provider(exc: BaseException) -> bool:
    """Whether an attempt's error is the provider's fault (see the module doc)."""
    return isinstance(exc, _SICK)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, settings: BreakerConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._consecutive = 0
        self._outcomes: deque[tuple[float, bool]] = deque()  # (when, failed) within the window
        self._failed_in_window = 0
        self._trial_in_flight = False
        # Why it last opened, for ListProviders' last_error and the log.
        self.open_reason = ""

    # --- reading -----------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.settings.cooldown_seconds
        ):
            self._state = BreakerState.HALF_OPEN
            self._trial_in_flight = False
        return self._state

    @property
    def is_open(self) -> bool:
        return self.state is BreakerState.OPEN

    def retry_in(self) -> float:
        """Seconds until the cooldown ends (0 unless open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(self.settings.cooldown_seconds - (self._clock() - self._opened_at), 0.0)

    def allows(self) -> bool:
        """Whether a request may go now, without taking the half-open trial slot."""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._trial_in_flight)

    # --- a request's life ------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Take permission for one attempt; in HALF_OPEN only one trial at a time gets it.

        Every True must be followed by exactly one of success(), failure() or release().
        """
        if not self.settings.enabled:
            return True
        if not self.allows():
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._trial_in_flight = True
        return True

    def success(self) -> bool:
        """The provider answered. Returns True when the state changed (health must follow)."""
        if not self.settings.enabled:
            return False
        self._consecutive = 0
        self._note(failed=False)
        if self.state is BreakerState.HALF_OPEN:
            self._state = BreakerState.CLOSED
            self._trial_in_flight = False
            self._forget()
            self.open_reason = ""
            return True
        return False

    def failure(self, error: str) -> bool:
        """The provider failed the attempt. Returns True when the breaker opened."""
        if not self.settings.enabled:
            return False
        self._consecutive += 1
        self._note(failed=True)
        state = self.state
        if state is BreakerState.HALF_OPEN:
            return self._open(f"the half-open trial failed: {error}")
        if state is BreakerState.OPEN:
            return False  # a request that started before it opened
        s = self.settings
        if self._consecutive >= s.consecutive_failures:
            return self._open(f"{self._consecutive} consecutive failures; last: {error}")
        total, failed = len(self._outcomes), self._failed_in_window
        if total >= s.min_requests and failed / total >= s.error_rate:
            return self._open(f"{failed} of the last {total} requests failed; last: {error}")
        return False

    def release(self) -> None:
        """The attempt said nothing about the provider (cancelled, caller's error, rate limit)."""
        if self._state is BreakerState.HALF_OPEN:
            self._trial_in_flight = False

    # --- internals -------------------------------------------------------------------------------

    def _note(self, *, failed: bool) -> None:
        now = self._clock()
        self._outcomes.append((now, failed))
        self._failed_in_window += failed
        horizon = now - self.settings.window_seconds
        while self._outcomes and self._outcomes[0][0] < horizon:
            self._failed_in_window -= self._outcomes.popleft()[1]

    def _open(self, reason: str) -> bool:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._trial_in_flight = False
        self._consecutive = 0
        self._forget()
        self.open_reason = reason
        return True

    def _forget(self) -> None:
        # A new state starts a new window: old failures must not re-open a just-closed breaker.
        self._outcomes.clear()
        self._failed_in_window = 0
