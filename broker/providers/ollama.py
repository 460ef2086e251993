"""Ollama's native API (`/api/chat`, NDJSON streaming): a local server, no auth.

The wire mapping lives in ollama_wire.py; this module does the HTTP: the streamed chat,
discovery (`/api/tags`, then `/api/show` per model for capabilities and context length)
and the health check (`/api/version`, which loads no model).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import structlog

from broker import errors
from broker.providers import register
from broker.providers.base import Provider, UpstreamErrorInfo
from broker.providers.ollama_wire import (
    ChatStreamParser,
    ListedModel,
    build_body,
    build_embed_body,
    is_missing_model,
    parse_embed,
    parse_error_body,
    parse_show,
    parse_tags,
)
from broker.providers.sse import LineDecoder
from broker.redact import redact
from broker.types import CompletionEvent, CompletionRequest, DiscoveredModel, EmbedResult, StartEvent

log = structlog.get_logger("broker.providers.ollama")

# /api/show reads the model file from disk; a few at a time keeps a big library from
# flooding a server that may be generating for someone else.
SHOW_CONCURRENCY = 4
# After the done line Ollama ends the body at once; reading that end lets the pooled
# connection be reused, but a server that stalls there must not hold the caller.
DRAIN_SECONDS = 0.5


@register
class OllamaProvider(Provider):
    type = "ollama"
    # /api/embed runs a call's inputs concurrently on one server: keep a call moderate.
    embed_batch_default = 512

    async def embed_part(self, model: str, inputs: tuple[str, ...], dimensions: int | None) -> EmbedResult:
        doc = await self.post_embed("api/embed", build_embed_body(model, inputs, dimensions), model=model)
        return parse_embed(doc, len(inputs), provider=self.name, model=model)

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[CompletionEvent, None]:
        body = build_body(request)  # InvalidRequest before any I/O
        parser = ChatStreamParser(provider=self.name, model=request.model)
        async with self.open("POST", "api/chat", json=body, request=request) as resp:
            # Ollama reports the model as it was asked for, so the request's name is the answer's.
            yield StartEvent(model=request.model)
            events = self.relay(
                resp,
                LineDecoder(self.config.max_line_bytes).feed,
                lambda line: parser.feed(line.decode("utf-8", "replace")),
                model=request.model,
                missing_end='/api/chat ended without its final "done" line (answer cut short)',
                drain_seconds=DRAIN_SECONDS,
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event

    async def list_models(self) -> list[DiscoveredModel]:
        listed = parse_tags(await self.get_json("api/tags"), provider=self.name)
        gate = asyncio.Semaphore(SHOW_CONCURRENCY)

        async def detail(model: ListedModel) -> ListedModel:
            async with gate:
                try:
                    doc = await self.post_json("api/show", {"model": model.name}, model=model.name)
                except errors.BrokerError as exc:
                    # One broken model must not hide the others: list it with what tags said.
                    log.warning("ollama_show_failed", provider=self.name, model=model.name, error=exc.message)
                    return model
            return model.merged(parse_show(model.name, doc))

        detailed = await asyncio.gather(*(detail(m) for m in listed))
        return [m.discovered() for m in detailed if m.can_chat]

    async def health_check(self) -> None:
        doc = await self.get_json("api/version")
        if not isinstance(doc, dict) or not isinstance(doc.get("version"), str):
            raise errors.UpstreamProtocolError(
                f"{self.name}: {self.base_url}/api/version is not Ollama's answer: {redact(str(doc)[:65536])[:200]}",
                provider=self.name,
            )

    def parse_error(self, status: int, body: bytes) -> UpstreamErrorInfo:
        return parse_error_body(body)

    def error_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes, *, model: str = ""
    ) -> errors.BrokerError:
        info = self.parse_error(status, body)
        kw: dict[str, Any] = {"provider": self.name, "model": model, "upstream_status": status}
        said = redact(info.message) or "no message"
        if status == 404 and model and is_missing_model(info.message):
            # Ollama never pulls on demand: tell the operator the one command that fixes it.
            return errors.ModelNotFound(
                f"{self.name}: model {model!r} is not pulled on {self.base_url}; "
                f"run `ollama pull {model}` there (Ollama said: {said})",
                **kw,
            )
        if status == 404 and "page not found" in info.message.lower():
            # Go's router text: nothing Ollama-like lives at that URL (a wrong base_url).
            return errors.UpstreamUnavailable(
                f"{self.name}: {self.base_url} has no Ollama API (HTTP 404: {said}); "
                "base_url must be the Ollama host, e.g. http://localhost:11434, without /v1 or /api",
                **kw,
            )
        if status == 400 and "does not support" in info.message.lower():
            # `"llava" does not support tools`: the model lacks a capability the request needs.
            return errors.CapabilityMissing(f"{self.name} returned HTTP 400: {said}", **kw)
        return super().error_for_status(status, headers, body, model=model)
