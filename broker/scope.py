"""One request's scope: everything the broker does around a completion RPC but not for it.

The servicer opens a `RequestScope` for each Complete / StreamComplete / Embed (`Scopes.open`) and
does only convert -> service -> convert inside it. The scope owns:

- the request id (set by the auth gate before the servicer runs; a servicer mounted
  without it makes its own), the caller's deadline, the call's `CallRecord`;
- drain: refusing new completions once `draining` (SHUTTING_DOWN), the in-flight count,
  and cutting what still runs when the grace period ends (each cut call ends with
  UNAVAILABLE / SHUTTING_DOWN, not a bare cancellation);
- on exit, whatever the outcome: the one request log line (with the trace id when tracing
  is on), the request's outcome on its server span, the metrics, and what the request
  used added to the caller's admission ticket (`_charge`: tokens and cost from
  `Finished.usage`, estimated usage included; a request cancelled, cut or interrupted after
  the upstream took it is charged an estimate), which the gate hands to the state store.

Error mapping is not here: every RPC's exceptions go to a status in one place, the guarded
handlers of broker/guard.py calling `ModelBrokerServicer.abort`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from broker import auth, errors, tracing
from broker.completion import CallRecord, Delivered, estimated_usage
from broker.metrics import BrokerMetrics
from broker.types import CompletionCall, Cost, Finished, Output, Usage

log = structlog.get_logger("broker.server")


def status_name(exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    if isinstance(exc, errors.BrokerError):
        return str(exc.code.name)
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


@dataclass(slots=True, eq=False)
class RequestScope:
    """One request's scope, and the context manager that opens and closes it (`Scopes.open`:
    `with scopes.open(...) as scope`). A class of its own rather than an asynccontextmanager:
    nothing in it awaits, and the generator and contextlib frames were per-request cost."""

    scopes: Scopes
    kind: str  # "Complete", "StreamComplete" or "Embed" (which sets `finished` from its usage)
    request_id: str
    requested_model: str
    t0: float
    deadline: float | None  # monotonic
    record: CallRecord = field(default_factory=CallRecord)
    finished: Finished | None = None
    failure: BaseException | None = None
    # The completion as converted (set by the servicer) and what reached the caller: a
    # request that ends without usage is charged an estimate from these.
    call: CompletionCall | None = None
    delivered: Delivered = field(default_factory=Delivered)

    # Time spent awaiting the completion pipeline (provider + upstream) for its next output;
    # the rest is the broker's own overhead (metrics). None: the call never got that far.
    upstream_wait: float | None = None
    # Set on entry: the in-flight gauge's child for `kind`, and the task running the call
    # (the handler's, or coalesced()'s reader for streams): what `cut` cancels.
    inflight: Any = None
    task: asyncio.Task[Any] | None = None

    def __enter__(self) -> RequestScope:
        scopes = self.scopes
        inflight = self.inflight = scopes.metrics.inflight.get(self.kind)
        if inflight is not None:
            inflight.inc()
        scopes.in_flight += 1
        task = self.task = asyncio.current_task()
        if task is not None:
            scopes._runs.add(task)
        if scopes.draining:
            refused = errors.ShuttingDown("the broker is shutting down: send this request to another replica")
            self.__exit__(type(refused), refused, None)  # counted, logged and measured like any end
            raise refused
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        scopes = self.scopes
        try:
            if exc is None:
                pass
            elif isinstance(exc, asyncio.CancelledError):
                if not scopes.cutting:
                    self.failure = exc
                else:
                    # Ours, at the end of the grace period: the upstream is closed by now (the
                    # cancellation ran through the provider); the caller gets a status that says why.
                    if self.task is not None:
                        self.task.uncancel()
                    self.failure = scopes.cut_error()
                    raise self.failure from None
            else:
                # GeneratorExit while cutting: coalesced()'s reader was cancelled between two reads.
                self.failure = (
                    scopes.cut_error() if scopes.cutting and isinstance(exc, GeneratorExit) else exc
                )
        finally:
            scopes._close(self)

    async def relay(self, outputs: AsyncIterator[Output]) -> AsyncIterator[Output]:
        """The completion's outputs, timed (two clock reads per output, nothing else per chunk)."""
        self.upstream_wait = 0.0
        since: float | None = time.monotonic()
        try:
            async for out in outputs:
                self.upstream_wait += time.monotonic() - (since or 0.0)
                since = None
                if isinstance(out, Finished):
                    self.finished = out
                else:
                    self.delivered.add(out)
                yield out
                since = time.monotonic()
        finally:
            if since is not None:
                self.upstream_wait += time.monotonic() - since


