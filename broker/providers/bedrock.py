"""AWS Bedrock: Converse / ConverseStream on bedrock-runtime.{region}.amazonaws.com.

The JSON mapping lives in bedrock_wire (the request body in bedrock_request), the binary
framing in eventstream, credentials and signing in aws_auth; this module is the HTTP side:
every request signed with SigV4 over the exact bytes and URL that go out (or a Bedrock API key
as a bearer token when `api_key` is set), the one ConverseStream request per completion,
discovery on the control plane (bedrock.{region}.amazonaws.com: ListFoundationModels and the
system inference profiles, so `us.anthropic.claude-...` ids are listed), the health probe, and
embeddings through InvokeModel (Titan one text per call, Cohere in batches).

With `base_url` set (a VPC endpoint, a proxy, a test fake) both the runtime and the control
plane calls go to it; the signing region is always `region`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping
from urllib.parse import quote

import structlog
from yarl import URL

from broker import errors
from broker.config import ProviderConfig
from broker.providers import aws_auth, register
from broker.providers import bedrock_wire as wire
from broker.providers.base import MAX_EMBED_BODY, Provider, UpstreamErrorInfo, _json_bytes, decode_json
from broker.providers.eventstream import EventStreamDecoder
from broker.providers.transport import MAX_SMALL_BODY, Transport, UpstreamResponse
from broker.redact import redact
from broker.types import CompletionEvent, CompletionRequest, DiscoveredModel, EmbedResult, StartEvent

EVENT_STREAM = "application/vnd.amazon.eventstream"
# After `metadata` only the chunked body's end should follow; reading it keeps the connection.
_DRAIN_SECONDS = 1.0
# A listing longer than this many pages is a server looping on its token.
_MAX_PROFILE_PAGES = 20
# Control-plane connections (discovery, health): a few, beside the completion pool.
_CONTROL_CONNECTIONS = 4

log = structlog.get_logger("broker.providers.bedrock")


@register
class BedrockProvider(Provider):
    type = "bedrock"
    # Cohere's limit per InvokeModel; Titan takes one text per call (sent concurrently).
    embed_batch_default = 96

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self.region = config.region or "us-east-1"
        # A Bedrock API key (api_key) is a bearer token; otherwise SigV4 from the AWS chain.
        self.credentials = None if self.api_key else aws_auth.CredentialChain(name=self.name)
        control = config.base_url or f"https://bedrock.{self.region}.amazonaws.com"
        self.control = Transport(
            name=self.name,
            base_url=control,
            headers={**self.base_headers, **self.auth_headers(), **config.headers},
            max_connections=_CONTROL_CONNECTIONS,
            connect_timeout=config.connect_timeout_seconds,
            read_timeout=config.read_timeout_seconds,
            pool_timeout=config.pool_timeout_seconds,
            max_decompressed_bytes=config.max_decompressed_bytes,
            proxy=config.proxy.get_secret_value() if config.proxy is not None else None,
            ca_file=config.tls_ca_file,
        )

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def start(self) -> None:
        await super().start()
        await self.control.start()

    async def close(self) -> None:
        if self.credentials is not None:
            await self.credentials.close()
        await self.control.close()
        await super().close()

    # --- signing --------------------------------------------------------------------------

    async def signed(
        self, method: str, transport: Transport, path: str, body: bytes | None, **extra: str
    ) -> dict[str, str]:
        """This request's headers: SigV4 over the URL as aiohttp will send it (yarl's quoting,
        which the transport applies to `base_url + path`) and over the body's exact bytes."""
        headers = dict(extra)
        if self.credentials is None:
            return headers
        credentials = await self.credentials.get()
        url = str(URL(transport.base_url + path))
        return {
            **headers,
            **aws_auth.sign(credentials, method=method, url=url, body=body, headers={}, region=self.region),
        }

    # --- completions ----------------------------------------------------------------------

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[CompletionEvent, None]:
        model = request.model
        notes: list[str] = []
        path = f"model/{quote(model, safe='')}/converse-stream"
        try:
            data = _json_bytes(wire.build_body(request, notes))
            headers = await self.signed("POST", self.transport, path, data, accept=EVENT_STREAM)
        except errors.BrokerError as exc:
            raise exc.with_target(self.name, model) from None
        for note in notes:
            log.debug("bedrock request adjusted", provider=self.name, model=model, note=note)
        parser = wire.StreamParser(provider=self.name, model=model)
        async with self.open("POST", path, json=data, request=request, headers=headers) as resp:
            await self._expect_event_stream(resp, model)
            yield StartEvent(model=model)
            events = self.relay(
                resp,
                EventStreamDecoder().feed,
                parser.feed,
                model=model,
                missing_end="the stream ended before its metadata event (the answer may be cut short)",
                drain_seconds=_DRAIN_SECONDS,
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event

    async def _expect_event_stream(self, resp: UpstreamResponse, model: str) -> None:
        """A 200 that is not an event stream (a proxy's page, a whole Converse JSON answer)."""
        ctype = resp.headers.get("content-type", "")
        if ctype.startswith(EVENT_STREAM):
            return
        head = await resp.read_prefix(512)
        snippet = redact(" ".join(head.decode("utf-8", "replace").split()))[:200]
        raise errors.UpstreamProtocolError(
            f"{self.name}: expected {EVENT_STREAM} from converse-stream, got {ctype or 'no content-type'}: "
            f"{snippet!r}",
            provider=self.name,
            model=model,
        )

    # --- embeddings -----------------------------------------------------------------------

    async def embed_part(self, model: str, inputs: tuple[str, ...], dimensions: int | None) -> EmbedResult:
        if wire.is_cohere(model):
            return await self._invoke_embed(model, inputs, dimensions)
        # Titan embeds one text per InvokeModel: the part's texts go concurrently, bounded.
        gate = asyncio.Semaphore(self.config.embed_concurrency)

        async def one(text: str) -> EmbedResult:
            async with gate:
                return await self._invoke_embed(model, (text,), dimensions)

        results = await asyncio.gather(*(one(t) for t in inputs))
        return EmbedResult(
            tuple(v for r in results for v in r.vectors),
            sum(r.input_tokens for r in results),
            all(r.usage_reported for r in results),
        )

    async def _invoke_embed(self, model: str, inputs: tuple[str, ...], dimensions: int | None) -> EmbedResult:
        path = f"model/{quote(model, safe='')}/invoke"
        try:
            data = _json_bytes(wire.embed_body(model, inputs, dimensions))
            headers = await self.signed("POST", self.transport, path, data)
        except errors.BrokerError as exc:
            raise exc.with_target(self.name, model) from None
        async with self.open("POST", path, json=data, model=model, headers=headers) as resp:
            body = await resp.read(MAX_EMBED_BODY)
        doc = decode_json(body, provider=self.name, what=f"POST {path}")
        return wire.parse_embedding(doc, len(inputs), provider=self.name, model=model)

    # --- discovery and health -------------------------------------------------------------

    async def _control_json(self, path: str, *, timeout: float | None = None) -> object:
        """A signed GET on the control plane; errors mapped like the runtime's."""
        try:
            headers = await self.signed("GET", self.control, path, None)
            async with self.control.request(
                "GET", path, None, read_timeout=timeout, gated=False, headers=headers
            ) as resp:
                if resp.status >= 300:
                    raise await self._status_error(resp, "")
                data = await resp.read(MAX_SMALL_BODY)
        except errors.BrokerError as exc:
            raise exc.with_target(self.name, "") from None
        return decode_json(data, provider=self.name, what=f"GET {path.split('?', 1)[0]}")

    async def list_models(self) -> list[DiscoveredModel]:
        models = wire.parse_foundation_models(
            await self._control_json("foundation-models"), provider=self.name
        )
        token: str | None = None
        for _ in range(_MAX_PROFILE_PAGES):
            path = "inference-profiles?maxResults=1000&type=SYSTEM_DEFINED"
            if token:
                path += f"&nextToken={quote(token, safe='')}"
            page, token = wire.parse_inference_profiles(await self._control_json(path), provider=self.name)
            models += page
            if token is None:
                break
        return models

    async def health_check(self) -> None:
        # ListFoundationModels is free and needs valid, signed credentials.
        await self._control_json(
            "foundation-models?byOutputModality=TEXT", timeout=self.config.connect_timeout_seconds
        )

    def parse_error(self, status: int, body: bytes) -> UpstreamErrorInfo:
        return wire.error_info(status, {}, body)

    def error_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes, *, model: str = ""
    ) -> errors.BrokerError:
        """The rest-json error: the exception's name from `x-amzn-ErrorType`, then the table."""
        info = wire.error_info(status, headers, body)
        name = f" {info.kind}" if info.kind else ""
        message = f"{self.name} returned HTTP {status}{name}: {redact(info.message) or 'no message'}"
        kw = {"provider": self.name, "model": model, "upstream_status": status}
        return wire.classify(status, info, message, headers, kw)
