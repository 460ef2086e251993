"""What every provider is: auth, base URL and one pooled HTTP transport, plus a lifecycle.

A provider module subclasses `Provider` and supplies the wire mapping for one protocol:
`stream()` (neutral request -> HTTP -> neutral events), `list_models()`, `health_check()`
and `parse_error()` (an upstream error body -> message and hints). The HTTP mechanics
shared by all of them live here and in `transport.py`: opening a request with typed
errors, relaying a framed body (SSE or NDJSON, line-capped) as events, and the status-code
-> exception table.

`stream()` is the one path; unary completions accumulate it. It must be an async
generator whose `finally` closes the upstream response, so that closing the generator
(caller cancelled, deadline passed) closes the HTTP request at once.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import email.utils
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import orjson
import structlog

from broker import errors
from broker.config import ProviderConfig
from broker.providers.options import option_keys
from broker.providers.sse import SSEError
from broker.providers.transport import (
    MAX_SMALL_BODY,
    Transport,
    UpstreamResponse,
    display_url,
    register_proxy_secrets,
)
from broker.redact import redact, register_secret
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    DiscoveredModel,
    EmbedRequest,
    EmbedResult,
    EndEvent,
)

log = structlog.get_logger("broker.providers")

MAX_ERROR_BODY = 64 * 1024
# One embeddings answer (a part of a split batch) is read up to this size: 2048 vectors of
# 3072 floats as JSON text is about 120 MiB.
MAX_EMBED_BODY = 160 * 1024 * 1024
F = TypeVar("F")


@dataclass(slots=True)
class UpstreamErrorInfo:
    """What a provider read from an error body."""

    message: str
    # Vendor's error type/code, e.g. "insufficient_quota", "overloaded_error".
    kind: str = ""
    # The parameter the upstream blamed, if it said.
    param: str = ""


class Provider(abc.ABC):
    type: ClassVar[str]
    # Sent on every request; subclasses add auth in `auth_headers`.
    base_headers: ClassVar[Mapping[str, str]] = {
        "content-type": "application/json",
        "accept": "application/json",
        "user-agent": "model-broker",
    }

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.name = config.name
        self.base_url = config.resolved_base_url()
        self.api_key = config.resolved_api_key()
        register_secret(self.api_key)
        proxy = config.proxy.get_secret_value() if config.proxy is not None else None
        register_proxy_secrets(proxy)
        self.transport = Transport(
            name=self.name,
            base_url=self.base_url,
            headers={**self.base_headers, **self.auth_headers(), **config.headers},
            max_connections=config.max_connections or 1000,
            connect_timeout=config.connect_timeout_seconds,
            read_timeout=config.read_timeout_seconds,
            pool_timeout=config.pool_timeout_seconds,
            max_decompressed_bytes=config.max_decompressed_bytes,
            proxy=proxy,
            ca_file=config.tls_ca_file,
        )

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.transport.start()

    def reasoning_origin(self, model: str) -> str:
        """Who made the reasoning this provider's `model` produces, as the provider_type its
        reasoning parts carry: only history parts with this origin are sent back to it. The
        type, unless one type serves several vendors' models (vertex: Gemini and Claude)."""
        return self.type

    async def close(self) -> None:
        await self.transport.close()

    # --- what each protocol supplies ---------------------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        return {}

    @abc.abstractmethod
    def stream(self, request: CompletionRequest) -> AsyncGenerator[CompletionEvent, None]:
        """Start with a StartEvent, then deltas, then exactly one EndEvent; raise BrokerError."""

    @abc.abstractmethod
    async def list_models(self) -> list[DiscoveredModel]:
        """Models the upstream lists (discovery)."""

    @abc.abstractmethod
    async def health_check(self) -> None:
        """A cheap call that never costs money; raises BrokerError when unhealthy."""

    @abc.abstractmethod
    def parse_error(self, status: int, body: bytes) -> UpstreamErrorInfo:
        """Read this protocol's error body (never raises)."""

    # --- embeddings ----------------------------------------------------------------------------

    # The most inputs one upstream embeddings call takes (config `embed_batch_size` overrides).
    embed_batch_default: ClassVar[int] = 2048

    async def embed_part(self, model: str, inputs: tuple[str, ...], dimensions: int | None) -> EmbedResult:
        """One upstream embeddings call for at most `embed_batch_size` inputs; a type with
        no embeddings endpoint keeps this default."""
        raise errors.CapabilityMissing(
            f"{self.name}: provider type {self.type!r} has no embeddings endpoint; "
            "use an openai or ollama provider for Embed",
            provider=self.name,
            model=model,
            metadata={"provider_type": self.type},
        )

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """The whole batch: split into parts of `embed_batch_size`, sent concurrently (at most
        `embed_concurrency` at once) and reassembled in input order. A part that fails fails
        the call, its message naming the part's input range; the other parts are cancelled,
        and cancelling the call cancels (closes) every part."""
        size = self.config.embed_batch_size or self.embed_batch_default
        inputs = request.inputs
        bounds = [(i, min(i + size, len(inputs))) for i in range(0, len(inputs), size)]
        if len(bounds) <= 1:
            return await self._embed_checked(request, 0, len(inputs))
        gate = asyncio.Semaphore(self.config.embed_concurrency)
        results: list[EmbedResult | None] = [None] * len(bounds)

        async def part(k: int, start: int, end: int) -> None:
            async with gate:
                try:
                    results[k] = await self._embed_checked(request, start, end)
                except errors.BrokerError as exc:
                    exc.message = f"inputs[{start}:{end}] (part {k + 1} of {len(bounds)}): {exc.message}"
                    exc.args = (exc.message,)
                    exc.metadata.setdefault("failed_inputs", f"{start}:{end}")
                    raise

        try:
            async with asyncio.TaskGroup() as tg:
                for k, (start, end) in enumerate(bounds):
                    tg.create_task(part(k, start, end), name=f"{self.name}-embed-{start}")
        except BaseExceptionGroup as group:
            # The first part's failure is the call's (the others were cancelled because of it).
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        vectors: list[tuple[float, ...]] = []
        tokens, reported = 0, True
        for r in results:
            assert r is not None
            vectors.extend(r.vectors)
            tokens += r.input_tokens
            reported = reported and r.usage_reported
        return EmbedResult(tuple(vectors), tokens, reported)

    async def _embed_checked(self, request: EmbedRequest, start: int, end: int) -> EmbedResult:
        chunk = request.inputs[start:end]
        result = await self.embed_part(request.model, chunk, request.dimensions)
        if len(result.vectors) != len(chunk):
            raise errors.UpstreamProtocolError(
                f"{self.name}: asked for {len(chunk)} embeddings, got {len(result.vectors)}",
                provider=self.name,
                model=request.model,
            )
        return result

    async def post_embed(self, path: str, body: Any, *, model: str) -> Any:
        """POST an embeddings call through the completion pool (gated like completions) and
        read its whole JSON answer, bounded."""
        async with self.open("POST", path, json=body, model=model) as resp:
            data = await resp.read(MAX_EMBED_BODY)
        return decode_json(data, provider=self.name, what=f"POST {path}")

    # --- shared HTTP mechanics ---------------------------------------------------------------

    def open(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        request: CompletionRequest | None = None,
        model: str = "",
        read_timeout: float | None = None,
        gated: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> Opened:
        """`async with provider.open(...) as resp`: send a request and yield the 2xx response;
        map every failure to a BrokerError. `headers`: added for this request only (a
        per-request credential).

        The response is closed on exit, whatever the reason (including cancellation): a body
        not read to its end closes its connection, which stops the upstream generating.
        """
        model = model or (request.model if request else "")
        deadline = request.timeout if request is not None else None
        if request is not None and request.provider_options:
            # Every type merges them into its body (options.merge_options); logged here once,
            # by key only: the values are the caller's and may hold anything.
            log.debug(
                "provider options merged", provider=self.name, keys=option_keys(request.provider_options)
            )
        # A completion read by the completion service is timed there (time to first token,
        # stalls: one timer, one message); the transport's read timeout is for everything else.
        timed_reads = request is None or not request.caller_times_reads
        exchange = self.transport.request(
            method,
            path,
            _json_bytes(json),
            deadline=deadline,
            read_timeout=read_timeout,
            timed_reads=timed_reads,
            gated=gated,
            headers=headers,
        )
        return Opened(self, exchange, model)

    async def _status_error(self, resp: UpstreamResponse, model: str) -> errors.BrokerError:
        if resp.status < 400:
            # Redirects are never followed: one could carry the provider key to another host.
            where = resp.headers.get("location", "")
            to = f" to {display_url(where)}" if where.startswith(("http://", "https://")) else ""
            return errors.UpstreamProtocolError(
                f"{self.name}: {self.base_url} answered HTTP {resp.status}, a redirect{to}; the broker "
                "does not follow redirects: set base_url to the final URL",
                provider=self.name,
                model=model,
                upstream_status=resp.status,
            )
        body = await resp.read_prefix(MAX_ERROR_BODY)
        return self.error_for_status(resp.status, resp.headers, body, model=model)

    async def get_json(self, path: str, *, timeout: float | None = None) -> Any:
        """GET a JSON document (discovery, health)."""
        return await self._json_call("GET", path, None, timeout=timeout)

    async def post_json(self, path: str, body: Any, *, timeout: float | None = None, model: str = "") -> Any:
        """POST and read a whole JSON answer (used for metadata calls such as Ollama's /api/show)."""
        return await self._json_call("POST", path, body, timeout=timeout, model=model)

    async def _json_call(
        self, method: str, path: str, body: Any, *, timeout: float | None, model: str = ""
    ) -> Any:
        """A small request (not the completion path): errors mapped, the answer bounded and read as JSON."""
        # Not gated: a pool full of completions must not fail health checks and discovery.
        async with self.open(method, path, json=body, model=model, read_timeout=timeout, gated=False) as resp:
            data = await resp.read(MAX_SMALL_BODY)
        return decode_json(data, provider=self.name, what=f"{method} {path}")

    async def relay(
        self,
        resp: UpstreamResponse,
        frames: Callable[[bytes], list[F]],
        feed: Callable[[F], Iterable[CompletionEvent]],
        *,
        model: str,
        missing_end: str,
        drain_seconds: float,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """A framed body's events: `frames` cuts each network read into frames (SSE events,
        NDJSON lines; bounded), `feed` turns one frame into events; the EndEvent comes last.

        The EndEvent is held back until the rest of the body is read (at most drain_seconds):
        a consumer may stop at EndEvent and close us, and only a body read to its end lets
        the pooled connection be reused. A body that ends with no EndEvent is cut short.
        A protocol's `stream` may run the same loop itself on a `Relay` (openai.py does), which
        spares every event one async-generator step.
        """
        relay = Relay(self.name, frames, feed, model=model, missing_end=missing_end)
        chunks = resp.chunks()
        async with contextlib.aclosing(chunks):
            async for data in chunks:
                for event in relay.events(data):
                    yield event
                if relay.end is not None:
                    break
            end = await relay.finish(resp, chunks, drain_seconds)
        yield end

    def error_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes, *, model: str = ""
    ) -> errors.BrokerError:
        """Map an upstream HTTP error to the broker's exception (the message kept, keys redacted)."""
        info = self.parse_error(status, body)
        message = f"{self.name} returned HTTP {status}: {redact(info.message) or 'no message'}"
        kw: dict[str, Any] = {"provider": self.name, "model": model, "upstream_status": status}
        return classify_error(status, info, message, headers, kw)


class Opened:
    """One `async with provider.open(...)`: the transport's exchange, a status >= 300 turned
    into its BrokerError (the body read for it), and every BrokerError, raised inside or
    out, given this provider and model where the raiser did not know them.

    A class rather than an asynccontextmanager: that is an async generator per request."""

    __slots__ = ("_exchange", "_model", "_provider")

    def __init__(
        self, provider: Provider, exchange: AbstractAsyncContextManager[UpstreamResponse], model: str
    ) -> None:
        self._provider = provider
        self._exchange = exchange
        self._model = model

    async def __aenter__(self) -> UpstreamResponse:
        exchange = self._exchange
        try:
            resp = await exchange.__aenter__()
        except errors.BrokerError as exc:
            exc.with_target(self._provider.name, self._model)
            raise
        if resp.status >= 300:
            try:
                error = await self._provider._status_error(resp, self._model)
            except BaseException as exc:
                await self.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            await self.__aexit__(type(error), error, None)
            raise error
        return resp

    async def __aexit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            await self._exchange.__aexit__(typ, exc, tb)
        except errors.BrokerError as err:
            err.with_target(self._provider.name, self._model)
            raise
        if isinstance(exc, errors.BrokerError):
            exc.with_target(self._provider.name, self._model)


class Relay:
    """A framed body turned into events one network read at a time, for `Provider.relay` or a
    protocol's own loop over `resp.chunks()` (openai.py's):

        for event in relay.events(data): yield event     # per read; EndEvent held back
        if relay.end is not None: break
        ... then: end = await relay.finish(resp, chunks, drain_seconds); yield end

    `events` is a plain generator (an event is yielded as soon as it is fed, and a frame that
    fails fails after the events before it), so the read loop adds no async step per event.
    A loop that handles the frames itself calls `frames` (then `feed` may be None) and sets
    `end`."""

    __slots__ = ("_feed", "_frames", "_missing_end", "_model", "_provider", "end")

    def __init__(
        self,
        provider: str,
        frames: Callable[[bytes], list[F]],
        feed: Callable[[F], Iterable[CompletionEvent]] | None = None,
        *,
        model: str,
        missing_end: str,
    ) -> None:
        self._provider = provider
        self._frames: Callable[[bytes], list[Any]] = frames
        self._feed: Callable[[Any], Iterable[CompletionEvent]] | None = feed
        self._model = model
        self._missing_end = missing_end
        self.end: EndEvent | None = None

    def frames(self, data: bytes) -> list[Any]:
        """The frames `data` completes; a framing error (oversize line) is a protocol error."""
        try:
            return self._frames(data)
        except SSEError as exc:
            raise errors.UpstreamProtocolError(
                f"{self._provider}: {exc}", provider=self._provider, model=self._model
            ) from None

    def events(self, data: bytes) -> Iterator[CompletionEvent]:
        """The events the frames completed by `data` make, but the EndEvent (kept in `end`;
        the frames after the one that ended the stream are not fed)."""
        feed = self._feed
        assert feed is not None, "Relay.events needs a feed"
        for frame in self.frames(data):
            for event in feed(frame):
                if isinstance(event, EndEvent):
                    self.end = event
                else:
                    yield event
            if self.end is not None:
                return

    async def finish(
        self, resp: UpstreamResponse, chunks: AsyncIterator[bytes], drain_seconds: float
    ) -> EndEvent:
        """The EndEvent once the rest of the body is read (at most drain_seconds, then the
        response is closed unfinished); a body that ended without one is cut short."""
        end = self.end
        if end is None:
            raise errors.UpstreamProtocolError(
                f"{self._provider}: {self._missing_end}", provider=self._provider, model=self._model
            )
        if resp.at_eof:
            return end  # read to its end already (the usual case): no timer, no last read
        with contextlib.suppress(errors.BrokerError, TimeoutError):
            async with asyncio.timeout(drain_seconds):
                async for _ in chunks:
                    pass
        return end


def classify_error(
    status: int, info: UpstreamErrorInfo, message: str, headers: Mapping[str, str], kw: dict[str, Any]
) -> errors.BrokerError:
    """The status-code table shared by every protocol (PROTOCOLS.md "Mapping HTTP status")."""
    text = f"{info.kind} {info.message}".lower()
    if info.kind == "billing_error" or "credit balance" in text:
        # A billing state, whatever the status: Anthropic sends an empty balance as a 400.
        return errors.UpstreamQuotaExceeded(message, **kw)
    if status in (400, 413, 422):
        if "context_length" in text or "context length" in text or "too long" in text or status == 413:
            return errors.ContextLengthExceeded(message, **kw)
        if "content_filter" in text or "content policy" in text or "content_policy" in text:
            return errors.ContentFiltered(message, **kw)
        if status == 400 and info.param:
            kw["metadata"] = {"param": info.param}
        return errors.UpstreamRejectedRequest(message, **kw)
    if status == 401:
        return errors.UpstreamAuthFailed(message, **kw)
    if status == 402:
        return errors.UpstreamQuotaExceeded(message, **kw)
    if status == 403:
        return errors.UpstreamPermissionDenied(message, **kw)
    if status == 404:
        return errors.ModelNotFound(message, **kw)
    if status in (408, 504):
        return errors.UpstreamTimeout(message, **kw)
    if status == 409:
        return errors.UpstreamConflict(message, **kw)
    if status == 429:
        if "insufficient_quota" in text or "quota" in info.kind.lower() or "billing" in text:
            return errors.UpstreamQuotaExceeded(message, **kw)
        return errors.UpstreamRateLimited(message, retry_after=retry_after_seconds(headers), **kw)
    if status >= 500:
        return errors.UpstreamUnavailable(message, retry_after=retry_after_seconds(headers), **kw)
    return errors.UpstreamRejectedRequest(message, **kw)


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_go_duration(value: str) -> float | None:
    """OpenAI's x-ratelimit-reset-* values: "1s", "6m0s", "120ms"."""
    total, pos = 0.0, 0
    for m in _GO_DURATION.finditer(value.strip()):
        if m.start() != pos:
            return None
        n, unit = float(m.group(1)), m.group(2)
        total += n * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        pos = m.end()
    return total if pos and pos == len(value.strip()) else None


def retry_after_seconds(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """A server's requested delay: retry-after-ms, retry-after (seconds or HTTP date), rate-limit resets."""
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(float(ms) / 1000.0, 0.0)
    ra = headers.get("retry-after")
    if ra:
        try:
            return max(float(ra), 0.0)
        except ValueError:
            with contextlib.suppress(TypeError, ValueError):
                when = email.utils.parsedate_to_datetime(ra).timestamp()
                return max(when - (time.time() if now is None else now), 0.0)
    resets = [
        d
        for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if (v := headers.get(h)) and (d := parse_go_duration(v)) is not None
    ]
    return max(resets) if resets else None


def decode_json(data: bytes | str, *, provider: str, what: str) -> Any:
    """orjson: strict (no NaN, no 1e999, no lone surrogates) and bounded in depth (1024), so a
    hostile document is a protocol error, never a RecursionError."""
    try:
        return orjson.loads(data)
    except ValueError:
        # Redact first, then cut: a secret straddling the cut must not leave its head behind.
        head = data[:4096].decode("utf-8", "replace") if isinstance(data, bytes) else data[:4096]
        snippet = redact(head)[:200]
        raise errors.UpstreamProtocolError(
            f"{provider}: {what} answered with something that is not JSON: {snippet!r}", provider=provider
        ) from None


def _json_bytes(doc: Any) -> bytes | None:
    """A request body: orjson (several times faster), or the stdlib for what orjson refuses."""
    if doc is None:
        return None
    if isinstance(doc, bytes):
        return doc  # serialised already: a body its signature covers (AWS SigV4)
    try:
        return orjson.dumps(doc)
    except TypeError:  # e.g. integers past 64 bits in a tool schema
        import json

        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
