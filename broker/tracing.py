"""OpenTelemetry traces: the daemon's tracer provider, one server span per RPC, one client span per upstream attempt.

Off by default. On when `tracing.enabled: true` or OTEL_TRACES_EXPORTER names `otlp`;
OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn it off whatever the config says.
Spans leave through opentelemetry-sdk's BatchSpanProcessor and its OTLP/gRPC exporter,
both configured by the standard variables (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS,
_INSECURE, _CERTIFICATE, _TIMEOUT, _COMPRESSION; OTEL_TRACES_SAMPLER[_ARG]; OTEL_BSP_*;
OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES; OTEL_PROPAGATORS), the config's keys winning
where set. Only OTLP over gRPC is shipped: an http/* protocol is refused at start.

Shape of a trace, one per RPC:

- the server span `modelbroker.v1.ModelBroker/<Method>` (kind SERVER), a child of the
  caller's `traceparent` (W3C trace context read from the gRPC metadata, with `baggage`),
  started by the auth gate before admission (refusals are traced too) and ended when
  the RPC ends (`Gatekeeper.enter` and `leave`, broker/auth.py); the request scope adds
  the request's outcome (broker/scope.py);
- per upstream attempt a client span `chat <model>` or `embeddings <model>` (kind CLIENT),
  a child of the server span: retries and fallbacks are siblings, numbered by
  `modelbroker.attempt` in the order the request log counts them.

Attributes follow the GenAI semantic conventions (gen_ai.operation.name, gen_ai.system,
gen_ai.provider.name, gen_ai.request.model, gen_ai.response.model,
gen_ai.usage.input_tokens / output_tokens, gen_ai.response.finish_reasons, error.type)
plus ours under `modelbroker.` (provider, attempt, cost_micro_usd, caller, request_id).
No prompt or answer text unless `tracing.capture_content`; every string that came from a
caller or an upstream is redacted first (broker/redact.py), as log lines are.

Cost: with tracing off nothing here runs but one ContextVar read per request (no span, no
metadata parsing); with it on, spans are made per request and per attempt, never per chunk.
The SERVER span lives in a ContextVar of its own (`CURRENT`), not the OpenTelemetry
context, so nothing has to be attached and detached across a stream's awaits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import grpc
import structlog
from opentelemetry import baggage, propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from broker import __version__, errors
from broker.config import ConfigError, TracingConfig
from broker.redact import redact
from broker.types import Finished

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from broker.registry import Target
    from broker.types import Message

log = structlog.get_logger("broker.tracing")

SERVICE = "modelbroker.v1.ModelBroker"
DEFAULT_SERVICE_NAME = "model-broker"
# Captured prompt/answer text, per attribute (UTF-8 characters, after redaction).
MAX_CAPTURED_CHARS = 32 * 1024
# Baggage members copied onto the server span (as baggage.<key>), and each value's length.
MAX_BAGGAGE_ATTRIBUTES = 16
MAX_BAGGAGE_VALUE_CHARS = 256
# Server spans: these codes are the server's failure (OpenTelemetry RPC conventions); the
# rest (INVALID_ARGUMENT, NOT_FOUND, ...) were the caller's and leave the status unset.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class _MetadataGetter(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _MetadataGetter()


@dataclass(slots=True)
class RequestTrace:
    """One RPC's server span, and the context its attempt spans are children of."""

    tracing: Tracing
    span: Span
    parent: Context  # the server span in a context: every attempt's parent
    completion: bool  # Complete or StreamComplete (which have finish reasons; Embed has none)

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    @property
    def capture_content(self) -> bool:
        return self.tracing.capture_content

    def start_attempt(
        self,
        operation: str,
        target: Target,
        *,
        attempt: int,
        tries: int,
        messages: Sequence[Message] = (),
    ) -> Span:
        """The client span of one upstream attempt (`operation`: "chat" or "embeddings")."""
        state = target.state
        url = urlparse(state.provider.base_url)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.system": state.config.vendor or state.type,
            "gen_ai.provider.name": state.config.vendor or state.type,
            "gen_ai.request.model": redact(target.model),
            "modelbroker.provider": state.name,
            "modelbroker.attempt": attempt,
            "modelbroker.target_attempt": tries,
            "server.address": url.hostname or "",
        }
        if url.port is not None:
            attributes["server.port"] = url.port
        if self.tracing.capture_content and messages:
            attributes["gen_ai.input.messages"] = _captured(_messages_json(messages))
        return self.tracing.tracer.start_span(
            f"{operation} {redact(target.model)}",
            context=self.parent,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )


# The current RPC's trace (None: tracing off, or not a ModelBroker RPC). Set by the auth
# gate in the RPC's own task; tasks the handler starts copy it.
CURRENT: ContextVar[RequestTrace | None] = ContextVar("modelbroker_trace", default=None)


def current() -> RequestTrace | None:
    return CURRENT.get()


def end_attempt(
    span: Span,
    *,
    model: str = "",
    finished: Finished | None = None,
    error: BaseException | None = None,
    answer: str | None = None,
    finish_reasons: bool = True,
) -> None:
    """End an attempt's span with what came back: usage, finish reason (not for embeddings,
    `finish_reasons` False) and cost, or the error."""
    if span.is_recording():
        if model:
            span.set_attribute("gen_ai.response.model", redact(model))
        if finished is not None:
            _set_finished(span, finished, finish_reasons=finish_reasons)
        if answer is not None:
            span.set_attribute("gen_ai.output.messages", _captured(_answer_json(answer)))
        if error is not None:
            _set_error(span, error)
    span.end()


