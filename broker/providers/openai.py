"""OpenAI Chat Completions, and every server that speaks it (Ollama /v1, vLLM, llama.cpp, Groq,
OpenRouter).

The JSON mapping lives in `openai_wire` (the request body in `openai_request`, shaped by
`WireTarget`: api.openai.com itself, or a vendor row of kinds.py such as OpenRouter, found
from `vendor:` or the base URL's host); this module is the HTTP side: auth, the SSE
stream (decoded by `sse.SSEDecoder` a network read at a time, line-capped, payloads parsed by orjson),
and the rules of the stream (events only after a 200, exactly one EndEvent, and only
after `data: [DONE]`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from broker import errors
from broker.config import ProviderConfig
from broker.providers import register
from broker.providers.base import Provider, Relay, UpstreamErrorInfo
from broker.providers.openai_wire import (
    ChunkParser,
    WireTarget,
    build_body,
    build_embed_body,
    error_from_payload,
    parse_embeddings,
    parse_models,
)
from broker.providers.openai_wire import parse_error as parse_error_body
from broker.providers.sse import SSEDecoder
from broker.providers.transport import UpstreamResponse
from broker.redact import redact
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    DiscoveredModel,
    EmbedResult,
    EndEvent,
    StartEvent,
)

DONE = b"[DONE]"
# After [DONE] only the chunked-body terminator should follow, at once. Reading it puts the
# connection back in the pool (closing an unfinished body drops it, and a new TLS handshake
# costs far more), but a server that keeps the body open must not hold the caller for long.
_DRAIN_SECONDS = 0.2


@register
class OpenAIProvider(Provider):
    type = "openai"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self.max_tokens_field = self.config.max_tokens_field
        # Decided once: the base URL and vendor do not change for the provider's lifetime.
        self.target = WireTarget.of(self.base_url, self.config.vendor)

    def auth_headers(self) -> dict[str, str]:
        # Local compatible servers usually run without a key; sending "Bearer " would be noise.
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    # --- what a server speaking this wire may change (azure_openai does) -------------------

    def path(self, operation: str, model: str) -> str:
        """Where `chat/completions` or `embeddings` is, below the base URL, for `model`."""
        return operation

    def stream_watch(self) -> list[Any] | None:
        """Per-stream state for `watch` and `finish`; None (the default): nothing to watch, and
        the per-chunk path makes no call for it."""
        return None

    def watch(self, payload: dict[str, Any], state: list[Any]) -> None:
        """Sees each decoded chunk before the parser (only when stream_watch gave a state)."""

    def finish(self, end: EndEvent, state: list[Any] | None) -> EndEvent:
        """The stream's EndEvent, after [DONE]."""
        return end

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[CompletionEvent, None]:
        model = request.model
        # InvalidRequest (a request this protocol cannot express) before any I/O.
        body = build_body(request, max_tokens_field=self.max_tokens_field, target=self.target)
        parser = ChunkParser(provider=self.name, model=model)
        state = self.stream_watch()

        path = self.path("chat/completions", model)
        async with self.open("POST", path, json=body, request=request) as resp:
            if "text/event-stream" not in resp.headers.get("content-type", ""):
                await self._expect_event_stream(resp, model)  # raises
            yield StartEvent(model=model)
            # Provider.relay's loop, run here with the event handling inline: per event, no
            # async-generator step and no call besides orjson's and the parser's.
            relay = Relay(
                self.name,
                SSEDecoder(self.config.max_line_bytes).feed,
                model=model,
                missing_end="stream ended without [DONE] (the response may be truncated)",
            )
            chunks = resp.chunks()
            async with contextlib.aclosing(chunks):
                async for data in chunks:
                    for name, payload_bytes in relay.frames(data):
                        if payload_bytes == DONE:
                            relay.end = self.finish(parser.end(), state)
                            break
                        if not payload_bytes:
                            continue  # an event without data
                        try:
                            payload = orjson.loads(payload_bytes)
                        except orjson.JSONDecodeError:
                            payload = None
                        if type(payload) is not dict:  # orjson's objects are dicts, never a subclass
                            raise self._not_an_object(payload_bytes, model)
                        if name == "error":
                            raise error_from_payload(
                                payload.get("error", payload), provider=self.name, model=model
                            )
                        if state is not None:
                            self.watch(payload, state)
                        for event in parser.feed(payload):
                            yield event
                    if relay.end is not None:
                        break
                end = await relay.finish(resp, chunks, _DRAIN_SECONDS)
            yield end

    async def embed_part(self, model: str, inputs: tuple[str, ...], dimensions: int | None) -> EmbedResult:
        # api.openai.com documents base64 vectors (little-endian float32; its own SDK asks for
        # them by default): a third of the bytes of JSON floats and no decimal text to parse,
        # about 20% fewer daemon instructions per call at 1536 dimensions. The caller gets the
        # same float32 values either way. Other servers speaking this wire need not support
        # it, so they are asked for JSON floats as before.
        as_base64 = self.target.platform
        body = build_embed_body(model, inputs, dimensions, base64=as_base64)
        doc = await self.post_embed(self.path("embeddings", model), body, model=model)
        return parse_embeddings(doc, len(inputs), provider=self.name, model=model, base64=as_base64)

    async def list_models(self) -> list[DiscoveredModel]:
        return parse_models(await self.get_json("models"), provider=self.name)

    async def health_check(self) -> None:
        # GET /models is free and needs a valid key, so it checks reachability and auth.
        # The abstract signature takes no timeout: the connect timeout is the short one.
        await self.get_json("models", timeout=self.config.connect_timeout_seconds)

    def parse_error(self, status: int, body: bytes) -> UpstreamErrorInfo:
        return parse_error_body(status, body)

    # --- stream mechanics ------------------------------------------------------------------

    async def _expect_event_stream(self, resp: UpstreamResponse, model: str) -> None:
        """A 200 that is not SSE (a proxy's HTML page, a server ignoring `stream`) is not our protocol."""
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" in ctype:
            return
        head = await resp.read_prefix(512)
        snippet = redact(" ".join(head.decode("utf-8", "replace").split()))[:200]  # redact, then cut
        raise errors.UpstreamProtocolError(
            f"{self.name}: expected an event stream, got {ctype or 'no content-type'}: {snippet!r}",
            provider=self.name,
            model=model,
        )

    def _not_an_object(self, data: bytes, model: str) -> errors.UpstreamProtocolError:
        snippet = redact(data[:4096].decode("utf-8", "replace"))[:200]  # redact, then cut
        return errors.UpstreamProtocolError(
            f"{self.name}: a stream chunk is not a JSON object: {snippet!r}",
            provider=self.name,
            model=model,
        )
