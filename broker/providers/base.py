"""What every provider is: auth, base URL and one pooled HTTP client, plus a lifecycle.

A provider module subclasses `Provider` and supplies the wire mapping for one protocol:
`stream()` (neutral request -> HTTP -> neutral events), `list_models()`, `health_check()`
and `parse_error()` (an upstream error body -> message and hints). The HTTP mechanics
shared by all of them live here: opening a streamed request with typed errors, reading it
with stalls and disconnects mapped, and the status-code -> exception table.

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
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import orjson

from broker import errors
from broker.config import ProviderConfig
from broker.providers.http11 import Pool, Response
from broker.redact import redact, register_secret
from broker.types import CompletionEvent, CompletionRequest, DiscoveredModel, EndEvent

MAX_ERROR_BODY = 64 * 1024


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
    }

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.name = config.name
        self.base_url = config.resolved_base_url()
        self.api_key = config.resolved_api_key()
        register_secret(self.api_key)
        self._client: httpx.AsyncClient | None = None
        # Completions go through the lean client (see http11); httpx serves discovery and health.
        self._pool: Pool | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None:
            return
        limits = httpx.Limits(
            max_connections=self.config.max_connections,
            max_keepalive_connections=self.config.max_connections,
            keepalive_expiry=30.0,
        )
        timeout = httpx.Timeout(
            connect=self.config.connect_timeout_seconds,
            read=self.config.read_timeout_seconds,
            write=self.config.read_timeout_seconds,
            pool=self.config.connect_timeout_seconds,
        )
        headers = {**self.base_headers, **self.auth_headers(), **self.config.headers}
        self._client = httpx.AsyncClient(
            base_url=self.base_url + "/", headers=headers, timeout=timeout, limits=limits, trust_env=False
        )
        self._pool = Pool(
            self.base_url, max_connections=self.config.max_connections, keepalive_expiry=30.0, headers=headers
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError(f"provider {self.name} used before start()")
        return self._client

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

    # --- shared HTTP mechanics ---------------------------------------------------------------

    def _timeout_for(self, request: CompletionRequest | None) -> httpx.Timeout:
        """The caller's remaining deadline bounds every phase of the upstream call."""
        read = self.config.read_timeout_seconds
        connect = self.config.connect_timeout_seconds
        if request is not None and request.timeout is not None:
            remaining = max(request.timeout, 0.001)
            read, connect = min(read, remaining), min(connect, remaining)
        return httpx.Timeout(connect=connect, read=read, write=read, pool=connect)

    @contextlib.contextmanager
    def transport_errors(
        self,
        *,
        model: str,
        timed_out: Callable[[httpx.TimeoutException], str],
        unreachable: Callable[[httpx.TransportError], str],
    ) -> Iterator[None]:
        """httpx's timeouts -> UpstreamTimeout, its other transport errors -> UpstreamUnavailable.

        Every upstream I/O (the request, a JSON call, reading a stream) goes through this, each
        with its own wording; a sync context manager, so it can wrap awaits and yields alike.
        """
        try:
            yield
        except httpx.TimeoutException as exc:  # before TransportError: it is one
            raise errors.UpstreamTimeout(
                f"{self.name}: {timed_out(exc)}", provider=self.name, model=model
            ) from None
        except httpx.TransportError as exc:
            raise errors.UpstreamUnavailable(
                f"{self.name}: {unreachable(exc)}", provider=self.name, model=model
            ) from None

    def _cannot_reach(self, exc: httpx.TransportError) -> str:
        return f"cannot reach {self.base_url}: {_describe_transport(exc)}"

    @contextlib.asynccontextmanager
    async def open(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        request: CompletionRequest | None = None,
        model: str = "",
    ) -> AsyncIterator[Response]:
        """Send a request and yield the streamed 2xx response; map every failure to a BrokerError.

        The response is closed on exit, whatever the reason (including cancellation).
        """
        model = model or (request.model if request else "")
        timeout = self._timeout_for(request)
        if self._pool is None:
            raise RuntimeError(f"provider {self.name} used before start()")
        with self.transport_errors(
            model=model,
            timed_out=lambda exc: f"no response within {_fmt_timeout(exc, timeout)}",
            unreachable=self._cannot_reach,
        ):
            resp = await self._pool.request(method, path, _json_bytes(json), timeout)
        try:
            if resp.status_code >= 400:
                body = await _read_bounded(resp)
                raise self.error_for_status(resp.status_code, resp.headers, body, model=model)
            yield resp
        finally:
            await resp.aclose()

    async def get_json(self, path: str, *, timeout: float | None = None) -> Any:
        """GET a JSON document (discovery, health)."""
        return await self._json_call("GET", path, None, timeout=timeout)

    async def post_json(self, path: str, body: Any, *, timeout: float | None = None, model: str = "") -> Any:
        """POST and read a whole JSON answer (used for metadata calls such as Ollama's /api/show)."""
        return await self._json_call("POST", path, body, timeout=timeout, model=model)

    async def _json_call(
        self, method: str, path: str, body: Any, *, timeout: float | None, model: str = ""
    ) -> Any:
        """A small request on the httpx client (not the completion path): errors mapped, JSON read."""
        t = httpx.Timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT
        with self.transport_errors(
            model=model, timed_out=lambda _: f"{method} {path} timed out", unreachable=self._cannot_reach
        ):
            resp = await self.client.request(method, path, json=body, timeout=t)
        if resp.status_code >= 400:
            raise self.error_for_status(
                resp.status_code, resp.headers, resp.content[:MAX_ERROR_BODY], model=model
            )
        return decode_json(resp.content, provider=self.name, what=f"{method} {path}")

    async def guarded_lines(self, resp: Response, *, model: str = "") -> AsyncGenerator[str, None]:
        """Lines of a streamed body, with stalls and disconnects mapped to BrokerErrors.

        Splits on "\n" only: httpx's aiter_lines also splits on U+2028/U+2029/U+0085, which
        may appear raw inside a JSON string and would break an NDJSON or SSE line in two.
        """
        pending = ""
        with self.transport_errors(
            model=model,
            timed_out=lambda _: f"stream stalled (no data for {self.config.read_timeout_seconds:g}s)",
            unreachable=lambda exc: f"connection lost mid-stream: {_describe_transport(exc)}",
        ):
            async for chunk in resp.aiter_text():
                parts = (pending + chunk).split("\n")
                pending = parts.pop()
                for line in parts:
                    yield line.removesuffix("\r")
        if pending:
            yield pending.removesuffix("\r")

    async def relay_lines(
        self,
        resp: Response,
        feed: Callable[[str], Iterable[CompletionEvent]],
        *,
        model: str,
        missing_end: str,
        drain_seconds: float,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """A line protocol's events (`feed` parses one line), the EndEvent last.

        The EndEvent is held back until the rest of the body is read (at most drain_seconds):
        a consumer may stop at EndEvent and close us, and only a body read to its end lets
        the pooled connection be reused. A body that ends with no EndEvent is cut short.
        """
        end: EndEvent | None = None
        async with contextlib.aclosing(self.guarded_lines(resp, model=model)) as lines:
            async for line in lines:
                for event in feed(line):
                    if isinstance(event, EndEvent):
                        end = event
                    else:
                        yield event
                if end is not None:
                    break
            if end is None:
                raise errors.UpstreamProtocolError(
                    f"{self.name}: {missing_end}", provider=self.name, model=model
                )
            with contextlib.suppress(errors.BrokerError, TimeoutError):
                async with asyncio.timeout(drain_seconds):
                    async for _ in lines:
                        pass
        yield end

    def error_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes, *, model: str = ""
    ) -> errors.BrokerError:
        """Map an upstream HTTP error to the broker's exception (the message kept, keys redacted)."""
        info = self.parse_error(status, body)
        message = f"{self.name} returned HTTP {status}: {redact(info.message) or 'no message'}"
        kw: dict[str, Any] = {"provider": self.name, "model": model, "upstream_status": status}
        return classify_error(status, info, message, headers, kw)


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
    import json

    try:
        return json.loads(data)
    except ValueError:
        snippet = redact(data[:200].decode("utf-8", "replace") if isinstance(data, bytes) else data[:200])
        raise errors.UpstreamProtocolError(
            f"{provider}: {what} answered with something that is not JSON: {snippet!r}", provider=provider
        ) from None


def _json_bytes(doc: Any) -> bytes:
    """A request body: orjson (several times faster), or the stdlib for what orjson refuses."""
    if doc is None:
        return b""
    try:
        return orjson.dumps(doc)
    except TypeError:  # e.g. integers past 64 bits in a tool schema
        import json

        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


async def _read_bounded(resp: Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in resp.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass  # an error body cut short still tells the status
    return b"".join(chunks)[:MAX_ERROR_BODY]


def _describe_transport(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed ({text})"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the server closed the connection ({text})"
    return text


def _fmt_timeout(exc: httpx.TimeoutException, timeout: httpx.Timeout) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"{timeout.connect:g}s (connect)"
    return f"{timeout.read:g}s"