def annotate_request(
    rt: RequestTrace,
    *,
    request_id: str,
    caller: str,
    requested_model: str,
    provider: str,
    model: str,
    attempts: int,
    finished: Finished | None,
    failure: BaseException | None,
) -> None:
    """The request's outcome on its server span (the scope calls this once, at the end)."""
    span = rt.span
    if not span.is_recording():
        return
    span.set_attribute("modelbroker.request_id", request_id)
    span.set_attribute("modelbroker.attempts", attempts)
    if caller:
        span.set_attribute("modelbroker.caller", caller)
    if requested_model:
        span.set_attribute("gen_ai.request.model", redact(requested_model))
    if provider:
        span.set_attribute("modelbroker.provider", provider)
        span.set_attribute("gen_ai.response.model", redact(model))
    if finished is not None:
        _set_finished(span, finished, finish_reasons=rt.completion)
    if isinstance(failure, errors.BrokerError):
        span.set_attribute("error.type", failure.reason or failure.code.name)
        span.set_attribute("modelbroker.error", errors.bound_redacted(failure.message, 1024))


def _set_finished(span: Span, finished: Finished, *, finish_reasons: bool = True) -> None:
    usage = finished.usage
    span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
    if usage.estimated:
        span.set_attribute("modelbroker.usage_estimated", True)
    if finish_reasons:
        span.set_attribute("gen_ai.response.finish_reasons", [finished.finish_reason.value])
    if finished.cost.known:
        span.set_attribute("modelbroker.cost_micro_usd", finished.cost.total_micro_usd)


def _set_error(span: Span, error: BaseException) -> None:
    if isinstance(error, errors.BrokerError):
        span.set_attribute("error.type", error.reason or error.code.name)
        span.set_status(Status(StatusCode.ERROR, errors.bound_redacted(error.message, 1024)))
    else:
        # Cancelled (the caller left, or a fallback closed it) or a bug: say which.
        span.set_attribute("error.type", type(error).__name__)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))


def _captured(text: str) -> str:
    return errors.bound_redacted(text, MAX_CAPTURED_CHARS)


def _messages_json(messages: Sequence[Message]) -> str:
    import orjson

    from broker.types import TextPart

    out = [
        {
            "role": m.role.value,
            "parts": [{"type": "text", "content": p.text} for p in m.content if isinstance(p, TextPart)],
        }
        for m in messages
    ]
    return orjson.dumps(out).decode()


def _answer_json(text: str) -> str:
    import orjson

    return orjson.dumps([{"role": "assistant", "parts": [{"type": "text", "content": text}]}]).decode()


class Tracing:
    """One daemon's tracer provider and exporter; `start_rpc` opens an RPC's server span."""

    def __init__(self, provider: TracerProvider, *, capture_content: bool = False) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("model-broker", __version__)
        self.capture_content = capture_content
        self._propagator = propagate.get_global_textmap()

    def start_rpc(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> RequestTrace:
        """The server span of one ModelBroker RPC, child of the caller's traceparent; made current."""
        carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
        parent = self._propagator.extract(carrier, getter=_GETTER)
        rpc_method = method.rsplit("/", 1)[-1]
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": SERVICE,
            "rpc.method": rpc_method,
        }
        members = baggage.get_all(parent)
        for key in list(members)[:MAX_BAGGAGE_ATTRIBUTES]:
            value = redact(str(members[key]))[:MAX_BAGGAGE_VALUE_CHARS]
            attributes[f"baggage.{redact(key)[:MAX_BAGGAGE_VALUE_CHARS]}"] = value
        span = self.tracer.start_span(
            f"{SERVICE}/{rpc_method}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        rt = RequestTrace(self, span, set_span_in_context(span, parent), rpc_method.endswith("Complete"))
        CURRENT.set(rt)
        return rt

    @staticmethod
    def end_rpc(rt: RequestTrace, context: Any, error: BaseException | None = None) -> None:
        """End the server span with the RPC's gRPC status (what `context` was aborted with)."""
        span = rt.span
        if span.is_recording():
            code = context.code()
            if code is None and error is not None and not isinstance(error, grpc.aio.AbortError):
                code = grpc.StatusCode.CANCELLED  # the caller went away, or its deadline passed
            if not isinstance(code, grpc.StatusCode):
                code = grpc.StatusCode.OK
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_ERRORS:
                span.set_status(
                    Status(StatusCode.ERROR, errors.bound_redacted(context.details() or "", 1024))
                )
        span.end()

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        return bool(self.provider.force_flush(timeout_millis))

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout) and stop the exporter thread."""
        self.provider.shutdown()


def _enabled(config: TracingConfig, env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if "none" in exporters:
        return False
    return config.enabled or "otlp" in exporters


def setup(config: TracingConfig, env: Mapping[str, str] | None = None) -> Tracing | None:
    """The daemon's tracing, or None when it is off (the default)."""
    env = os.environ if env is None else env
    if not _enabled(config, env):
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol.strip().lower() != "grpc":
        raise ConfigError(
            [
                f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported: this broker exports OTLP "
                "over gRPC only (port 4317 on a collector); unset it or set grpc"
            ],
            "environment",
        )
    # The SDK and exporter load only when tracing is on (the API above is all the rest needs).
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, Any] = {"service.version": __version__}
    if config.service_name:
        attributes["service.name"] = config.service_name
    elif not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = DEFAULT_SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    exporter = OTLPSpanExporter(endpoint=config.endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    endpoint = (
        config.endpoint
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or "http://localhost:4317"
    )
    log.info("tracing", exporter="otlp", endpoint=redact(endpoint), capture_content=config.capture_content)
    return Tracing(provider, capture_content=config.capture_content)
