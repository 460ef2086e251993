"""The Gemini API (Generative Language API): `streamGenerateContent?alt=sse` with the key in
`x-goog-api-key`, the model listing, batchEmbedContents.

The JSON mapping lives in gemini_wire (its request half in gemini_request, the model rules in
gemini_rules); this module is the HTTP side, and `relay_answer` is the one way a Gemini
answer is read, shared with the Gemini half of type vertex: an event stream (the broker
always asks for one), or, from a server that answers a whole JSON document instead (the
object generateContent returns, the array of a stream without alt=sse), that document.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import structlog

from broker import errors
from broker.providers import gemini_wire as wire
from broker.providers import register
from broker.providers.base import Provider, UpstreamErrorInfo, decode_json
from broker.providers.transport import MAX_SMALL_BODY
from broker.redact import redact
from broker.types import CompletionEvent, CompletionRequest, DiscoveredModel, EmbedResult, StartEvent

# After the finishReason chunk only the body's end should follow; reading it lets the pooled
# connection be reused, but a server that keeps the body open must not hold us.
_DRAIN_SECONDS = 1.0
# A listing longer than this many pages is a server looping on its token.
_MAX_MODEL_PAGES = 50

log = structlog.get_logger("broker.providers.gemini")


def build(provider: Provider, request: CompletionRequest) -> dict[str, Any]:
    """The request body, with the broker's adjustments logged at debug (never the values)."""
    notes: list[str] = []
    try:
        body = wire.build_body(request, notes)
    except errors.BrokerError as exc:
        raise exc.with_target(provider.name, request.model) from None
    for note in notes:
        log.debug("gemini request adjusted", provider=provider.name, model=request.model, note=note)
    return body


async def relay_answer(
    provider: Provider,
    path: str,
    body: dict[str, Any],
    request: CompletionRequest,
    *,
    headers: Mapping[str, str] | None = None,
) -> AsyncGenerator[CompletionEvent, None]:
    """POST a GenerateContentRequest and relay its answer as neutral events (StartEvent first,
    EndEvent last); closing the generator closes the upstream request."""
    model = request.model
    ptype = request.provider_type or provider.type
    async with provider.open("POST", path, json=body, request=request, headers=headers) as resp:
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" in ctype:
            parser = wire.StreamParser(provider=provider.name, model=model, provider_type=ptype)
            yield StartEvent(model=model)
            events = provider.relay(
                resp,
                wire.Frames(provider.config.max_line_bytes).feed,
                parser.feed,
                model=model,
                missing_end="the stream ended before a finishReason (the answer may be cut short)",
                drain_seconds=_DRAIN_SECONDS,
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event
            return
        if "json" not in ctype:
            head = await resp.read_prefix(512)
            snippet = redact(" ".join(head.decode("utf-8", "replace").split()))[:200]  # redact, then cut
            raise errors.UpstreamProtocolError(
                f"{provider.name}: expected an event stream, got {ctype or 'no content type'}: {snippet!r}",
                provider=provider.name,
                model=model,
            )
        doc = decode_json(
            await resp.read(MAX_SMALL_BODY), provider=provider.name, what=f"POST {path.split('?')[0]}"
        )
        events_of_doc = wire.response_events(doc, provider=provider.name, model=model, provider_type=ptype)
    yield StartEvent(model=model)
    for event in events_of_doc:
        yield event


@register
class GeminiProvider(Provider):
    type = "gemini"
    # batchEmbedContents takes at most 100 requests.
    embed_batch_default = 100

    def auth_headers(self) -> dict[str, str]:
        # The header, never `?key=`: a key in a URL ends up in logs and proxies.
        return {"x-goog-api-key": self.api_key} if self.api_key else {}

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[CompletionEvent, None]:
        body = build(self, request)
        events = relay_answer(self, wire.stream_path(request.model), body, request)
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def embed_part(self, model: str, inputs: tuple[str, ...], dimensions: int | None) -> EmbedResult:
        doc = await self.post_embed(
            wire.embed_path(model), wire.embed_body(model, inputs, dimensions), model=model
        )
        return wire.parse_embeddings(doc, len(inputs), provider=self.name, model=model)

    async def list_models(self) -> list[DiscoveredModel]:
        models: list[DiscoveredModel] = []
        token: str | None = None
        for _ in range(_MAX_MODEL_PAGES):
            page, token = wire.models_page(await self.get_json(wire.models_path(token)), provider=self.name)
            models += page
            if token is None:
                break
        return models

    async def health_check(self) -> None:
        # A one-model page proves reachability and a working key without paying for tokens.
        await self.get_json(wire.models_path(page_size=1), timeout=self.config.connect_timeout_seconds)

    def parse_error(self, status: int, body: bytes) -> UpstreamErrorInfo:
        return wire.error_info(body)

    def error_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes, *, model: str = ""
    ) -> errors.BrokerError:
        return wire.error_from_body(self.name, status, headers, body, model=model)
