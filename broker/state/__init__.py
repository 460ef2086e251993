"""Caller state: limits, budgets and usage counters, per process or shared by every replica in Redis.

`open_state` picks the store: `RedisState` (broker/state/redis_state.py) with
`state.redis_url`, else `LocalState` (broker/state/local_state.py), the per-process state of
before. The flow of one completion:

1. the gate (broker/auth.py) calls `admit(policy)`: budget, stream slot, tokens and request
   rate checked and taken together (in Redis: one script, one round trip), or a refusal;
2. the request scope (broker/scope.py) adds what the request used to the `Ticket` when it
   ends (`Ticket.charge`: reported or estimated usage, cancelled and interrupted included);
3. the gate's release hands the ticket back (`finish`): the slot freed, tokens and spend
   charged before the RPC's status goes out (bounded by `state.timeout_seconds`), so a
   caller that saw its call end sees it in GetUsage and in the next admission, on any replica.

GetUsage reads `usage` (broker/state/usage.py decides who sees what).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from broker.config import Settings
from broker.limits import KeyPolicy
from broker.metrics import BrokerMetrics
from broker.state.budget import Window
from broker.types import Cost, Usage


@dataclass(eq=False, slots=True)
class Ticket:
    """One admitted completion of one key, and what it used (filled in when it ends)."""

    policy: KeyPolicy
    slot: str = ""  # its stream slot in Redis ("" none)
    local: bool = False  # admitted by the per-process store (Redis unavailable, fail_open)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micro_usd: int = 0
    unpriced: bool = False
    finished: bool = False

    def charge(self, usage: Usage, cost: Cost) -> None:
        self.input_tokens += max(usage.input_tokens, 0)
        self.output_tokens += max(usage.output_tokens, 0)
        if cost.known:
            self.cost_micro_usd += max(cost.total_micro_usd, 0)
        else:
            self.unpriced = True

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class WindowUsage:
    window: Window
    spend_micro_usd: int = 0
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    unpriced_requests: int = 0


@dataclass(slots=True)
class KeyUsage:
    policy: KeyPolicy
    day: WindowUsage
    month: WindowUsage
    streams_in_flight: int = 0


@dataclass(slots=True)
class Charge:
    """What one or more finished requests add to a key's window counters."""

    spend_micro_usd: int = 0
    requests: int = 0  # admitted (counted at admission; only replays carry them here)
    input_tokens: int = 0
    output_tokens: int = 0
    unpriced_requests: int = 0

    @property
    def tokens(self) -> int:
        """What tokens_per_minute is charged."""
        return self.input_tokens + self.output_tokens

    def add(self, other: Charge) -> None:
        self.spend_micro_usd += other.spend_micro_usd
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.unpriced_requests += other.unpriced_requests

    @classmethod
    def of(cls, ticket: Ticket) -> Charge:
        return cls(
            spend_micro_usd=ticket.cost_micro_usd,
            input_tokens=ticket.input_tokens,
            output_tokens=ticket.output_tokens,
            unpriced_requests=1 if ticket.unpriced else 0,
        )


class StateStore(abc.ABC):
    """Where limits are taken and usage is counted (see the module docstring)."""

    # The counts are shared by every replica and kept across restarts.
    shared = False

    def __init__(self, metrics: BrokerMetrics | None = None) -> None:
        self.metrics = metrics
        # Awaited (in the background) when `ready()` may have changed: readiness follows.
        self.on_change: Callable[[], Awaitable[None]] | None = None

    async def start(self) -> None:  # noqa: B027 (a store may have nothing to start)
        """Connect and start background work; never fails for an unreachable store."""

    async def close(self) -> None:  # noqa: B027
        """Hand back what is still pending (bounded), stop background work."""

    @abc.abstractmethod
    async def admit(self, policy: KeyPolicy) -> Ticket:
        """Admit one completion of this key or raise its refusal (a BrokerError)."""

    def finish(self, ticket: Ticket) -> asyncio.Future[None] | None:
        """The completion ended: free its slot, charge what it used (once per ticket). Returns
        what to await for the charge to be stored (it runs on if that await is cancelled), or
        None when it is stored already."""
        if ticket.finished:
            return None
        ticket.finished = True
        if self.metrics is not None and ticket.cost_micro_usd:
            self.metrics.count_spend(ticket.policy.name, ticket.cost_micro_usd)
        return self._finish(ticket)

    @abc.abstractmethod
    def _finish(self, ticket: Ticket) -> asyncio.Future[None] | None: ...

    @abc.abstractmethod
    async def usage(self, policies: list[KeyPolicy]) -> list[KeyUsage]:
        """The current day's and month's counters of these keys (raises STATE_UNAVAILABLE)."""

    def ready(self) -> bool:
        """Whether readiness may say SERVING as far as the state goes."""
        return True


def open_state(settings: Settings, metrics: BrokerMetrics | None = None) -> StateStore:
    """The store the settings ask for: Redis with state.redis_url, else this process."""
    if settings.state.redis_url:
        from broker.state.redis_state import RedisState

        return RedisState(settings.state, metrics)
    from broker.state.local_state import LocalState

    return LocalState(metrics)


def state_warnings(settings: Settings, workers: int) -> list[str]:
    """What `serve` warns about: limits or budgets that would not hold as configured."""
    if settings.state.redis_url:
        return []
    policies = [KeyPolicy.from_config(k) for k in settings.auth.keys]
    out = []
    limited = [p.name for p in policies if p.limited]
    if workers > 1 and limited:
        out.append(
            f"--workers {workers} without state.redis_url: each worker keeps its own caller limits, "
            f"so keys {', '.join(limited)} get up to {workers}x what auth.keys says. Set state.redis_url "
            "to share them (README: Shared state (Redis))"
        )
    budgeted = [p.name for p in policies if p.has_budget]
    if budgeted:
        out.append(
            f"budgets of keys {', '.join(budgeted)} are counted in this process only and start from 0 "
            "on every restart (and per worker): set state.redis_url to keep spend across restarts and replicas"
        )
    return out
