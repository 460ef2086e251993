"""Anthropic's Messages API (`POST /v1/messages`, streamed as SSE).

The JSON mapping lives in anthropic_wire (and its request half, anthropic_request, with the
model rules in anthropic_rules); this module is the HTTP side: headers, the one streamed
request per completion, model listing and the health probe.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import structlog

from broker import errors
from broker.providers import anthropic_wire as wire
from broker.providers import register
from broker.providers.base import Provider, UpstreamErrorInfo
from broker.providers.sse import SSEDecoder
from broker.providers.transport import UpstreamResponse
from broker.types import CompletionEvent, CompletionRequest, DiscoveredModel, StartEvent

# After message_stop only the body's end should remain; reading it lets the pooled
# connection be reused, but a server that keeps the body open must not hold us.
_DRAIN_SECONDS = 1.0
# A listing longer than this many pages is a server looping on its cursor.
_MAX_MODEL_PAGES = 50

log = structlog.get_logger("broker.providers.anthropic")


def claude_request(
    provider: Provider, request: CompletionRequest, *, anthropic_version: str | None = None
) -> tuple[dict[str, Any], wire.StreamParser]:
    """The Messages body for `request` and the parser of its answer, for every host of the
    Anthropic wire (the API itself, Claude on Vertex with its `anthropic_version`).
    InvalidRequest (a request the protocol cannot express) before any I/O."""
    model = request.model
    notes: list[str] = []
    try:
        body = wire.build_body(request, notes, anthropic_version=anthropic_version)
    except errors.BrokerError as exc:
        raise exc.with_target(provider.name, model) from None
    for note in notes:
        log.debug("anthropic request adjusted", provider=provider.name, model=model, note=note)
    parser = wire.StreamParser(provider=provider.name, model=model, json_tool=wire.forced_json_tool(request))
    return body, parser


def relay_events(
    provider: Provider, resp: UpstreamResponse, parser: wire.StreamParser, model: str
) -> AsyncGenerator[CompletionEvent, None]:
    """A Messages event stream (after its 200 and content-type check) as neutral events."""
    return provider.relay(
        resp,
        SSEDecoder(provider.config.max_line_bytes).feed,
        lambda ev: parser.feed(ev[0], ev[1].decode("utf-8", "replace")),
        model=model,
        missing_end="the stream ended before message_stop (the answer may be cut short)",
        drain_seconds=_DRAIN_SECONDS,
    )


@register
class AnthropicProvider(Provider):
    type = "anthropic"

    def auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": wire.API_VERSION}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        return headers

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[CompletionEvent, None]:
        model = request.model
        body, parser = claude_request(self, request)
        async with self.open("POST", "v1/messages", json=body, request=request) as resp:
            content_type = resp.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                # A proxy or gateway answering 200 with a page instead of the event stream.
                raise errors.UpstreamProtocolError(
                    f"{self.name}: expected an event stream, got {content_type or 'no content type'}",
                    provider=self.name,
                    model=model,
                )
            yield StartEvent(model=model)
            events = relay_events(self, resp, parser, model)
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event

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
        # The abstract signature takes no timeout: the connect timeout is the short one.
        await self.get_json(wire.models_path(limit=1), timeout=self.config.connect_timeout_seconds)

    def parse_error(self, status: int, body: bytes) -> UpstreamErrorInfo:
        return wire.parse_error_body(body)
