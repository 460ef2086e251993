"""One completion, end to end in neutral types: candidates -> checks -> provider stream -> cost.

Streaming is the only path (unary accumulates it, see `accumulate`). The first message to
the caller (`Started`) is held back until the first content or the end, so that a failure
before any content can move on to the next candidate without the caller ever seeing the
first provider's name. After content has been delivered a failure is an interruption:
never retried, never spliced with another model's output.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import structlog

from broker import errors
from broker.catalog import compute_cost
from broker.convert import CompletionCall
from broker.registry import Registry, Target
from broker.types import (
    Capability,
    CompletionRequest,
    Cost,
    EndEvent,
    FinishReason,
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
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def candidates(self, call: CompletionCall) -> list[Target]:
        if not call.model:
            raise errors.NotImplementedYet(
                "selection by requirements is not available yet: set `model`",
            )
        targets = list(self.registry.resolve(call.model))
        for ref in call.fallback_models:
            targets.extend(self.registry.resolve(ref))
        return targets

    async def stream(
        self, call: CompletionCall, request_id: str, *, deadline: float | None, record: CallRecord
    ) -> AsyncIterator[Output]:
        targets = self.candidates(call)
        first_error: errors.BrokerError | None = None
        for i, target in enumerate(targets):
            last = i == len(targets) - 1
            try:
                check_capabilities(call, target)
                check_fits(call, target)
            except errors.BrokerError as exc:
                # A fallback that cannot take this request is skipped; the caller hears
                # about the first candidate's reason if none can.
                first_error = first_error or exc
                record.attempts.append(Attempt(target.state.name, target.model, exc.reason))
                if last:
                    raise first_error from None
                continue
            attempt = Attempt(target.state.name, target.model)
            record.attempts.append(attempt)
            delivered = False
            try:
                async for out in self._attempt(call, target, request_id, deadline, record):
                    delivered = True
                    yield out
                return
            except errors.BrokerError as exc:
                exc.with_target(target.state.name, target.model)
                attempt.error = exc.reason
                if delivered:
                    raise errors.StreamInterrupted(
                        f"the stream from {target.state.name}/{target.model} failed after output was sent: "
                        f"{exc.message}",
                        provider=target.state.name,
                        model=target.model,
                        metadata={"cause": exc.reason},
                    ) from exc
                if not exc.retryable or last:
                    raise
                log.info(
                    "fallback",
                    request_id=request_id,
                    failed=f"{target.state.name}/{target.model}",
                    reason=exc.reason,
                )
        if first_error is not None:  # pragma: no cover - loop always returns or raises
            raise first_error

    async def _attempt(
        self,
        call: CompletionCall,
        target: Target,
        request_id: str,
        deadline: float | None,
        record: CallRecord,
    ) -> AsyncIterator[Output]:
        spec = target.spec
        request = CompletionRequest(
            model=target.model,
            messages=call.messages,
            tools=call.tools,
            tool_choice=call.tool_choice,
            params=call.params,
            default_max_tokens=spec.max_output_tokens,
            timeout=None if deadline is None else max(deadline - time.monotonic(), 0.001),
        )
        started = False
        async with aclosing(target.provider.stream(request)) as events:
            async for ev in events:
                if isinstance(ev, StartEvent):
                    continue
                if not started:
                    started = True
                    record.first_token_at = time.monotonic()
                    yield Started(request_id=request_id, provider=target.state.name, model=target.model)
                if isinstance(ev, EndEvent):
                    cost = compute_cost(spec.pricing, ev.usage, local=target.state.local)
                    yield Finished(ev.finish_reason, ev.usage, cost)
                    return
                yield ev
        raise errors.UpstreamProtocolError(
            f"{target.state.name}: the stream ended without a final message", provider=target.state.name
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
