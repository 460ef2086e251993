"""Vertex AI: Gemini on `{location}-aiplatform.googleapis.com`, and Claude on Vertex.

One provider type for the two model families Vertex serves in a project and location
(PROTOCOLS-CLOUD.md B): a Gemini model (`gemini-2.5-flash`, or `google/<model>`) is the
Gemini wire of type gemini (gemini_request / gemini_wire, read by gemini.relay_answer) at
`v1beta1/projects/{project}/locations/{location}/publishers/google/models/{model}:streamGenerateContent?alt=sse`;
a Claude model (`claude-sonnet-4-5@20250929`, or `anthropic/<model>`) is the Anthropic
Messages wire (anthropic_request / anthropic_wire, unchanged but for the body's
`anthropic_version` and the model named by the URL) at
`v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:streamRawPredict`.
Every call carries an OAuth2 access token from google_auth (a key file or ADC), fetched and
refreshed off the event loop; the host comes from the location (kinds.vertex_base_url),
`base_url` overrides it. The paths and the reading of both error shapes are vertex_wire's.

Errors come in two shapes: Google's layer (auth, quota, a model not enabled in the project)
answers google.rpc Status bodies, mapped as type gemini maps them; Claude's own validation
answers Anthropic error bodies, mapped as type anthropic maps them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from broker import errors
from broker.config import ProviderConfig
from broker.providers import anthropic, anthropic_wire, gemini, register
from broker.providers import gemini_wire as gwire
from broker.providers import vertex_wire as wire
from broker.providers.base import Provider, UpstreamErrorInfo, decode_json
from broker.providers.google_auth import GoogleCredentials
from broker.providers.transport import MAX_SMALL_BODY
from broker.types import CompletionEvent, CompletionRequest, DiscoveredModel, StartEvent

_MAX_MODEL_PAGES = 20


@register
class VertexProvider(Provider):
    type = "vertex"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        assert config.project is not None  # config requires it for this type
        self.project = config.project
        self.location = config.location or "global"
        proxy = config.proxy.get_secret_value() if config.proxy is not None else None
        self.credentials = GoogleCredentials(
            provider=self.name,
            credentials_file=config.credentials_file,
            proxy=proxy,
            ca_file=config.tls_ca_file,
            connect_timeout=config.connect_timeout_seconds,
        )

    async def close(self) -> None:
        await self.credentials.close()
        await super().close()

    async def _auth(self, model: str) -> dict[str, str]:
        try:
            return await self.credentials.headers()
        except errors.BrokerError as exc:
            raise exc.with_target(self.name, model) from None

    # --- completions ---------------------------------------------------------------------------

    def reasoning_origin(self, model: str) -> str:
        """Claude's thinking signatures and Gemini's thought signatures are different vendors'
        though one provider type serves both: a fallback inside one vertex provider from
        Claude to Gemini (or back) must drop the other's reasoning as it would across types."""
        publisher, _ = wire.publisher_of(model)
        return f"{self.type}.anthropic" if publisher == "anthropic" else self.type

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[CompletionEvent, None]:
        publisher, name = wire.publisher_of(request.model)
        if publisher not in wire.PUBLISHERS:
            raise errors.InvalidRequest(
                [
                    (
                        "model",
                        f"type vertex serves Google's Gemini and Anthropic's Claude models, not "
                        f"publisher {errors.bound(publisher, 64)!r}",
                    )
                ],
                provider=self.name,
                model=request.model,
            )
        if publisher == "anthropic":
            events = self._claude(request, name)
        else:
            body = gemini.build(self, request)
            path = wire.gemini_path(self.project, self.location, name)
            events = gemini.relay_answer(self, path, body, request, headers=await self._auth(request.model))
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def _claude(self, request: CompletionRequest, name: str) -> AsyncGenerator[CompletionEvent, None]:
        model = request.model
        body, parser = anthropic.claude_request(self, request, anthropic_version=wire.ANTHROPIC_VERSION)
        path = wire.claude_path(self.project, self.location, name)
        headers = await self._auth(model)
        async with self.open("POST", path, json=body, request=request, headers=headers) as resp:
            ctype = resp.headers.get("content-type", "")
            if "text/event-stream" in ctype:
                yield StartEvent(model=model)
                events = anthropic.relay_events(self, resp, parser, model)
                async with contextlib.aclosing(events):
                    async for event in events:
                        yield event
                return
            if "json" not in ctype:
                raise errors.UpstreamProtocolError(
                    f"{self.name}: expected an event stream, got {ctype or 'no content type'}",
                    provider=self.name,
                    model=model,
                )
            # A whole message (rawPredict's answer, from a server that does not stream).
            doc = decode_json(await resp.read(MAX_SMALL_BODY), provider=self.name, what="streamRawPredict")
            whole = anthropic_wire.message_events(
                doc, provider=self.name, model=model, json_tool=parser.json_tool
            )
        yield StartEvent(model=model)
        for event in whole:
            yield event

    # --- discovery and health ------------------------------------------------------------------

    async def _get(self, path: str, *, timeout: float | None = None) -> Any:
        headers = await self._auth("")
        async with self.open("GET", path, headers=headers, read_timeout=timeout, gated=False) as resp:
            data = await resp.read(MAX_SMALL_BODY)
        return decode_json(data, provider=self.name, what=f"GET {path.split('?')[0]}")

    async def list_models(self) -> list[DiscoveredModel]:
        """Google's Gemini models from the publisher listing (Claude models are not listed
        there: the catalogue and `models:` in config name them)."""
        models: list[DiscoveredModel] = []
        token: str | None = None
        for _ in range(_MAX_MODEL_PAGES):
            doc = await self._get(wire.models_path(100, token))
            page, token = gwire.models_page(doc, provider=self.name, key="publisherModels")
            models += [m for m in page if m.name.startswith("gemini")]
            if token is None:
                break
        return models

    async def health_check(self) -> None:
        # A token (auth) and a one-model page (reachability): no tokens paid for.
        await self._get(wire.models_path(1), timeout=self.config.connect_timeout_seconds)

    # --- errors ----------------------------------------------------------------------------------

    def parse_error(self, status: int, body: bytes) -> UpstreamErrorInfo:
        return wire.error_info(body)

    def error_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes, *, model: str = ""
    ) -> errors.BrokerError:
        return wire.error_from_body(self.name, status, headers, body, model=model)
