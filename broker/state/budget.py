"""Budget windows: the current UTC day and month of a key's spend, and the BUDGET_EXCEEDED refusal.

A window is named by its UTC date ("20250131", "202501"), so every replica charges the same
counters; the clock is the replica's own (keep it NTP-synced: around midnight a skewed
replica charges the neighbouring day). A window's counters are kept one more window after
it resets (a Redis TTL), for an operator looking back, then expire on their own.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from broker import errors
from broker.limits import KeyPolicy

_DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class Window:
    kind: Literal["day", "month"]
    id: str  # "20250131" or "202501"
    start: float  # epoch seconds, UTC
    reset: float  # epoch seconds: when the next window starts

    @property
    def expire_at(self) -> int:
        """When the counters may go: one more window after the reset."""
        return int(self.reset + (self.reset - self.start))

    @property
    def label(self) -> str:
        start = dt.datetime.fromtimestamp(self.start, dt.UTC)
        return start.strftime("%Y-%m-%d") if self.kind == "day" else start.strftime("%Y-%m")


def windows(now: float) -> tuple[Window, Window]:
    """The UTC day and month that contain `now` (epoch seconds). Every admission and every
    charge asks, so the last answer is kept: within its day (UTC days are all 86,400 s) it is
    the answer, and the dates are formatted once a day instead of twice per request."""
    last = _last
    if last[0].start <= now < last[0].reset:
        return last
    return _remember(_windows(now))


def _windows(now: float) -> tuple[Window, Window]:
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    day0 = dt.datetime(t.year, t.month, t.day, tzinfo=dt.UTC)
    month0 = dt.datetime(t.year, t.month, 1, tzinfo=dt.UTC)
    month1 = dt.datetime(t.year + t.month // 12, t.month % 12 + 1, 1, tzinfo=dt.UTC)
    day = Window("day", day0.strftime("%Y%m%d"), day0.timestamp(), day0.timestamp() + _DAY)
    month = Window("month", month0.strftime("%Y%m"), month0.timestamp(), month1.timestamp())
    return day, month


# The last answer of `windows`, replaced whole (a thread never sees half of one). It starts
# as an empty window, which contains no time.
_last: tuple[Window, Window] = (Window("day", "", 0.0, 0.0), Window("month", "", 0.0, 0.0))


def _remember(answer: tuple[Window, Window]) -> tuple[Window, Window]:
    global _last
    _last = answer
    return answer


def _usd(micro: int) -> str:
    return f"${micro / 1e6:,.2f}" if micro >= 10_000 else f"${micro / 1e6:.6f}"


def check(
    policy: KeyPolicy, day: Window, month: Window, day_spend: int, month_spend: int, now: float
) -> None:
    """Raise BUDGET_EXCEEDED while a window's spend is at or over its budget (the month first:
    its reset is the later one, so RetryInfo never sends the caller back too early)."""
    for window, spend, budget in (
        (month, month_spend, policy.budget_month_micro_usd),
        (day, day_spend, policy.budget_day_micro_usd),
    ):
        if budget is None or spend < budget:
            continue
        wait = max(window.reset - now, 0.0)
        reset = dt.datetime.fromtimestamp(window.reset, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise errors.BudgetExceeded(
            f"key {policy.name!r} has spent {_usd(spend)} of its {_usd(budget)} budget for "
            f"{window.label} (UTC, budget_usd_per_{window.kind}); it resets at {reset}, in {wait:.0f}s",
            retry_after=wait,
            metadata={
                "caller": policy.name,
                "limit": f"budget_usd_per_{window.kind}",
                "spend_micro_usd": str(spend),
                "budget_micro_usd": str(budget),
                "resets_at": reset,
            },
        )
