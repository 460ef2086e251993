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

from collections.abc import Mapping
from typing import Any

from broker import errors
from broker.config import ProviderConfig
from broker.providers import azure_openai_wire as wire
from broker.providers import register
from broker.providers.openai import OpenAIProvider
from broker.types import (
    DiscoveredModel,
    EndEvent,
    FinishReason,
    Refusal,
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

    def stream_watch(self) -> list[Any] | None:
        return []  # the content-filter categories the chunks name, for the end

    def watch(self, payload: dict[str, Any], state: list[Any]) -> None:
        for choice in payload.get("choices") or ():
            if isinstance(choice, dict):
                for c in wire.filtered_categories(choice.get("content_filter_results")):
                    if c not in state:
                        state.append(c)

    def finish(self, end: EndEvent, state: list[Any] | None) -> EndEvent:
        if end.finish_reason is not FinishReason.CONTENT_FILTER or end.refusal is not None:
            return end
        refusal = Refusal(
            explanation="Azure OpenAI's content filter stopped the answer",
            category=", ".join(state or ()),
        )
        return EndEvent(end.finish_reason, end.usage, end.usage_reported, refusal)

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
