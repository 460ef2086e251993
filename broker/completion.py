"""One completion, end to end in neutral types: candidates -> checks -> provider stream -> cost.

Candidates come from the model reference (an alias may be a fallback group), or from
selection by requirements, then `fallback_models`. Per candidate: its provider's circuit
breaker must let it through; a retryable failure before any output is retried with
backoff (broker/retry.py) or moves on to the next candidate; a caller's own error ends
the request at once. Time to first token and stalls between chunks are timed per
provider (only the wait for the upstream, never the caller's reading); thinking, reasoning
and pings (ProgressEvent) re-arm both timers but are neither content nor forwarded.

Streaming is the only path; unary accumulates it, buffered (`stream(buffered=True)`), so
a unary failure part-way may still retry or fall back with the partial answer thrown
away. What is held is bounded by what one response can carry (`server.max_message_bytes`):
past it the upstream is closed and the call fails RESOURCE_EXHAUSTED RESPONSE_TOO_LARGE.
A delta larger than MAX_DELTA_CHARS (one 12 MiB text event from an upstream) is passed on
as several deltas, so every stream message stays far below the gRPC message limit. An
upstream value the wire parsers did not foresee (a shape that raises ValueError, TypeError,
...) is an UPSTREAM_PROTOCOL_ERROR with the traceback in the log, never INTERNAL.

The first message to a streaming caller (`Started`) is held back until the first content,
so a failure before any content can move on without the caller ever seeing the first
provider's name. After content has been delivered a failure is an interruption
(STREAM_INTERRUPTED, with what was delivered): never retried, never spliced with another
model's output.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import structlog

from broker import auth, errors
from broker.breaker import counts_against_provider
from broker.catalog import compute_cost
from broker.config import RoutingConfig
from broker.convert import CompletionCall
from broker.registry import ProviderState, Registry, Target
from broker.retry import RetryPolicy
from broker.routing import Router
from broker.types import (
    Capability,
    CompletionRequest,
    Cost,
    EndEvent,
    FinishReason,
    ProgressEvent,
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
}


@dataclass(slots=True, frozen=True)
class Started:
    request_id: str
    provider: str
    model: str


@dataclass(slots=True, frozen=True)
class Finished:
    finish_reason: FinishReason
    usage: Usage
    cost: Cost


Output = Started | TextDeltaEvent | ToolCallDeltaEvent | Finished


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
    upstream_wait: float = 0.0


def check_capabilities(call: CompletionCall, target: Target) -> None:
    spec = target.spec
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


class CompletionService:
    """Candidates -> per candidate: breaker, retries with backoff, TTFT/stall timeouts -> outputs."""

    def __init__(
        self,
        registry: Registry,
        routing: RoutingConfig | None = None,
        *,
        on_breaker_change: Callable[[ProviderState], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.routing = routing or registry.settings.routing
        self.router = Router(registry)
        self.retry = RetryPolicy(self.routing.retry, rng=rng)
        # Called when a breaker opens or closes, so health follows at once.
        self.on_breaker_change = on_breaker_change

    def candidates(self, call: CompletionCall) -> list[Target]:
        """The ordered candidates: the named model (or the selection), then fallbacks; each once."""
        req = call.requirements
        if not req.is_empty():
            self.router.validate(req)
        if call.model:
            targets = list(self.registry.resolve(call.model))
        else:
            selection = self.router.select(
                req,
                needed=call.needed_capabilities(),
                min_context=estimated_input_tokens(call),
                permitted=auth.permitted,
            )
            if not selection.ranked:
                raise selection.error()
            targets = selection.ranked[: self.routing.max_selected_candidates]
        for ref in call.fallback_models:
            targets.extend(self.registry.resolve(ref))
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

    async def stream(
        self,
        call: CompletionCall,
        request_id: str,
        *,
        deadline: float | None,
        record: CallRecord,
        buffered: bool = False,
    ) -> AsyncIterator[Output]:
        """Outputs of the first candidate that succeeds.

        `buffered` (unary): nothing reaches the caller until the end, so a failure part-way
        through may still retry or fall back, the partial output discarded, never spliced.
        """
        targets = self.candidates(call)
        check_error: errors.BrokerError | None = None
        last_error: errors.BrokerError | None = None
        skipped: list[Target] = []
        for i, target in enumerate(targets):
            s = target.state
            more = i < len(targets) - 1
            try:
                check_capabilities(call, target)
                check_fits(call, target)
            except errors.BrokerError as exc:
                # A fallback that cannot take this request is skipped; the caller hears
                # about the first candidate's reason if none can.
                check_error = check_error or exc
                record.attempts.append(Attempt(s.name, target.model, exc.reason))
                continue
            tries = 0
            while True:
                if not s.breaker.acquire():
                    record.attempts.append(Attempt(s.name, target.model, "BREAKER_OPEN"))
                    skipped.append(target)
                    break
                tries += 1
                if tries == 1:
                    s.retry_budget.record_request()
                attempt = Attempt(s.name, target.model)
                record.attempts.append(attempt)
                delivered = Delivered()
                held = Held(self.registry.settings.server.max_message_bytes) if buffered else None
                try:
                    # aclosing: leaving early (the caller gone, a held answer too large)
                    # closes the attempt, and with it the upstream request, at once.
                    async with aclosing(self._attempt(call, target, request_id, deadline, record)) as outs:
                        async for out in outs:
                            if held is not None:
                                held.add(out)
                            else:
                                delivered.add(out)
                                yield out
                except errors.BrokerError as exc:
                    exc.with_target(s.name, target.model)
                    attempt.error = exc.reason
                    await self._outcome(s, exc)
                    if delivered.chunks:
                        raise interrupted(exc, delivered, call) from exc
                    if not exc.retryable:
                        with_attempts(exc, record)
                        raise
                    last_error = exc
                    wait = self.retry.delay(exc, tries, deadline=deadline, fallback_waiting=more)
                    if wait is None or not s.retry_budget.try_spend():
                        if more:
                            log.info(
                                "fallback", request_id=request_id, failed=target.spec.id, reason=exc.reason
                            )
                        break
                    log.info(
                        "retry",
                        request_id=request_id,
                        target=target.spec.id,
                        reason=exc.reason,
                        attempt=tries + 1,
                        delay_ms=round(wait * 1000, 1),
                    )
                    await asyncio.sleep(wait)
                    continue
                except BaseException:
                    # Cancelled (or closed by the consumer): says nothing about the provider.
                    s.breaker.release()
                    raise
                await self._outcome(s, None)
                if held is not None:
                    for out in held.outputs():
                        yield out
                return
        if last_error is not None:
            raise with_attempts(last_error, record)
        if skipped:
            raise all_breakers_open(skipped)
        assert check_error is not None, "every candidate either ran, was skipped, or failed its checks"
        raise check_error

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

    async def _attempt(
        self,
        call: CompletionCall,
        target: Target,
        request_id: str,
        deadline: float | None,
        record: CallRecord,
    ) -> AsyncGenerator[Output, None]:
        spec, cfg = target.spec, target.state.config
        t0 = time.monotonic()
        request = CompletionRequest(
            model=target.model,
            messages=call.messages,
            tools=call.tools,
            tool_choice=call.tool_choice,
            params=call.params,
            # Not the model's maximum (64,000 for claude-sonnet-4-5): the provider's configured
            # default, or the protocol's own rule, capped by the model's max output.
            default_max_tokens=cfg.default_max_tokens,
            max_output_tokens=spec.max_output_tokens,
            reasoning_model=spec.reasoning,
            # The caller's remaining deadline bounds every phase of the upstream request.
            timeout=None if deadline is None else max(deadline - t0, 0.001),
        )
        started = False
        # Before the first content the TTFT limit runs from the last sign of progress
        # (thinking, reasoning, a ping), at first the request itself: a model thinking
        # aloud for minutes is working, one silent for ttft_timeout_seconds is not.
        progress_at = t0
        progressed = False
        generated_chars = 0  # text, tool calls and hidden reasoning, for a usage estimate
        timer = _WaitTimer()
        try:
            async with aclosing(target.provider.stream(request)) as events:
                while True:
                    # Only the wait for the upstream is timed, never the caller reading slowly.
                    if started:
                        timer.start_wait(cfg.stall_timeout_seconds)
                    else:
                        timer.start_wait(cfg.ttft_timeout_seconds - (time.monotonic() - progress_at))
                    try:
                        ev = await anext(events)
                    except StopAsyncIteration:
                        break
                    except _UNREADABLE:
                        # A bug in reading this upstream's bytes, not the caller's: the
                        # traceback goes to the log, the caller gets a stable reason.
                        log.exception(
                            "upstream_unreadable", request_id=request_id, provider=target.state.name
                        )
                        raise errors.UpstreamProtocolError(
                            f"{target.state.name}: the upstream's answer could not be read "
                            "(see the broker's log for this request id)",
                            provider=target.state.name,
                            model=target.model,
                        ) from None
                    except asyncio.CancelledError:
                        if not timer.expired():
                            raise
                        if started:
                            what = f"stream stalled (no chunk for {cfg.stall_timeout_seconds:g}s)"
                        elif progressed:
                            what = (
                                f"no first token within {cfg.ttft_timeout_seconds:g}s "
                                "of the last progress (thinking, reasoning or ping)"
                            )
                        else:
                            what = f"no first token within {cfg.ttft_timeout_seconds:g}s"
                        raise errors.UpstreamTimeout(
                            f"{target.state.name}: {what}", provider=target.state.name, model=target.model
                        ) from None
                    finally:
                        timer.end_wait()
                    if isinstance(ev, StartEvent):
                        continue
                    if isinstance(ev, ProgressEvent):
                        # Re-arms the timers (the next wait starts now); not content, so no
                        # Started (a fallback is still possible) and nothing for the caller.
                        generated_chars += ev.chars
                        if not started:
                            progress_at = time.monotonic()
                            progressed = True
                        continue
                    if not started:
                        started = True
                        now = time.monotonic()
                        record.first_token_at = now
                        self.router.latency.observe(spec.id, now - t0)
                        yield Started(request_id=request_id, provider=target.state.name, model=target.model)
                    if isinstance(ev, EndEvent):
                        usage = ev.usage
                        if not ev.usage_reported:
                            # Zeros would pass for counts (and bill nothing): estimate, labelled so.
                            usage = estimated_usage(call, generated_chars)
                        cost = compute_cost(spec.pricing, usage, local=target.state.local)
                        yield Finished(ev.finish_reason, usage, cost)
                        return
                    if isinstance(ev, TextDeltaEvent):
                        generated_chars += len(ev.text)
                        if len(ev.text) > MAX_DELTA_CHARS:
                            for piece in split_text(ev):
                                yield piece
                            continue
                    else:
                        generated_chars += len(ev.name) + len(ev.arguments_delta)
                        if len(ev.arguments_delta) > MAX_DELTA_CHARS:
                            for part in split_tool_call(ev):
                                yield part
                            continue
                    yield ev
        finally:
            timer.close()
        raise errors.UpstreamProtocolError(
            f"{target.state.name}: the stream ended without a final message", provider=target.state.name
        )


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

    def add(self, out: Output) -> None:
        if isinstance(out, TextDeltaEvent):
            self.chunks += 1
            self.text_chars += len(out.text)
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
        f"({delivered.text_chars} characters) were sent; not retried, to avoid splicing two answers: "
        f"{cause.message}",
        provider=cause.provider,
        model=cause.model,
        metadata={
            "cause": cause.reason,
            "delivered_chunks": str(delivered.chunks),
            "delivered_text_chars": str(delivered.text_chars),
            "delivered_tool_call_chars": str(delivered.tool_call_chars),
            # The upstream reports usage only at the end; these are estimates from what was sent.
            "usage_input_tokens": str(estimated_tokens(prompt_chars(call))),
            "usage_output_tokens": str(estimated_tokens(delivered.text_chars + delivered.tool_call_chars)),
            "usage_estimated": "true",
        },
    )


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
    started: Started | None = None
    text: list[str] = field(default_factory=list)
    tool_calls: dict[int, list[str]] = field(default_factory=dict)  # index -> [id, name, args...]
    finished: Finished | None = None

    def add(self, out: Output) -> None:
        if isinstance(out, Started):
            self.started = out
        elif isinstance(out, TextDeltaEvent):
            self.text.append(out.text)
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

    def calls(self) -> list[ToolCall]:
        return [
            ToolCall(id=p[0], name=p[1], arguments="".join(p[2:]) or "{}")
            for _, p in sorted(self.tool_calls.items())
        ]
