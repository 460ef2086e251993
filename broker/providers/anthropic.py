"""Anthropic's Messages API (`POST /v1/messages`, streamed as SSE).

The JSON mapping lives in anthropic_wire; this module is the HTTP side: headers, the one
streamed request per completion, model listing and the health probe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from broker import errors
from broker.providers import anthropic_wire as wire
from broker.providers import register
from broker.providers.base import Provider, UpstreamErrorInfo
from broker.redact import redact
from broker.types import CompletionEvent, CompletionRequest, DiscoveredModel

# After message_stop only the body's end should remain; reading it lets the pooled
# connection be reused, but a server that keeps the body open must not hold us.
_DRAIN_SECONDS = 1.0
# A listing longer than this many pages is a server looping on its cursor.
_MAX_MODEL_PAGES = 50


@register
class AnthropicProvider(Provider):
    type = "anthropic"

    def auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": wire.API_VERSION}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        return headers

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionEvent]:
        try:
            body = wire.build_body(request)
        except errors.BrokerError as exc:
            raise exc.with_target(self.name, request.model) from None
        parser = wire.StreamParser(provider=self.name, model=request.model)
        async with (
            self.open("POST", "v1/messages", json=body, request=request) as resp,
            # aclosing: closing this generator early must also finalize the line reader now.
            contextlib.aclosing(self.guarded_lines(resp, model=request.model)) as lines,
        ):
            async for line in lines:
                for event in parser.feed_line(line):
                    yield event
                if parser.finished:
                    break
            if not parser.finished:
                raise errors.UpstreamProtocolError(
                    f"{self.name}: the stream ended before message_stop",
                    provider=self.name,
                    model=request.model,
                )
            with contextlib.suppress(TimeoutError, errors.BrokerError):
                async with asyncio.timeout(_DRAIN_SECONDS):
                    async for _ in lines:
                        pass

    async def list_models(self) -> list[DiscoveredModel]:
        models: list[DiscoveredModel] = []
        after: str | None = None
        for _ in range(_MAX_MODEL_PAGES):
            page, after = wire.models_page(await self.get_json(wire.models_path(after)), provider=self.name)
            models += page
            if after is None:
                break
        return models

    async def health_check(self) -> None:
        # Listing one model proves reachability and a working key without paying for tokens.
        await self.get_json(wire.models_path(limit=1))

    def parse_error(self, status: int, body: bytes) -> UpstreamErrorInfo:
        return wire.parse_error_body(body)

    def error_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes, *, model: str = ""
    ) -> errors.BrokerError:
        # As the base class does, but through wire.classify: Anthropic reports an empty
        # credit balance as a 400, which the shared table would call a bad request.
        info = self.parse_error(status, body)
        message = f"{self.name} returned HTTP {status}: {redact(info.message) or 'no message'}"
        kw: dict[str, Any] = {"provider": self.name, "model": model, "upstream_status": status}
        return wire.classify(status, info, message, headers, kw)
