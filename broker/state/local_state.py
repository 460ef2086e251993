"""The per-process store: every limit, budget and counter lives in this process only.

The default without `state.redis_url`, and what a `RedisState` falls back to while Redis is
unavailable under `fail_open`. Behind `--workers N` or N replicas each process enforces the
whole configured limit (so a key gets up to N times it; `serve` warns), and spend starts from
0 on every restart.

Checks and counts happen with no await in between, so concurrent calls on the event loop
cannot both squeeze into the last slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from broker import limits
from broker.limits import KeyPolicy, TokenBucket
from broker.metrics import BrokerMetrics
from broker.state import Charge, KeyUsage, StateStore, Ticket, WindowUsage, budget


@dataclass(eq=False)
class _Key:
    policy: KeyPolicy
    requests: TokenBucket | None
    tokens: TokenBucket | None
    streams: int = 0
    # "day" / "month" -> the counters of the current window (replaced when it rolls over).
    windows: dict[str, WindowUsage] = field(default_factory=dict)

    def window(self, w: budget.Window) -> WindowUsage:
        current = self.windows.get(w.kind)
        if current is None or current.window.id != w.id:
            current = self.windows[w.kind] = WindowUsage(w)
        return current


class LocalState(StateStore):
    def __init__(
        self, metrics: BrokerMetrics | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(metrics)
        self._clock = clock
        self._keys: dict[str, _Key] = {}

    def _key(self, policy: KeyPolicy) -> _Key:
        k = self._keys.get(policy.name)
        # `is` first: the same policy object every call, unless a reload made a new one.
        if k is None or (k.policy is not policy and k.policy != policy):
            # New, or its limits changed (a config reload): fresh buckets; the streams in
            # flight and the window counters carry over.
            requests = tokens = None
            if policy.requests_per_minute is not None and policy.burst is not None:
                requests = TokenBucket(policy.burst, policy.requests_per_minute / 60.0)
            if policy.tokens_per_minute is not None:
                tokens = TokenBucket(policy.tokens_per_minute, policy.tokens_per_minute / 60.0)
            fresh = _Key(policy, requests, tokens)
            if k is not None:
                fresh.streams, fresh.windows = k.streams, k.windows
            k = self._keys[policy.name] = fresh
        return k

    def take(self, policy: KeyPolicy, *, spent: tuple[int, int] | None = None) -> Ticket:
        """Admit or raise, synchronously. `spent`: the (day, month) spend to judge the budgets
        by, when another store knows better than this process (else this process's own)."""
        k = self._key(policy)
        now = self._clock()
        day_w, month_w = budget.windows(now)
        day, month = k.window(day_w), k.window(month_w)
        if policy.has_budget:
            day_spend, month_spend = spent or (day.spend_micro_usd, month.spend_micro_usd)
            budget.check(policy, day_w, month_w, day_spend, month_spend, now)
        if policy.max_streams is not None and k.streams >= policy.max_streams:
            raise limits.too_many_streams(policy, k.streams)
        if k.tokens is not None:
            wait = k.tokens.debt_seconds()
            if wait > 0:
                raise limits.over_tokens(policy, wait)
        if k.requests is not None:
            wait = k.requests.take()
            if wait > 0:
                raise limits.over_rate(policy, wait)
        k.streams += 1
        day.requests += 1
        month.requests += 1
        return Ticket(policy, local=True)

    async def admit(self, policy: KeyPolicy) -> Ticket:
        return self.take(policy)

    def _finish(self, ticket: Ticket) -> None:
        self.release(ticket)
        self.add(ticket.policy, Charge.of(ticket))
        return None

    def release(self, ticket: Ticket) -> None:
        """Free the ticket's stream slot in this process (nothing else)."""
        k = self._key(ticket.policy)
        k.streams = max(k.streams - 1, 0)

    def add(self, policy: KeyPolicy, charge: Charge) -> None:
        """Charge tokens (the tokens-per-minute bucket too) and spend to the current windows."""
        k = self._key(policy)
        if k.tokens is not None and charge.tokens > 0:
            k.tokens.charge(charge.tokens)
        for w in budget.windows(self._clock()):
            usage = k.window(w)
            usage.spend_micro_usd += charge.spend_micro_usd
            usage.requests += charge.requests
            usage.input_tokens += charge.input_tokens
            usage.output_tokens += charge.output_tokens
            usage.unpriced_requests += charge.unpriced_requests

    async def usage(self, policies: list[KeyPolicy]) -> list[KeyUsage]:
        day_w, month_w = budget.windows(self._clock())
        out = []
        for p in policies:
            k = self._key(p)
            out.append(KeyUsage(p, k.window(day_w), k.window(month_w), k.streams))
        return out
