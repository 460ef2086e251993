"""The Redis store (`state.redis_url`): every caller limit, budget and counter shared by all replicas.

One admission is one script (broker/state/scripts.py): budget, stream slot, tokens and
request rate checked and taken atomically. A request's end is one more (slot freed, tokens
and spend charged), sent in the background. Spend lives in per-window hashes with a TTL past
the window, so it survives restarts of every daemon.

Redis down or slow (every call is bounded by `state.timeout_seconds`; redis-py retries only a
broken connection, once, at once; the store does its own reconnecting):

- the first call that fails marks the store unavailable (logged `state_unavailable`, counted
  in `modelbroker_state_unavailable_total`) and starts one reconnect probe (PING, backoff
  with jitter up to `reconnect_max_backoff_seconds`); until it answers, no request touches
  Redis, so nothing waits on a dead server;
- meanwhile `fail_open` (the default) admits with this process's own limits
  (`LocalState`) and judges budgets by the spend Redis last reported plus what this process
  charged since; the charges are kept (summed per key and window, so bounded) and replayed
  when Redis answers again. `fail_closed` refuses keys with a limit or budget with
  UNAVAILABLE STATE_UNAVAILABLE, and readiness turns NOT_SERVING;
- when the probe answers, the replay runs, the store is available again (`state_available`).

Slots taken in Redis before an outage are never released by hand afterwards: their leases
run out. Charges are at least once: a call that timed out after Redis ran it is replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from broker import errors, limits
from broker.config import StateConfig
from broker.limits import KeyPolicy
from broker.metrics import BrokerMetrics
from broker.redact import redact
from broker.state import Charge, KeyUsage, StateStore, Ticket, WindowUsage, budget, scripts
from broker.state.local_state import LocalState

log = structlog.get_logger("broker.state")

FIRST_BACKOFF_SECONDS = 0.05
# How long close() waits for charges still on their way to Redis.
CLOSE_WAIT_SECONDS = 2.0


class _Unavailable(Exception):
    """A Redis call failed or timed out; the store is marked unavailable."""


def _rate_per_ms(per_minute: int | None) -> str:
    return repr(per_minute / 60_000) if per_minute else "0"


class RedisState(StateStore):
    shared = True

    def __init__(self, config: StateConfig, metrics: BrokerMetrics | None = None) -> None:
        super().__init__(metrics)
        assert config.redis_url is not None
        self.config = config
        self.available = True
        pool = BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=config.max_connections,
            timeout=config.timeout_seconds,
            socket_timeout=config.timeout_seconds,
            socket_connect_timeout=config.timeout_seconds,
            # One immediate retry on a broken connection: after Redis restarts, every pooled
            # connection is stale and fails once. Timeouts are not retried, and the whole
            # call stays within timeout_seconds whatever redis-py does (`_run`).
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._client: Redis = Redis(connection_pool=pool)
        self._admit = self._client.register_script(scripts.ADMIT)
        self._finish_script = self._client.register_script(scripts.FINISH)
        self._heartbeat_script = self._client.register_script(scripts.HEARTBEAT)
        self._usage_script = self._client.register_script(scripts.USAGE)
        # Slot members are unique per process and request: host, pid, a random part, a counter.
        self._replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._seq = itertools.count()
        self._slots: dict[str, str] = {}  # live slot member -> its key (heartbeat refreshes them)
        self._fallback = LocalState()
        # Spend Redis last reported per key: (day id, month id, day spend, month spend).
        self._last_spend: dict[str, tuple[str, str, int, int]] = {}
        # Charges Redis has not taken yet, per (key, day id, month id).
        self._pending: dict[tuple[str, str, str], tuple[KeyPolicy, budget.Window, budget.Window, Charge]] = {}
        self._sends: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._down_since = 0.0
        self._closing = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        with contextlib.suppress(_Unavailable):
            await self._run(self._client.ping)
        if self.available:
            log.info("state_connected", store="redis", on_unavailable=self.config.on_unavailable)
        self._set_gauge()
        self._heartbeat = asyncio.create_task(self._heartbeats(), name="state-heartbeat")

    async def close(self) -> None:
        self._closing = True  # the loops stop at their next turn even if a cancel were lost
        loops = {t for t in (self._heartbeat, self._probe) if t is not None}
        for task in loops:
            task.cancel()
        if loops:
            await asyncio.wait(loops, timeout=CLOSE_WAIT_SECONDS)
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=CLOSE_WAIT_SECONDS)
        if self._pending and self.available:
            with contextlib.suppress(_Unavailable):
                await self._replay()
        if self._pending:
            log.warning("state_charges_lost", keys=sorted({k[0] for k in self._pending}))
        # Bounded: a shutdown must not wait on a Redis that stopped answering.
        with contextlib.suppress(TimeoutError, RedisError, OSError):
            async with asyncio.timeout(CLOSE_WAIT_SECONDS):
                await self._client.aclose()
                await self._client.connection_pool.disconnect()

    def ready(self) -> bool:
        return self.available or self.config.on_unavailable == "fail_open"

    # --- calls ------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        """One Redis call within the timeout; a failure marks the store unavailable."""
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(self.config.timeout_seconds):
                return await fn(*args, **kw)
        except (RedisError, OSError, TimeoutError) as exc:
            if task is not None and task.cancelling() > cancels:
                # Our task was cancelled (caller gone, shutdown) and a layer below turned that
                # into an error: it says nothing about Redis, and the cancel must go on.
                raise asyncio.CancelledError from exc
            self._down(exc)
            raise _Unavailable from exc

    def _down(self, exc: BaseException) -> None:
        if not self.available:
            return
        self.available = False
        self._down_since = time.monotonic()
        reason = redact(str(exc)) or type(exc).__name__
        if isinstance(exc, TimeoutError) and not str(exc):
            reason = f"no answer within {self.config.timeout_seconds:g}s (state.timeout_seconds)"
        log.warning(
            "state_unavailable", store="redis", error=reason, on_unavailable=self.config.on_unavailable
        )
        if self.metrics is not None:
            self.metrics.state_unavailable.inc()
        self._set_gauge()
        self._notify()
        if not self._closing:
            self._probe = asyncio.create_task(self._reconnect(), name="state-reconnect")

    def _up(self, replayed: tuple[int, int]) -> None:
        self.available = True
        log.info(
            "state_available",
            store="redis",
            down_seconds=round(time.monotonic() - self._down_since, 3),
            # Charges kept meanwhile (one per key and window) and the admissions among them.
            replayed_charges=replayed[0],
            replayed_requests=replayed[1],
        )
        self._set_gauge()
        self._notify()

    def _set_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.state_available.set(1 if self.available else 0)

    def _notify(self) -> None:
        if self.on_change is not None:
            self._spawn(self.on_change())

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run())
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)
        return task

    async def _reconnect(self) -> None:
        """PING with backoff until Redis answers; then replay the charges and be available again."""
        delay = FIRST_BACKOFF_SECONDS
        while not self._closing:
            # Equal jitter: replicas that lost Redis together do not all come back at once.
            await asyncio.sleep(delay / 2 + random.uniform(0, delay / 2))
            delay = min(delay * 2, self.config.reconnect_max_backoff_seconds)
            try:
                async with asyncio.timeout(self.config.timeout_seconds):
                    await self._client.ping()
                replayed = await self._replay()
            except (RedisError, OSError, TimeoutError, _Unavailable):
                continue
            self._up(replayed)
            return

    async def _replay(self) -> tuple[int, int]:
        """Send every pending charge (raises on the first failure, keeping the rest); how many
        charges, and how many admissions they carried."""
        n = requests = 0
        while self._pending:
            key, (policy, day, month, charge) = next(iter(self._pending.items()))
            try:
                async with asyncio.timeout(self.config.timeout_seconds):
                    await self._send_finish(policy, "", day, month, charge, bucket=False)
            except (RedisError, OSError, TimeoutError) as exc:
                raise _Unavailable from exc
            del self._pending[key]
            n += 1
            requests += charge.requests
        return n, requests

    async def _heartbeats(self) -> None:
        """Refresh the leases of this process's live slots every third of a lease."""
        lease_ms = int(self.config.stream_lease_seconds * 1000)
        while not self._closing:
            await asyncio.sleep(self.config.stream_lease_seconds / 3)
            if not self.available or not self._slots:
                continue
            members = list(self._slots.items())
            with contextlib.suppress(_Unavailable):
                await self._run(
                    self._heartbeat_script,
                    keys=[k for _, k in members],
                    args=[lease_ms, *(m for m, _ in members)],
                )

    # --- admission --------------------------------------------------------------------------------

    async def admit(self, policy: KeyPolicy) -> Ticket:
        if not self.available:
            return self._degraded(policy)
        now = time.time()
        day, month = budget.windows(now)
        names = scripts.key_names(self.config.key_prefix, policy.name)
        member = f"{self._replica}:{next(self._seq)}" if policy.max_streams is not None else ""
        try:
            code, wait_ms, day_spend, month_spend, streams = await self._run(
                self._admit,
                keys=[
                    names["requests"],
                    names["tokens"],
                    names["streams"],
                    names["day"] + day.id,
                    names["month"] + month.id,
                ],
                args=[
                    _rate_per_ms(policy.requests_per_minute),
                    policy.burst or 0,
                    _rate_per_ms(policy.tokens_per_minute),
                    policy.tokens_per_minute or 0,
                    policy.max_streams or 0,
                    int(self.config.stream_lease_seconds * 1000),
                    member,
                    -1 if policy.budget_day_micro_usd is None else policy.budget_day_micro_usd,
                    -1 if policy.budget_month_micro_usd is None else policy.budget_month_micro_usd,
                    day.expire_at,
                    month.expire_at,
                ],
            )
        except _Unavailable:
            return self._degraded(policy)
        # (A caller gone while the script ran leaves its slot unregistered here: never
        # refreshed, it frees itself within one lease.)
        self._last_spend[policy.name] = (day.id, month.id, int(day_spend), int(month_spend))
        if code == 0:
            if member:
                self._slots[member] = names["streams"]
            return Ticket(policy, slot=member)
        if code in (1, 2):
            budget.check(policy, day, month, int(day_spend), int(month_spend), now)
        if code == 3:
            raise limits.too_many_streams(policy, int(streams))
        if code == 4:
            raise limits.over_tokens(policy, int(wait_ms) / 1000)
        raise limits.over_rate(policy, int(wait_ms) / 1000)

    def _degraded(self, policy: KeyPolicy) -> Ticket:
        """Redis unavailable: refuse (fail_closed, a key with something to enforce) or admit with
        this process's limits and the spend known here."""
        if self.config.on_unavailable == "fail_closed" and policy.limited:
            raise errors.StateUnavailable(
                f"the broker cannot reach its shared state (Redis), and key {policy.name!r} has limits "
                "or budgets that state.on_unavailable: fail_closed enforces only there; retry shortly",
                retry_after=self.config.reconnect_max_backoff_seconds,
                metadata={"caller": policy.name},
            )
        ticket = self._fallback.take(policy, spent=self._known_spend(policy))
        if self.metrics is not None:
            self.metrics.state_degraded.inc()
        return ticket

    def _known_spend(self, policy: KeyPolicy) -> tuple[int, int]:
        day, month = budget.windows(time.time())
        d = m = 0
        last = self._last_spend.get(policy.name)
        if last is not None:
            d = last[2] if last[0] == day.id else 0
            m = last[3] if last[1] == month.id else 0
        for (name, day_id, month_id), (_, _, _, charge) in self._pending.items():
            if name == policy.name:
                d += charge.spend_micro_usd if day_id == day.id else 0
                m += charge.spend_micro_usd if month_id == month.id else 0
        return d, m

    # --- the end of a request ---------------------------------------------------------------------

    def _finish(self, ticket: Ticket) -> asyncio.Future[None] | None:
        charge = Charge.of(ticket)
        if ticket.slot:
            self._slots.pop(ticket.slot, None)
        if ticket.local:
            self._fallback.release(ticket)
            self._fallback.add(ticket.policy, charge)  # this process's token bucket
            charge.requests = 1  # admitted without Redis: never counted there yet
        if not (
            ticket.slot
            or charge.requests
            or charge.tokens
            or charge.spend_micro_usd
            or charge.unpriced_requests
        ):
            return None
        if not self.available:
            self._keep(ticket.policy, charge)
            return None
        return self._spawn(self._finish_async(ticket.policy, ticket.slot, charge))

    async def _finish_async(self, policy: KeyPolicy, slot: str, charge: Charge) -> None:
        day, month = budget.windows(time.time())
        try:
            await self._run(self._send_finish, policy, slot, day, month, charge, bucket=True)
        except _Unavailable:
            self._keep(policy, charge)

    async def _send_finish(
        self,
        policy: KeyPolicy,
        slot: str,
        day: budget.Window,
        month: budget.Window,
        charge: Charge,
        *,
        bucket: bool,
    ) -> None:
        names = scripts.key_names(self.config.key_prefix, policy.name)
        day_spend, month_spend = await self._finish_script(
            keys=[names["tokens"], names["streams"], names["day"] + day.id, names["month"] + month.id],
            args=[
                slot,
                _rate_per_ms(policy.tokens_per_minute) if bucket else "0",
                policy.tokens_per_minute or 0,
                charge.spend_micro_usd,
                charge.input_tokens,
                charge.output_tokens,
                charge.unpriced_requests,
                charge.requests,
                day.expire_at,
                month.expire_at,
            ],
        )
        self._last_spend[policy.name] = (day.id, month.id, int(day_spend), int(month_spend))

    def _keep(self, policy: KeyPolicy, charge: Charge) -> None:
        """A charge for later (summed per key and window: bounded by keys x windows)."""
        day, month = budget.windows(time.time())
        key = (policy.name, day.id, month.id)
        kept = self._pending.get(key)
        if kept is None:
            self._pending[key] = (policy, day, month, charge)
        else:
            kept[3].add(charge)

    # --- GetUsage ---------------------------------------------------------------------------------

    async def usage(self, policies: list[KeyPolicy]) -> list[KeyUsage]:
        unavailable = errors.StateUnavailable(
            "the broker cannot reach its shared state (Redis) to read usage; retry shortly",
            retry_after=self.config.reconnect_max_backoff_seconds,
        )
        if not self.available:
            raise unavailable
        day, month = budget.windows(time.time())
        keys: list[str] = []
        for p in policies:
            names = scripts.key_names(self.config.key_prefix, p.name)
            keys += [names["day"] + day.id, names["month"] + month.id, names["streams"]]
        try:
            flat = await self._run(self._usage_script, keys=keys, args=[]) if keys else []
        except _Unavailable:
            raise unavailable from None
        out = []
        per = 2 * len(scripts.USAGE_FIELDS) + 1
        for i, p in enumerate(policies):
            row = [int(x) for x in flat[i * per : (i + 1) * per]]
            out.append(KeyUsage(p, WindowUsage(day, *row[0:5]), WindowUsage(month, *row[5:10]), row[10]))
        return out
