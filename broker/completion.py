"""One completion, end to end in neutral types: candidates -> fallback walk -> one target's attempts.

Three steps, each one function:

- `CompletionService.candidates`: the ordered targets. The model reference (an alias may
  be a fallback group), or selection by requirements, then `fallback_models`; each once.
  The caller's `Permissions` (resolved once by the auth gate) are judged here and nowhere
  else: selection skips what they refuse; a named model or fallback they refuse is refused
  with a status naming the key.
- `CompletionService.stream`: the fallback walk. Each candidate in turn, skipping one that
  cannot take the request (capabilities, context window); the first that answers is the
  answer; if none does, the caller hears the last retryable failure, else that every
  breaker was open, else the first candidate's reason.
- `CompletionService._target`: one target's attempts. Each is let through by its
  provider's circuit breaker and read under one timer (`_Reading`); a retryable failure
  before any output is retried with backoff (broker/retry.py) or hands over to the next
  candidate; a caller's own error ends the request at once.

The timer: time to first token and stalls between chunks are timed per provider, only the
wait for the upstream, never the caller's reading, and by this timer alone (the transport
sets no read timeout of its own on a completion's body; `read_timeout_seconds` caps both
limits). Thinking, reasoning and pings (ProgressEvent) re-arm it but are neither content
nor forwarded.

Streaming is the only path; unary accumulates it, buffered (`stream(buffered=True)`), so
a unary failure part-way may still retry or fall back with the partial answer thrown
away. What is held is bounded by what one response can carry (`server.max_message_bytes`):
past it the upstream is closed and the call fails RESOURCE_EXHAUSTED RESPONSE_TOO_LARGE.
A delta larger than MAX_DELTA_CHARS (one 12 MiB text event from an upstream) is passed on
as several deltas, so every stream message stays far below the gRPC message limit. An
upstream value the wire parsers did not foresee (a shape that raises ValueError, TypeError,
...) is an UPSTREAM_PROTOCOL_ERROR with the traceback in the log, never INTERNAL.

The first output to a streaming caller (`Started`) is held back until the first content,
so a failure before any content can move on without the caller ever seeing the first
provider's name. After content has been delivered a failure is an interruption
(STREAM_INTERRUPTED, with what was delivered): never retried, never spliced with another
model's output. A failed attempt's cause (the exception under the BrokerError) is logged
at debug level, `attempt_failed`; callers see only the mapped status.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import structlog

from broker import errors, tracing
from broker.breaker import counts_against_provider
from broker.catalog import compute_cost
from broker.registry import ProviderState, Registry, Target
from broker.retry import RetryPolicy
from broker.routing import LatencyTracker, Router
from broker.types import (
    ALLOW_ALL,
    Capability,
    CompletionCall,
    CompletionEvent,
    EndEvent,
    Finished,
    Output,
    Permissions,
    ProgressEvent,
    ReasoningDeltaEvent,
    ReasoningPart,
    Started,
    StartEvent,
    TextDeltaEvent,
    TextPart,
    ToolCall,
    ToolCallDeltaEvent,
    Usage,
)

log = structlog.get_logger("broker.completion")

# A lower bound on tokens for a text, for "known to exceed the context window": real
# tokenizers average ~4 bytes per token on prose; 6 keeps false alarms away.
BYTES_PER_TOKEN_LOWER_BOUND = 6
# One delta to the caller carries at most this many characters (at most 4 bytes each in
# UTF-8: 256 KiB, below the smallest gRPC message limit the config allows, 1 MiB + 1 KiB);
# a longer one is split, in order, over several deltas.
MAX_DELTA_CHARS = 64 * 1024
# Held (unary) tool-call deltas count this much beyond their text: the response's own
# framing per call, and a bound on how many tiny deltas can be held.
_HELD_DELTA_OVERHEAD = 16
# Exceptions a provider stream may raise on upstream data of a shape nothing foresaw.
_UNREADABLE = (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError)
_CAPABILITY_WORDS = {
    Capability.VISION: "vision (image input)",
    Capability.TOOLS: "tools",
    Capability.JSON_MODE: "JSON mode",
    Capability.REASONING: "reasoning (thinking that can be asked for)",
    Capability.STRUCTURED_OUTPUTS: "structured outputs (JSON schema, strict tools)",
    Capability.DOCUMENTS: "documents (PDF input)",
}


@dataclass(slots=True)
class Attempt:
    provider: str
    model: str
    error: str = ""


@dataclass(slots=True)
class CallRecord:
    """What happened, for the request log line and metrics."""

    attempts: list[Attempt] = field(default_factory=list)
    first_token_at: float | None = None


def check_capabilities(call: CompletionCall, target: Target) -> None:
    spec = target.spec
    if spec.kind == "embedding":
        raise errors.CapabilityMissing(
            f"model {spec.id} is an embedding model: use the Embed RPC, not a completion",
            provider=target.state.name,
            model=target.model,
            metadata={"kind": "embedding"},
        )
    if not spec.capabilities_known:
        return  # unknown is not "lacks": let the upstream decide
    missing = call.needed_capabilities() - spec.capabilities
    if missing:
        words = ", ".join(sorted(_CAPABILITY_WORDS[c] for c in missing))
        raise errors.CapabilityMissing(
            f"model {spec.id} does not support {words}, which this request needs",
            provider=target.state.name,
            model=target.model,
            metadata={"capabilities": ",".join(sorted(c.value for c in missing))},
        )


def estimated_input_tokens(call: CompletionCall) -> int:
    size = 0
    for m in call.messages:
        for p in m.content:
            if isinstance(p, TextPart):
                size += len(p.text.encode())
        for tc in m.tool_calls:
            size += len(tc.arguments.encode()) + len(tc.name)
    return size // BYTES_PER_TOKEN_LOWER_BOUND


def check_fits(call: CompletionCall, target: Target) -> None:
    spec = target.spec
    provider, model = target.state.name, target.model
    if spec.context_window:
        estimate = estimated_input_tokens(call)
        if estimate > spec.context_window:
            raise errors.ContextLengthExceeded(
                f"the prompt is at least {estimate} tokens, over the {spec.context_window}-token "
                f"context window of {spec.id}",
                provider=provider,
                model=model,
            )
    wanted = call.params.max_tokens
    if wanted is not None and spec.max_output_tokens and wanted > spec.max_output_tokens:
        raise errors.InvalidRequest(
            [
                (
                    "params.max_tokens",
                    f"{wanted} exceeds the {spec.max_output_tokens}-token maximum output of {spec.id}",
                )
            ],
            provider=provider,
            model=model,
        )


@dataclass(slots=True)
class _Walk:
    """The fallback walk so far, and what the caller hears if no candidate answers."""

    record: CallRecord
    answered: bool = False
    # The first candidate's reason it could not take the request (capabilities, context).
    unfit: errors.BrokerError | None = None
    # The last retryable failure; candidates skipped because their breaker was open.
    last_error: errors.BrokerError | None = None
    skipped: list[Target] = field(default_factory=list)

    def failure(self) -> errors.BrokerError:
        if self.last_error is not None:
            return with_attempts(self.last_error, self.record)
        if self.skipped:
            return all_breakers_open(self.skipped)
        assert self.unfit is not None, "every candidate either ran, was skipped, or failed its checks"
        return self.unfit


def _resolved(named: dict[str, list[Target] | errors.ModelNotFound], ref: str) -> list[Target]:
    found = named[ref]
    if isinstance(found, errors.ModelNotFound):
        raise found
    return found


class CompletionService:
    """Candidates -> the fallback walk -> per candidate: breaker, retries, the TTFT/stall timer -> outputs."""

    def __init__(
        self,
        registry: Registry,
        *,
        on_breaker_change: Callable[[ProviderState], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.routing = registry.settings.routing
        self.router = Router(registry)
        self.retry = RetryPolicy(self.routing.retry)
        # Called when a breaker opens or closes, so health follows at once.
        self.on_breaker_change = on_breaker_change

    def candidates(self, call: CompletionCall, permissions: Permissions = ALLOW_ALL) -> list[Target]:
        """The ordered candidates: the named model (or the selection), then fallbacks; each once.

        The one place a caller's permissions are judged. Selection leaves out, silently,
        what they refuse (a caller learns nothing of models it may not use). A named model
        or fallback is refused if ANY target it resolves to is refused, before anything is
        tried: the walk may reach any of them, and a forbidden provider must never be
        called on this caller's behalf.
        """
        named = self._resolve_named(call, permissions)
        req = call.requirements
        if not req.is_empty():
            self.router.validate(req)
        if call.model:
            targets = list(_resolved(named, call.model))
        else:
            selection = self.router.select(
                req,
                needed=call.needed_capabilities(),
                min_context=estimated_input_tokens(call),
                permitted=permissions.may_use,
            )
            if not selection.ranked:
                raise selection.error()
            targets = selection.ranked[: self.routing.max_selected_candidates]
        for ref in call.fallback_models:
            targets.extend(_resolved(named, ref))
        if not req.is_empty():
            # Requirements bind named models and fallbacks too (a price ceiling is a price ceiling).
            filtered = self.router.filter(targets, req)
            if not filtered.ranked:
                raise filtered.error()
            targets = filtered.ranked
        seen: set[tuple[str, str]] = set()
        unique: list[Target] = []
        for t in targets:
            if (t.state.name, t.model) not in seen:
                seen.add((t.state.name, t.model))
                unique.append(t)
        return unique

    def _resolve_named(
        self, call: CompletionCall, permissions: Permissions
    ) -> dict[str, list[Target] | errors.ModelNotFound]:
        """Each named ref resolved once, every target it reaches checked against the caller's
        permissions before anything else can fail; an unknown ref is kept for the walk to
        report in its order."""
        named: dict[str, list[Target] | errors.ModelNotFound] = {}
        for ref in (call.model, *call.fallback_models):
            if not ref or ref in named:
                continue
            try:
                targets = self.registry.resolve(ref)
            except errors.ModelNotFound as exc:
                named[ref] = exc
                continue
            named[ref] = targets
            hint = "; name an allowed provider explicitly as provider/model" if len(targets) > 1 else ""
            for t in targets:
                permissions.require(t.state.name, t.model, requested=ref, hint=hint)
        return named

    async def stream(
        self,
        call: CompletionCall,
        request_id: str,
        *,
        deadline: float | None,
        record: CallRecord,
        buffered: bool = False,
        permissions: Permissions = ALLOW_ALL,
    ) -> AsyncGenerator[Output, None]:
        """The fallback walk: the outputs of the first candidate that answers.

        `buffered` (unary): nothing reaches the caller until the end, so a failure part-way
        through may still retry or fall back, the partial output discarded, never spliced.
        `permissions`: what the caller may use, as the auth gate resolved it (see `candidates`).
        """
        targets = self.candidates(call, permissions)
        walk = _Walk(record)
        for i, target in enumerate(targets):
            try:
                check_capabilities(call, target)
                check_fits(call, target)
            except errors.BrokerError as exc:
                # A fallback that cannot take this request is skipped; the caller hears
                # about the first candidate's reason if none can.
                walk.unfit = walk.unfit or exc
                record.attempts.append(Attempt(target.state.name, target.model, exc.reason))
                continue
            more = i < len(targets) - 1
            # aclosing: leaving early (the caller gone, a held answer too large) closes the
            # attempt, and with it the upstream request, at once.
            async with aclosing(
                self._target(call, target, walk, request_id, deadline, buffered, more)
            ) as outs:
                async for out in outs:
                    yield out
            if walk.answered:
                return
        raise walk.failure()

    async def _target(
        self,
        call: CompletionCall,
        target: Target,
        walk: _Walk,
        request_id: str,
        deadline: float | None,
        buffered: bool,
        more: bool,
    ) -> AsyncGenerator[Output, None]:
        """One target's attempts, until it answers (`walk.answered`) or the walk moves on.

        Each attempt must pass the provider's breaker and is read under the TTFT/stall timer
        (with tracing on, it is one client span, a sibling of the request's other attempts);
        after a retryable failure with nothing delivered, a retry follows the backoff while
        the policy and the provider's retry budget allow (`more`: a fallback is waiting).
        Raises what ends the whole call: an interruption, or a failure no retry can help.
        """
        s = target.state
        rt = tracing.current()  # None unless tracing is on: then a client span per attempt
        tries = 0
        while True:
            if not s.breaker.acquire():
                walk.record.attempts.append(Attempt(s.name, target.model, "BREAKER_OPEN"))
                walk.skipped.append(target)
                return
            tries += 1
            if tries == 1:
                s.retry_budget.record_request()
            attempt = Attempt(s.name, target.model)
            walk.record.attempts.append(attempt)
            span = reading = None
            if rt is not None:
                number = len(walk.record.attempts)
                span = rt.start_attempt("chat", target, attempt=number, tries=tries, messages=call.messages)
                reading = _CapturingReading if rt.capture_content else None
            delivered = Delivered()
            held = Held(self.registry.settings.server.max_message_bytes) if buffered else None
            try:
                async with (reading or _Reading)(
                    call, target, request_id, deadline, walk.record, self.router.latency
                ) as up:
                    while (out := await up.next()) is not None:
                        if held is None:
                            delivered.add(out)
                            yield out
                        else:
                            held.add(out)
            except errors.BrokerError as exc:
                exc.with_target(s.name, target.model)
                attempt.error = exc.reason
                if span is not None:
                    tracing.end_attempt(span, error=exc)
                _log_cause(exc, request_id)
                await self._outcome(s, exc)
                if delivered.chunks:
                    raise interrupted(exc, delivered, call) from exc
                if not exc.retryable:
                    with_attempts(exc, walk.record)
                    raise
                walk.last_error = failed = exc
                wait = self.retry.delay(exc, tries, deadline=deadline, fallback_waiting=more)
            except BaseException as exc:
                # Cancelled (or closed by the consumer): says nothing about the provider.
                s.breaker.release()
                if span is not None:
                    tracing.end_attempt(span, error=exc)
                raise
            else:
                if span is not None:
                    answer = "".join(up.text) if isinstance(up, _CapturingReading) else None
                    tracing.end_attempt(span, model=target.model, finished=up.final, answer=answer)
                await self._outcome(s, None)
                if held is not None:
                    for out in held.outputs():
                        yield out
                walk.answered = True
                return
            if wait is None or not s.retry_budget.try_spend():
                if more:
                    log.info("fallback", request_id=request_id, failed=target.spec.id, reason=failed.reason)
                return
            log.info(
                "retry",
                request_id=request_id,
                target=target.spec.id,
                reason=failed.reason,
                attempt=tries + 1,
                delay_ms=round(wait * 1000, 1),
            )
            await asyncio.sleep(wait)

    async def _outcome(self, s: ProviderState, exc: errors.BrokerError | None) -> None:
        """Feed the provider's breaker; health follows when it opens or closes."""
        breaker = s.breaker
        if exc is None:
            changed = breaker.success()
            if changed:
                log.info("breaker_closed", provider=s.name)
        elif counts_against_provider(exc):
            s.last_error = exc.message
            changed = breaker.failure(exc.message)
            if changed:
                s.last_error = f"circuit breaker open: {breaker.open_reason}"
                log.warning(
                    "breaker_open",
                    provider=s.name,
                    reason=breaker.open_reason,
                    cooldown_seconds=breaker.settings.cooldown_seconds,
                )
        else:
            breaker.release()
            changed = False
        if changed and self.on_breaker_change is not None:
            await self.on_breaker_change(s)


def _log_cause(exc: errors.BrokerError, request_id: str) -> None:
    """A failed attempt's cause (the aiohttp, OS or parser exception under it), for the log
    only: the caller's status carries the BrokerError's own message and nothing of this.

    Rendered here and redacted before it is logged, whatever the log set-up: a cause's text
    can hold what no message would (aiohttp names a proxy URL with its credentials)."""
    cause = exc.__cause__
    if cause is None or not log.is_enabled_for(logging.DEBUG):
        return
    trace = "".join(traceback.format_exception(cause))
    log.debug(
        "attempt_failed",
        request_id=request_id,
        provider=exc.provider,
        model=exc.model,
        reason=exc.reason,
        error=exc.message,
        exception=errors.bound_redacted(trace, errors.MAX_LOG_EXCEPTION_CHARS),
    )


class _Reading:
    """One attempt's upstream stream, read an event at a time under the one timer and turned
    into outputs: Started before the first content, deltas (split past MAX_DELTA_CHARS),
    Finished with usage (estimated when the upstream reported none) and cost.

    `async with` opens it (the provider's request, the timer) and closes both, whatever the
    reason (closing the upstream HTTP request at once). `next()` is one coroutine call per
    output rather than one more async-generator layer per chunk.
    """

    __slots__ = (
        "call",
        "events",
        "final",
        "finished",
        "generated_chars",
        "latency",
        "origin",
        "pending",
        "progress_at",
        "progressed",
        "record",
        "request_id",
        "stall",
        "started",
        "t0",
        "target",
        "timer",
        "ttft",
    )

    def __init__(
        self,
        call: CompletionCall,
        target: Target,
        request_id: str,
        deadline: float | None,
        record: CallRecord,
        latency: LatencyTracker,
    ) -> None:
        spec, cfg = target.spec, target.state.config
        self.call, self.target, self.request_id = call, target, request_id
        self.record, self.latency = record, latency
        self.t0 = time.monotonic()
        self.origin = target.provider.reasoning_origin(target.model)
        request = call.upstream(
            target.model,
            provider_type=cfg.type,
            reasoning_origin=self.origin,
            # Not the model's maximum (64,000 for claude-sonnet-4-5): the provider's configured
            # default, or the protocol's own rule, capped by the model's max output.
            default_max_tokens=cfg.default_max_tokens,
            max_output_tokens=spec.max_output_tokens,
            reasoning_model=spec.reasoning,
            # The caller's remaining deadline bounds the pool wait and the connect.
            timeout=None if deadline is None else max(deadline - self.t0, 0.001),
            caller_times_reads=True,  # this timer, not the HTTP read timeout
        )
        self.events = target.provider.stream(request)
        self.timer: _WaitTimer | None = None
        # The two limits; read_timeout_seconds (the longest wait for the upstream) caps both.
        self.ttft = min(cfg.ttft_timeout_seconds, cfg.read_timeout_seconds)
        self.stall = min(cfg.stall_timeout_seconds, cfg.read_timeout_seconds)
        self.started = False
        self.finished = False
        self.final: Finished | None = None  # the Finished output, once the upstream ended
        # Outputs of the last event not returned yet, last first (Started comes before the
        # first content; an oversize delta is several).
        self.pending: list[Output] = []
        # Before the first content the TTFT limit runs from the last sign of progress
        # (thinking, reasoning, a ping), at first the request itself: a model thinking
        # aloud for minutes is working, one silent for ttft_timeout_seconds is not.
        self.progress_at = self.t0
        self.progressed = False
        self.generated_chars = 0  # text, tool calls and hidden reasoning, for a usage estimate

    async def __aenter__(self) -> _Reading:
        self.timer = _WaitTimer()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.events.aclose()
        finally:
            if self.timer is not None:
                self.timer.close()

    async def next(self) -> Output | None:
        """The next output; None after Finished. Raises BrokerErrors, the timeouts included."""
        if self.pending:
            return self.pending.pop()
        if self.finished:
            return None
        timer = self.timer
        assert timer is not None, "read inside `async with`"
        while True:
            # Only the wait for the upstream is timed, never the caller reading slowly.
            if self.started:
                timer.start_wait(self.stall)
            else:
                timer.start_wait(self.ttft - (time.monotonic() - self.progress_at))
            try:
                ev = await anext(self.events)
            except StopAsyncIteration:
                name = self.target.state.name
                raise errors.UpstreamProtocolError(
                    f"{name}: the stream ended without a final message", provider=name
                ) from None
            except _UNREADABLE as exc:
                raise self._unreadable() from exc
            except asyncio.CancelledError:
                if not timer.expired():
                    raise
                raise self._timed_out() from None  # the cause is our own timer
            finally:
                timer.end_wait()
            if self.started and type(ev) is TextDeltaEvent and len(ev.text) <= MAX_DELTA_CHARS:
                self.generated_chars += len(ev.text)  # the common case, first
                return ev
            out = self._outputs(ev)
            if out is not None:
                return out

    def _outputs(self, ev: CompletionEvent) -> Output | None:
        """The first output of an event (the rest go to `pending`); None for one that is not content."""
        if isinstance(ev, StartEvent):
            return None
        if isinstance(ev, ProgressEvent):
            # Re-arms the timer (the next wait starts now); not content, so no Started (a
            # fallback is still possible) and nothing for the caller.
            self.generated_chars += ev.chars
            if not self.started:
                self.progress_at = time.monotonic()
                self.progressed = True
            return None
        outs: list[Output]
        if isinstance(ev, EndEvent):
            self.finished = True
            usage = ev.usage
            if not ev.usage_reported:
                # Zeros would pass for counts (and bill nothing): estimate, labelled so.
                usage = estimated_usage(self.call, self.generated_chars)
            cost = compute_cost(self.target.spec.pricing, usage, local=self.target.state.local)
            outs = [Finished(ev.finish_reason, usage, cost, ev.refusal)]
            self.final = outs[0] if isinstance(outs[0], Finished) else None  # for the attempt's span
        elif isinstance(ev, TextDeltaEvent):
            self.generated_chars += len(ev.text)
            outs = list(split_text(ev)) if len(ev.text) > MAX_DELTA_CHARS else [ev]
        elif isinstance(ev, ReasoningDeltaEvent):
            # Content: the caller sees it, so after it a failure is an interruption, not a fallback.
            self.generated_chars += len(ev.text)
            outs = list(split_reasoning(ev)) if len(ev.text) > MAX_DELTA_CHARS else [ev]
        else:
            self.generated_chars += len(ev.name) + len(ev.arguments_delta)
            outs = list(split_tool_call(ev)) if len(ev.arguments_delta) > MAX_DELTA_CHARS else [ev]
        if not self.started:
            self.started = True
            now = time.monotonic()
            self.record.first_token_at = now
            self.latency.observe(self.target.spec.id, now - self.t0)
            outs.insert(
                0,
                Started(self.request_id, self.target.state.name, self.target.model, self.origin),
            )
        outs.reverse()
        first = outs.pop()
        self.pending = outs
        return first

    def _unreadable(self) -> errors.UpstreamProtocolError:
        # A bug in reading this upstream's bytes, not the caller's: the traceback goes to
        # the log, the caller gets a stable reason.
        name = self.target.state.name
        log.exception("upstream_unreadable", request_id=self.request_id, provider=name)
        return errors.UpstreamProtocolError(
            f"{name}: the upstream's answer could not be read (see the broker's log for this request id)",
            provider=name,
            model=self.target.model,
        )

    def _timed_out(self) -> errors.UpstreamTimeout:
        name, model = self.target.state.name, self.target.model
        if self.started:
            return errors.stream_stalled(name, self.stall, model=model)
        if self.progressed:
            what = f"no first token within {self.ttft:g}s of the last progress (thinking, reasoning or ping)"
        else:
            what = f"no first token within {self.ttft:g}s"
        return errors.UpstreamTimeout(f"{name}: {what}", provider=name, model=model)


class _CapturingReading(_Reading):
    """A `_Reading` that also keeps the answer's text, for traces that capture content
    (`tracing.capture_content`); chosen per attempt, so the usual path pays nothing for it."""

    __slots__ = ("text",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.text: list[str] = []

    async def next(self) -> Output | None:
        out = await super().next()
        if isinstance(out, TextDeltaEvent):
            self.text.append(out.text)
        return out


class _WaitTimer:
    """Times each wait for the next upstream event with one timer per attempt.

    `asyncio.timeout` per chunk costs a timer handle, a current_task() lookup and a cancel
    on every event (13% of the daemon's CPU when relaying one message per chunk). Here an
    event only stores a time: the one scheduled handle re-arms itself when it fires before
    the current wait's expiry, and while no wait is open (the caller is reading) it lapses.
    On expiry it cancels the task, as asyncio.timeout does, and `expired()` tells that
    cancellation from any other (uncancel() keeps an outer cancel pending).
    """

    __slots__ = ("_expires_at", "_fired", "_handle", "_loop", "_task")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._handle: asyncio.TimerHandle | None = None
        self._expires_at: float | None = None
        self._fired = False

    def start_wait(self, limit: float) -> None:
        self._expires_at = self._loop.time() + max(limit, 0.0)
        handle = self._handle
        if handle is not None and handle.when() > self._expires_at:
            handle.cancel()  # a shorter limit than the pending one (first token -> stalls)
            handle = None
        if handle is None:
            self._handle = self._loop.call_at(self._expires_at, self._check)

    def end_wait(self) -> None:
        self._expires_at = None

    def expired(self) -> bool:
        """True when this timer cancelled the task; consumes that cancellation."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() == 0

    def _check(self) -> None:
        self._handle = None
        if self._expires_at is None:
            return  # not waiting: the next start_wait arms a new handle
        if self._loop.time() >= self._expires_at:
            self._fired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(self._expires_at, self._check)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def split_text(ev: TextDeltaEvent, size: int = MAX_DELTA_CHARS) -> list[TextDeltaEvent]:
    """An oversize text delta as several, in order, each at most `size` characters."""
    text = ev.text
    return [TextDeltaEvent(text[i : i + size]) for i in range(0, len(text), size)]


def split_reasoning(ev: ReasoningDeltaEvent, size: int = MAX_DELTA_CHARS) -> list[ReasoningDeltaEvent]:
    """An oversize reasoning delta as several of the same block; the signature (or redacted
    data) stays on the last, where callers expect a block's end."""
    text = ev.text
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    out = [ReasoningDeltaEvent(ev.index, p) for p in pieces[:-1]]
    out.append(ReasoningDeltaEvent(ev.index, pieces[-1], ev.signature, ev.redacted_data))
    return out


def split_tool_call(ev: ToolCallDeltaEvent, size: int = MAX_DELTA_CHARS) -> list[ToolCallDeltaEvent]:
    """An oversize tool-call delta as several: the first keeps id and name, the rest carry
    argument fragments with the same index (which callers already concatenate)."""
    args = ev.arguments_delta
    parts = [args[i : i + size] for i in range(0, len(args), size)]
    first = ToolCallDeltaEvent(index=ev.index, id=ev.id, name=ev.name, arguments_delta=parts[0])
    return [first, *(ToolCallDeltaEvent(index=ev.index, arguments_delta=p) for p in parts[1:])]


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class Held:
    """A buffered (unary) attempt's outputs, bounded by what one response can carry.

    Consecutive text deltas (and argument fragments of one tool call) are merged as they
    arrive, so a long answer of tiny deltas is held as a few strings, not a million
    objects; `add` raises ResponseTooLarge once the content passes `limit` UTF-8 bytes
    (the caller then closes the upstream: nothing more is read).
    """

    __slots__ = ("_chunks", "_held", "_key", "_pieces", "_pieces_chars", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._held: list[Output] = []
        # The run being merged: None, ("text",) or ("args", index); its pieces, then chunks.
        self._key: tuple[str, int] | None = None
        self._pieces: list[str] = []
        self._pieces_chars = 0
        self._chunks: list[str] = []

    def add(self, out: Output) -> None:
        if isinstance(out, TextDeltaEvent):
            self._merge(("text", 0), out.text)
        elif isinstance(out, ReasoningDeltaEvent):
            if out.text:
                self._merge(("reasoning", out.index), out.text)
            if out.signature or out.redacted_data:
                self._flush()
                self.size += _HELD_DELTA_OVERHEAD + len(out.signature) + len(out.redacted_data)
                self._held.append(ReasoningDeltaEvent(out.index, "", out.signature, out.redacted_data))
        elif isinstance(out, ToolCallDeltaEvent):
            self.size += _HELD_DELTA_OVERHEAD
            if out.id or out.name:
                self._flush()
                self.size += _utf8_len(out.id) + _utf8_len(out.name) + _utf8_len(out.arguments_delta)
                self._held.append(out)
            else:
                self._merge(("args", out.index), out.arguments_delta)
        else:
            self._flush()
            self._held.append(out)
        if self.size > self.limit:
            raise errors.ResponseTooLarge(
                f"the answer grew past {self.limit} bytes, the most one Complete response carries "
                "(server.max_message_bytes), so the broker stopped the upstream; use StreamComplete "
                "for answers this long, or set params.max_tokens lower",
                metadata={"limit_bytes": str(self.limit)},
            )

    def _merge(self, key: tuple[str, int], text: str) -> None:
        if key != self._key:
            self._flush()
            self._key = key
        self.size += _utf8_len(text)
        self._pieces.append(text)
        self._pieces_chars += len(text)
        if len(self._pieces) >= 256 or self._pieces_chars >= 64 * 1024:
            self._chunks.append("".join(self._pieces))
            self._pieces.clear()
            self._pieces_chars = 0

    def _flush(self) -> None:
        if self._key is None:
            return
        text = "".join(self._chunks) + "".join(self._pieces)
        kind, index = self._key
        if kind == "text":
            self._held.append(TextDeltaEvent(text))
        elif kind == "reasoning":
            self._held.append(ReasoningDeltaEvent(index, text))
        else:
            self._held.append(ToolCallDeltaEvent(index=index, arguments_delta=text))
        self._key = None
        self._pieces.clear()
        self._pieces_chars = 0
        self._chunks.clear()

    def outputs(self) -> list[Output]:
        self._flush()
        return self._held


@dataclass(slots=True)
class Delivered:
    """What reached the caller from one attempt: after any of it, a failure is an interruption."""

    chunks: int = 0
    text_chars: int = 0
    tool_call_chars: int = 0
    reasoning_chars: int = 0

    def add(self, out: Output) -> None:
        if isinstance(out, TextDeltaEvent):
            self.chunks += 1
            self.text_chars += len(out.text)
        elif isinstance(out, ReasoningDeltaEvent):
            self.chunks += 1
            self.reasoning_chars += len(out.text)
        elif isinstance(out, ToolCallDeltaEvent):
            self.chunks += 1
            self.tool_call_chars += len(out.name) + len(out.arguments_delta)


def estimated_tokens(chars: int) -> int:
    # ~4 characters per token on English prose and JSON: an estimate, and labelled one.
    return -(-chars // 4)


def prompt_chars(call: CompletionCall) -> int:
    return sum(len(p.text) for m in call.messages for p in m.content if isinstance(p, TextPart))


def estimated_usage(call: CompletionCall, generated_chars: int) -> Usage:
    """For a stream that ended cleanly without usage (llama.cpp's server): estimates, marked so."""
    return Usage(
        input_tokens=estimated_tokens(prompt_chars(call)),
        output_tokens=estimated_tokens(generated_chars),
        estimated=True,
    )


def interrupted(
    cause: errors.BrokerError, delivered: Delivered, call: CompletionCall
) -> errors.StreamInterrupted:
    """The end of a stream that failed after content: what was delivered and usage so far, in ErrorInfo."""
    return errors.StreamInterrupted(
        f"the stream from {cause.provider}/{cause.model} failed after {delivered.chunks} chunks "
        f"({delivered.text_chars} characters{_of_reasoning(delivered)}) were sent; not retried, "
        "to avoid splicing two answers: "
        f"{cause.message}",
        provider=cause.provider,
        model=cause.model,
        metadata={
            "cause": cause.reason,
            "delivered_chunks": str(delivered.chunks),
            "delivered_text_chars": str(delivered.text_chars),
            "delivered_tool_call_chars": str(delivered.tool_call_chars),
            "delivered_reasoning_chars": str(delivered.reasoning_chars),
            # The upstream reports usage only at the end; these are estimates from what was sent.
            "usage_input_tokens": str(estimated_tokens(prompt_chars(call))),
            "usage_output_tokens": str(
                estimated_tokens(delivered.text_chars + delivered.tool_call_chars + delivered.reasoning_chars)
            ),
            "usage_estimated": "true",
        },
    )


def _of_reasoning(delivered: Delivered) -> str:
    return f" of text, {delivered.reasoning_chars} of reasoning" if delivered.reasoning_chars else ""


def with_attempts(exc: errors.BrokerError, record: CallRecord) -> errors.BrokerError:
    """After more than one attempt, ErrorInfo lists them all (what was tried, what each got)."""
    if len(record.attempts) > 1:
        exc.metadata["attempts"] = ", ".join(
            f"{a.provider}/{a.model}: {a.error or 'OK'}" for a in record.attempts
        )
    return exc


def all_breakers_open(skipped: list[Target]) -> errors.NoHealthyProvider:
    names = ", ".join(sorted({t.state.name for t in skipped}))
    wait = min(t.state.breaker.retry_in() for t in skipped)
    first = skipped[0]
    return errors.NoHealthyProvider(
        f"every candidate's provider has its circuit breaker open, or testing recovery ({names}): "
        f"{first.state.breaker.open_reason or 'recent failures'}",
        provider=first.state.name,
        model=first.model,
        retry_after=wait,
    )


@dataclass(slots=True)
class Accumulated:
    """A unary answer built from the outputs. Content keeps the order the model produced it:
    a new part begins whenever text follows reasoning or the reasoning block changes, so
    [text, thinking, text] (Anthropic's adaptive mode) is sent back as it came."""

    started: Started | None = None
    # Runs of content: ("text", -1, [pieces]) or ("reasoning", index, [pieces, signature, data]).
    runs: list[tuple[str, int, list[str]]] = field(default_factory=list)
    tool_calls: dict[int, list[str]] = field(default_factory=dict)  # index -> [id, name, args...]
    finished: Finished | None = None

    def add(self, out: Output) -> None:
        if isinstance(out, TextDeltaEvent):
            if out.text:
                self._run("text", -1).append(out.text)
        elif isinstance(out, ReasoningDeltaEvent):
            run = self._run("reasoning", out.index)
            if not run:
                run.extend(("", ""))  # [signature, redacted data, text pieces...]
            if out.signature:
                run[0] = out.signature
            if out.redacted_data:
                run[1] = out.redacted_data
            if out.text:
                run.append(out.text)
        elif isinstance(out, Started):
            self.started = out
        elif isinstance(out, ToolCallDeltaEvent):
            parts = self.tool_calls.setdefault(out.index, ["", ""])
            if out.id:
                parts[0] = out.id
            if out.name:
                parts[1] = out.name
            if out.arguments_delta:
                parts.append(out.arguments_delta)
        elif isinstance(out, Finished):
            self.finished = out

    def _run(self, kind: str, index: int) -> list[str]:
        if self.runs and self.runs[-1][0] == kind and self.runs[-1][1] == index:
            return self.runs[-1][2]
        pieces: list[str] = []
        self.runs.append((kind, index, pieces))
        return pieces

    def parts(self) -> list[TextPart | ReasoningPart]:
        ptype = self.started.provider_type if self.started is not None else ""
        out: list[TextPart | ReasoningPart] = []
        for kind, _, pieces in self.runs:
            if kind == "text":
                out.append(TextPart("".join(pieces)))
            else:
                out.append(ReasoningPart("".join(pieces[2:]), pieces[0], pieces[1], ptype))
        return out

    def calls(self) -> list[ToolCall]:
        return [
            ToolCall(id=p[0], name=p[1], arguments="".join(p[2:]) or "{}")
            for _, p in sorted(self.tool_calls.items())
        ]