class Scopes:
    """The completions running now, drain, and the per-request bookkeeping."""

    def __init__(self, metrics: BrokerMetrics, grace_seconds: float) -> None:
        self.metrics = metrics
        self.grace_seconds = grace_seconds
        # (provider, model, usage) -> its cost at that model's price (set by the servicer):
        # prices the estimate of a request that ended without usage. None: such ends are free.
        self.pricer: Callable[[str, str, Usage], Cost] | None = None
        # Completion RPCs running now (drain and tests watch it return to 0); once
        # `draining`, new ones are refused with SHUTTING_DOWN while these finish.
        self.in_flight = 0
        self.draining = False
        # Set when the grace period ended with completions still running: each is cancelled
        # (`_runs`) and ends with UNAVAILABLE / SHUTTING_DOWN instead of a bare cancellation.
        self.cutting = False
        self._runs: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()

    def open(self, kind: str, context: Any, requested_model: str) -> RequestScope:
        """The scope of one completion RPC, to enter with `with`: on entry it is counted in
        flight (or refused with SHUTTING_DOWN once draining); on exit, whatever the outcome,
        it is charged, logged and measured."""
        t0 = time.monotonic()
        request_id = auth.current_request_id.get()
        if not request_id:
            request_id = auth.request_id_for(context.invocation_metadata())
            auth.current_request_id.set(request_id)
            context.set_trailing_metadata(((auth.REQUEST_ID_HEADER, request_id),))
        remaining = context.time_remaining()
        return RequestScope(
            self, kind, request_id, requested_model, t0, None if remaining is None else t0 + remaining
        )

    def _close(self, scope: RequestScope) -> None:
        if scope.inflight is not None:
            scope.inflight.dec()
        self.in_flight -= 1
        if scope.task is not None:
            self._runs.discard(scope.task)
        if self.in_flight == 0:
            self._idle.set()
        self._charge(scope)
        self._log(scope)
        self._observe(scope, time.monotonic() - scope.t0)

    # --- drain -----------------------------------------------------------------------------------

    def cut_error(self) -> errors.ShuttingDown:
        return errors.ShuttingDown(
            f"the broker shut down before this call finished (its {self.grace_seconds:g}s drain "
            "grace period ended): send it again, another replica takes it"
        )

    async def wait_idle(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for the running completions to end; True if none is left."""
        if self.in_flight == 0:
            return True
        self._idle.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self.in_flight == 0

    def running(self) -> frozenset[asyncio.Task[Any]]:
        """The tasks of the calls running now (a config reload drains what it retires after them)."""
        return frozenset(self._runs)

    def cut(self) -> int:
        """End every completion still running with UNAVAILABLE / SHUTTING_DOWN; how many there were."""
        self.cutting = True
        runs = list(self._runs)
        for t in runs:
            t.cancel()
        return len(runs)

    # --- on exit ----------------------------------------------------------------------------------

    def _charge(self, scope: RequestScope) -> None:
        """What the request used, on the caller's ticket (tokens-per-minute, spend, counters).

        Reported usage (or the completion's own estimate) when it finished. Without it: a
        request the upstream had taken (output delivered, or an attempt still open when it was
        cancelled or cut) is charged an estimate (the prompt and what was delivered, ~4
        characters a token) at the model's price, since the vendor bills it; one that failed
        before any answer, or was refused, costs nothing."""
        ticket = auth.current_ticket.get()
        if ticket is None:
            return
        if scope.finished is not None:
            ticket.charge(scope.finished.usage, scope.finished.cost)
            return
        last = scope.record.attempts[-1] if scope.record.attempts else None
        if scope.call is None or last is None:
            return
        # Cancelled (CancelledError, GeneratorExit) or cut at shutdown with an attempt open.
        ended_early = not isinstance(scope.failure, errors.BrokerError) or isinstance(
            scope.failure, errors.ShuttingDown
        )
        took = scope.delivered.chunks > 0 or (not last.error and ended_early)
        if not took:
            return
        d = scope.delivered
        usage = estimated_usage(scope.call, d.text_chars + d.tool_call_chars)
        cost = self.pricer(last.provider, last.model, usage) if self.pricer else Cost(known=False)
        ticket.charge(usage, cost)

    @staticmethod
    def _log(scope: RequestScope) -> None:
        last = scope.record.attempts[-1] if scope.record.attempts else None
        fields: dict[str, Any] = {
            "rpc": scope.kind,
            "request_id": scope.request_id,
            "caller": auth.caller_name(),
            "model": last.model if last else scope.requested_model,
            "requested_model": scope.requested_model,
            "provider": last.provider if last else "",
            "attempts": len(scope.record.attempts),
            "status": status_name(scope.failure),
            "duration_ms": round((time.monotonic() - scope.t0) * 1000, 2),
        }
        if scope.record.first_token_at is not None:
            fields["ttft_ms"] = round((scope.record.first_token_at - scope.t0) * 1000, 2)
        finished = scope.finished
        if finished is not None:
            fields["tokens_in"] = finished.usage.input_tokens
            fields["tokens_out"] = finished.usage.output_tokens
            if finished.usage.estimated:
                fields["usage_estimated"] = True
            fields["cost_micro_usd"] = finished.cost.total_micro_usd if finished.cost.known else None
            if finished.usage.reasoning_tokens:
                fields["tokens_reasoning"] = finished.usage.reasoning_tokens
            if finished.refusal is not None:
                fields["refusal_category"] = finished.refusal.category or "unspecified"
        call = scope.call
        if call is not None:
            # Who the request is for, as the caller said (bounded by convert); options by key only.
            if call.metadata.end_user_id:
                fields["end_user"] = call.metadata.end_user_id
            if call.metadata.tags:
                fields["tags"] = dict(call.metadata.tags)
            if call.provider_options:
                fields["provider_options"] = {t: sorted(o) for t, o in call.provider_options.items()}
        if isinstance(scope.failure, errors.BrokerError):
            fields["reason"] = scope.failure.reason
            fields["error"] = scope.failure.message
        rt = tracing.current()  # None unless tracing is on (broker/tracing.py)
        if rt is not None:
            fields["trace_id"] = rt.trace_id
            tracing.annotate_request(
                rt,
                request_id=scope.request_id,
                caller=fields["caller"],
                requested_model=scope.requested_model,
                provider=fields["provider"],
                model=fields["model"],
                attempts=len(scope.record.attempts),
                finished=finished,
                failure=scope.failure,
            )
        log.info("request", **fields)

    def _observe(self, scope: RequestScope, duration: float) -> None:
        """Metrics for one finished completion RPC (labels from the resolved target only)."""
        last = scope.record.attempts[-1] if scope.record.attempts else None
        finished = scope.finished
        cost = finished.cost.total_micro_usd if finished is not None and finished.cost.known else None
        self.metrics.observe(
            scope.kind,
            model=last.model if last else "",
            provider=last.provider if last else "",
            status=status_name(scope.failure),
            duration=duration,
            ttft=None if scope.record.first_token_at is None else scope.record.first_token_at - scope.t0,
            upstream_wait=scope.upstream_wait if last else None,
            tokens_in=finished.usage.input_tokens if finished is not None else 0,
            tokens_out=finished.usage.output_tokens if finished is not None else 0,
            cost_micro_usd=cost,
        )
