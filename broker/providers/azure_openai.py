"""Azure OpenAI (Azure AI Foundry): the OpenAI Chat Completions wire on an Azure resource.

The bodies and the stream are OpenAI's, built and read by `openai_wire` (called, not
copied); this module is what Azure changes (PROTOCOLS-CLOUD.md D):

- Auth: the `api-key` header, or an Entra ID access token as `Authorization: Bearer` (an
  `api_key` / `api_key_file` value that is a JWT, i.e. three base64url parts starting "eyJ";
  Azure's keys never look like one; a token file is re-read when it changes: broker/reload.py).
- Routes: with `api_version` set, the deployments route
  `/openai/deployments/{deployment}/chat/completions?api-version=...` (the deployment is the
  request's model); without it, the `/openai/v1/` route with the deployment name as `model`.
- Deployments: the data plane cannot list them, so discovery is the configured
  `deployments` (name -> model; the model names the catalogue row for facts and, at Azure's
  own hosts, OpenAI's prices: ProviderConfig.catalog_key).
- Content filtering: a prompt blocked with 400 `content_filter` is CONTENT_FILTERED with the
  categories that tripped (`innererror.content_filter_result`, severities included) in the
  message and ErrorInfo metadata; an answer cut with `finish_reason: content_filter` ends
  CONTENT_FILTER with a Refusal naming them (from the chunks' `content_filter_results`).
- The stream's first chunk carries only `prompt_filter_results` with empty id and model and
  `"choices": []`: the OpenAI parser already takes it as nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping

from broker import errors
from broker.config import ProviderConfig
from broker.providers import azure_openai_wire as wire
from broker.providers import register
from broker.providers.openai import _DRAIN_SECONDS, DONE, OpenAIProvider
from broker.providers.openai_wire import (
    ChunkParser,
    build_body,
    build_embed_body,
    error_from_payload,
    parse_embeddings,
)
from broker.providers.sse import SSEDecoder
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    DiscoveredModel,
    EmbedResult,
    EndEvent,
    FinishReason,
    Refusal,
    StartEvent,
)


@register
class AzureOpenAIProvider(OpenAIProvider):
    type = "azure_openai"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self.api_version = config.api_version
        self.deployments = dict(config.deployments)

    def auth_headers(self) -> dict[str, str]:
        key = self.api_key
        if not key:
            return {}
        if wire.is_entra_token(key):
            return {"authorization": f"Bearer {key}"}
        return {"api-key": key}

    def path(self, operation: str, deployment: str) -> str:
        """`chat/completions` or `embeddings` on the route config chose."""
        return wire.route(operation, deployment, self.api_version)

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[CompletionEvent, None]:
        model = request.model
        body = build_body(request, max_tokens_field=self.max_tokens_field, target=self.target)
        parser = ChunkParser(provider=self.name, model=model)
        categories: list[str] = []

        def feed(event: tuple[str, bytes]) -> list[CompletionEvent]:
            name, payload_bytes = event
            if payload_bytes == DONE:
                return [self._with_filter(parser.end(), categories)]
            if not payload_bytes:
                return []
            payload = self._decode(payload_bytes, model)
            if name == "error":
                raise error_from_payload(payload.get("error", payload), provider=self.name, model=model)
            for choice in payload.get("choices") or ():
                if isinstance(choice, dict):
                    for c in wire.filtered_categories(choice.get("content_filter_results")):
                        if c not in categories:
                            categories.append(c)
            return parser.feed(payload)

        path = self.path("chat/completions", model)
        async with self.open("POST", path, json=body, request=request) as resp:
            await self._expect_event_stream(resp, model)
            yield StartEvent(model=model)
            events = self.relay(
                resp,
                SSEDecoder(self.config.max_line_bytes).feed,
                feed,
                model=model,
                missing_end="stream ended without [DONE] (the response may be truncated)",
                drain_seconds=_DRAIN_SECONDS,
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event

    @staticmethod
    def _with_filter(end: EndEvent, categories: list[str]) -> EndEvent:
        if end.finish_reason is not FinishReason.CONTENT_FILTER or end.refusal is not None:
            return end
        refusal = Refusal(
            explanation="Azure OpenAI's content filter stopped the answer",
            category=", ".join(categories),
        )
        return EndEvent(end.finish_reason, end.usage, end.usage_reported, refusal)

    async def embed_part(self, model: str, inputs: tuple[str, ...], dimensions: int | None) -> EmbedResult:
        body = build_embed_body(model, inputs, dimensions)
        doc = await self.post_embed(self.path("embeddings", model), body, model=model)
        return parse_embeddings(doc, len(inputs), provider=self.name, model=model)

    async def list_models(self) -> list[DiscoveredModel]:
        # The data plane lists no deployments (only Azure Resource Manager does): config's.
        return [DiscoveredModel(name=name) for name in self.deployments]

    async def health_check(self) -> None:
        # Listing the resource's models is free and needs a valid key or token.
        await self.get_json(wire.models_path(self.api_version), timeout=self.config.connect_timeout_seconds)

    def error_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes, *, model: str = ""
    ) -> errors.BrokerError:
        err = super().error_for_status(status, headers, body, model=model)
        doc = wire.error_doc(body)
        if wire.is_not_found(doc):
            where = (
                f"deployment {model!r} (deployments route, api-version {self.api_version})"
                if self.api_version
                else f"model {model!r} (the /openai/v1/ route takes the deployment name as the model)"
            )
            return errors.ModelNotFound(
                f"{err.message}: no {where} on this resource",
                provider=self.name,
                model=model,
                upstream_status=status,
            )
        if isinstance(err, errors.ContentFiltered):
            inner = doc.get("innererror")
            found = (
                wire.filtered_categories(inner.get("content_filter_result"))
                if isinstance(inner, dict)
                else []
            )
            if found:
                err.message = f"{err.message} (filtered: {', '.join(found)})"
                err.args = (err.message,)
                err.metadata["categories"] = ",".join(found)
        return err
