"""One Embed call in neutral types: candidates -> the fallback walk -> one provider's (split) batch.

The candidates are the completion service's (`CompletionService.candidates`: the model
reference, aliases and fallback groups, `fallback_models`, the caller's permissions judged
there and nowhere else). Each candidate in turn: a model the catalogue knows as a chat model
is skipped as unfit (CAPABILITY_MISSING, the caller hears it if nothing else can take the
call), then the provider's circuit breaker lets the call through, and `Provider.embed` splits
the batch into the provider's per-call size, sends the parts concurrently and reassembles
them in input order. A retryable failure moves on to the next candidate; any other ends the
call. Usage is the upstream's input tokens (estimated at about 4 characters per token when
it reported none); cost is the model's input price times the tokens, integer micro-USD.
"""

from __future__ import annotations

from dataclasses import replace

import structlog

from broker import errors, tracing
from broker.catalog import compute_cost
from broker.completion import (
    Attempt,
    CallRecord,
    CompletionService,
    _Walk,
    estimated_tokens,
    with_attempts,
)
from broker.registry import Target
from broker.types import (
    ALLOW_ALL,
    CompletionCall,
    EmbedCall,
    Embedded,
    EmbedRequest,
    Finished,
    FinishReason,
    Permissions,
    Usage,
)

log = structlog.get_logger("broker.embedding")


def check_embedding_model(target: Target) -> None:
    """A model the catalogue (or config) knows as a chat model cannot embed; unknown may."""
    spec = target.spec
    if spec.kind == "chat":
        raise errors.CapabilityMissing(
            f"model {spec.id} is a chat model, not an embedding model: Embed needs one "
            "(ListModels with kind MODEL_KIND_EMBEDDING lists them)",
            provider=target.state.name,
            model=target.model,
            metadata={"kind": "chat"},
        )


class EmbeddingService:
    """Embed over the completion service's candidates, breakers and registry."""

    def __init__(self, completions: CompletionService) -> None:
        self.completions = completions

    def candidates(self, call: EmbedCall, permissions: Permissions = ALLOW_ALL) -> list[Target]:
        # Requirements select (empty model) and bind named models too, as for completions;
        # what is selected is always an embedding model.
        req = call.requirements
        if not call.model or not req.is_empty():
            req = replace(req, kind="embedding")
        as_completion = CompletionCall(
            model=call.model, messages=[], fallback_models=list(call.fallback_models), requirements=req
        )
        return self.completions.candidates(as_completion, permissions)

    async def embed(
        self,
        call: EmbedCall,
        request_id: str,
        *,
        record: CallRecord,
        permissions: Permissions = ALLOW_ALL,
    ) -> Embedded:
        walk = _Walk(record)
        rt = tracing.current()  # None unless tracing is on: then a client span per attempt
        for target in self.candidates(call, permissions):
            try:
                check_embedding_model(target)
            except errors.BrokerError as exc:
                walk.unfit = walk.unfit or exc
                record.attempts.append(Attempt(target.state.name, target.model, exc.reason))
                continue
            s = target.state
            if not s.breaker.acquire():
                record.attempts.append(Attempt(s.name, target.model, "BREAKER_OPEN"))
                walk.skipped.append(target)
                continue
            attempt = Attempt(s.name, target.model)
            record.attempts.append(attempt)
            request = EmbedRequest(target.model, call.inputs, call.dimensions)
            number = len(record.attempts)
            span = rt.start_attempt("embeddings", target, attempt=number, tries=1) if rt is not None else None
            try:
                result = await s.provider.embed(request)
            except errors.BrokerError as exc:
                exc.with_target(s.name, target.model)
                attempt.error = exc.reason
                if span is not None:
                    tracing.end_attempt(span, error=exc)
                await self.completions._outcome(s, exc)
                if not exc.retryable:
                    raise with_attempts(exc, record) from None
                walk.last_error = exc
                log.info("fallback", request_id=request_id, failed=target.spec.id, reason=exc.reason)
                continue
            except BaseException as exc:
                s.breaker.release()  # cancelled: says nothing about the provider
                if span is not None:
                    tracing.end_attempt(span, error=exc)
                raise
            await self.completions._outcome(s, None)
            if result.usage_reported:
                usage = Usage(input_tokens=result.input_tokens)
            else:
                chars = sum(len(t) for t in call.inputs)
                usage = Usage(input_tokens=estimated_tokens(chars), estimated=True)
            cost = compute_cost(target.spec.pricing, usage, local=s.local)
            if span is not None:
                done = Finished(FinishReason.STOP, usage, cost)
                tracing.end_attempt(span, model=target.model, finished=done, finish_reasons=False)
            return Embedded(request_id, s.name, target.model, result.vectors, usage, cost)
        raise walk.failure()
