"""The grpc.aio server: a thin servicer over the completion service, health, reflection, start/stop.

The servicer converts proto <-> neutral types and maps BrokerErrors to statuses through
`errors.to_grpc_status`; it holds no provider logic. Cancellation: when the caller goes
away or its deadline passes, grpc.aio raises CancelledError in the handler at its next
await; the provider stream is closed by `aclosing` on the way out (closing the upstream
HTTP request) and the CancelledError is re-raised.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import structlog
from grpc_reflection.v1alpha import reflection

from broker import auth, convert, errors
from broker.breaker import BreakerState
from broker.coalesce import coalesced
from broker.completion import Accumulated, CallRecord, CompletionService, Finished, Output, Started
from broker.config import Settings, parse_listen
from broker.health import HealthMonitor
from broker.metrics import BrokerMetrics, MeteredHealthServicer, MetricsServer
from broker.registry import Registry
from broker.tls import server_credentials
from broker.types import TextDeltaEvent, ToolCallDeltaEvent
from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc

log = structlog.get_logger("broker.server")

# grpc ships no type hints (grpc-stubs lags grpc.aio), so the context is untyped here.
Context: TypeAlias = Any
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_BREAKER_TO_PB = {
    BreakerState.CLOSED: pb.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: pb.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: pb.BREAKER_STATE_HALF_OPEN,
}


def request_id_for(context: Context) -> str:
    """The caller's x-request-id when it is sane, else a fresh one; echoed in initial metadata."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


# The current completion's request id, for error trailers (set in `_run`, read in `_abort`).
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


@dataclass(frozen=True, slots=True)
class _Status(grpc.Status):  # type: ignore[misc]
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _with_request_id(status: Any) -> Any:
    """abort_with_status replaces the trailers, so the request id rides with the details."""
    request_id = _request_id.get()
    if not request_id:
        return status
    md = (*tuple(status.trailing_metadata or ()), ("x-request-id", request_id))
    return _Status(status.code, status.details, md)


def _status_name(exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    if isinstance(exc, errors.BrokerError):
        return str(exc.code.name)
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


class ModelBrokerServicer(pb_grpc.ModelBrokerServicer):
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        health: HealthMonitor,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.health = health
        # A breaker that opens or closes re-publishes that provider's health at once.
        self.completions = CompletionService(registry, on_breaker_change=health.publish)
        # Completion RPCs running now (drain and tests watch it return to 0); once
        # `draining`, new ones are refused with SHUTTING_DOWN while these finish.
        self.in_flight = 0
        self.draining = False
        self.metrics = metrics or BrokerMetrics(process=False)

    # --- completions -----------------------------------------------------------------------------

    async def _run(
        self, request: pb.CompleteRequest | pb.StreamCompleteRequest, context: Context, kind: str
    ) -> AsyncIterator[Output]:
        """The shared body of both completion RPCs: validate, stream, log one line."""
        t0 = time.monotonic()
        request_id = request_id_for(context)
        # In the trailers, not initial metadata: they travel with the status, where initial
        # metadata costs a gRPC operation of its own per call (~0.1 ms). The body has it too
        # (StreamStart / CompleteResponse.request_id); `_abort` adds it to error trailers.
        _request_id.set(request_id)
        context.set_trailing_metadata((("x-request-id", request_id),))
        remaining = context.time_remaining()
        deadline = None if remaining is None else t0 + remaining
        record = CallRecord()
        finished: Finished | None = None
        failure: BaseException | None = None
        # Time spent awaiting the completion pipeline (provider + upstream) for its next
        # event; the rest of the request is the broker's own overhead (metrics). None: the
        # request never got that far. Two clock reads per event, nothing else per chunk.
        upstream_wait: float | None = None
        waiting_since: float | None = None
        inflight = self.metrics.inflight.get(kind)
        if inflight is not None:
            inflight.inc()
        self.in_flight += 1
        try:
            if self.draining:
                raise errors.ShuttingDown("the broker is shutting down: send this request to another replica")
            call = convert.completion_from_proto(
                request, max_message_bytes=self.settings.server.max_message_bytes
            )
            auth.check_call(self.registry, call)  # allow_models, on the resolved targets
            upstream_wait = 0.0
            waiting_since = time.monotonic()
            # Unary buffers: a failure part-way may still retry, as nothing reached the caller.
            buffered = kind == "Complete"
            async for out in self.completions.stream(
                call, request_id, deadline=deadline, record=record, buffered=buffered
            ):
                upstream_wait += time.monotonic() - waiting_since
                waiting_since = None
                if isinstance(out, Started):
                    # Whatever picked the target, nothing it says reaches a caller not allowed it.
                    auth.require_permitted(out.provider, out.model, requested=call.model)
                if isinstance(out, Finished):
                    finished = out
                yield out
                waiting_since = time.monotonic()
        except BaseException as exc:
            failure = exc
            raise
        finally:
            end = time.monotonic()
            if waiting_since is not None and upstream_wait is not None:
                upstream_wait += end - waiting_since
            if inflight is not None:
                inflight.dec()
            self.in_flight -= 1
            self._log_request(kind, request_id, request.model, record, finished, failure, t0)
            self._observe(kind, record, finished, failure, end - t0, t0, upstream_wait)

    def _log_request(
        self,
        kind: str,
        request_id: str,
        model: str,
        record: CallRecord,
        finished: Finished | None,
        failure: BaseException | None,
        t0: float,
    ) -> None:
        last = record.attempts[-1] if record.attempts else None
        fields: dict[str, Any] = {
            "rpc": kind,
            "request_id": request_id,
            "caller": auth.caller_name(),
            "model": last.model if last else model,
            "requested_model": model,
            "provider": last.provider if last else "",
            "attempts": len(record.attempts),
            "status": _status_name(failure),
            "duration_ms": round((time.monotonic() - t0) * 1000, 2),
        }
        if record.first_token_at is not None:
            fields["ttft_ms"] = round((record.first_token_at - t0) * 1000, 2)
        if finished is not None:
            fields["tokens_in"] = finished.usage.input_tokens
            fields["tokens_out"] = finished.usage.output_tokens
            fields["cost_micro_usd"] = finished.cost.total_micro_usd if finished.cost.known else None
        if isinstance(failure, errors.BrokerError):
            fields["reason"] = failure.reason
            fields["error"] = failure.message
        log.info("request", **fields)

    def _observe(
        self,
        kind: str,
        record: CallRecord,
        finished: Finished | None,
        failure: BaseException | None,
        duration: float,
        t0: float,
        upstream_wait: float | None,
    ) -> None:
        """Metrics for one finished completion RPC (labels from the resolved target only)."""
        last = record.attempts[-1] if record.attempts else None
        cost = finished.cost.total_micro_usd if finished is not None and finished.cost.known else None
        self.metrics.observe(
            kind,
            model=last.model if last else "",
            provider=last.provider if last else "",
            status=_status_name(failure),
            duration=duration,
            ttft=None if record.first_token_at is None else record.first_token_at - t0,
            upstream_wait=upstream_wait if last else None,
            tokens_in=finished.usage.input_tokens if finished is not None else 0,
            tokens_out=finished.usage.output_tokens if finished is not None else 0,
            cost_micro_usd=cost,
        )

    async def _abort(self, context: Context, exc: BaseException) -> None:
        if isinstance(exc, errors.BrokerError):
            await context.abort_with_status(_with_request_id(errors.to_grpc_status(exc)))
        log.exception("internal_error", error=repr(exc))
        await context.abort_with_status(
            _with_request_id(errors.internal_status("internal error in the broker; see its logs"))
        )

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        acc = Accumulated()
        try:
            async for out in self._run(request, context, "Complete"):
                acc.add(out)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await self._abort(context, exc)
        assert acc.started is not None and acc.finished is not None
        message = pb.Message(role=pb.ROLE_ASSISTANT)
        text = "".join(acc.text)
        if text:
            message.content.add(text=text)
        for tc in acc.calls():
            message.tool_calls.add(id=tc.id, name=tc.name, arguments=tc.arguments)
        return pb.CompleteResponse(
            request_id=acc.started.request_id,
            model=acc.started.model,
            provider=acc.started.provider,
            message=message,
            finish_reason=convert.FINISH_TO_PB[acc.finished.finish_reason],
            usage=convert.usage_to_proto(acc.finished.usage),
            cost=convert.cost_to_proto(acc.finished.cost),
        )

    async def StreamComplete(
        self, request: pb.StreamCompleteRequest, context: Context
    ) -> AsyncIterator[pb.StreamCompleteResponse]:
        msg = pb.StreamCompleteResponse
        try:
            # coalesced(): deltas that queue up while the caller is still reading the last
            # message go out as one; a caller that keeps up gets every delta on its own.
            async for out in coalesced(self._run(request, context, "StreamComplete")):
                if isinstance(out, TextDeltaEvent):
                    yield msg(text_delta=pb.TextDelta(text=out.text))
                elif isinstance(out, ToolCallDeltaEvent):
                    yield msg(
                        tool_call_delta=pb.ToolCallDelta(
                            index=out.index, id=out.id, name=out.name, arguments_delta=out.arguments_delta
                        )
                    )
                elif isinstance(out, Started):
                    yield msg(
                        start=pb.StreamStart(
                            request_id=out.request_id, model=out.model, provider=out.provider
                        )
                    )
                else:
                    yield msg(
                        end=pb.StreamEnd(
                            finish_reason=convert.FINISH_TO_PB[out.finish_reason],
                            usage=convert.usage_to_proto(out.usage),
                            cost=convert.cost_to_proto(out.cost),
                        )
                    )
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await self._abort(context, exc)

    # --- models and providers -------------------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        v: list[tuple[str, str]] = []
        caps = convert.requirements_from_proto(pb.Requirements(capabilities=request.capabilities), "", v)
        if request.provider and request.provider not in self.registry.by_name:
            v.append(("provider", f"no provider named {request.provider!r}"))
        if v:
            await self._abort(context, errors.InvalidRequest([(f.lstrip("."), d) for f, d in v]))
        specs = self.registry.list_models(request.provider, caps.capabilities)
        specs = [s for s in specs if auth.permitted(s.provider, s.name)]  # a caller sees only its models
        return pb.ListModelsResponse(models=[convert.model_to_proto(s) for s in specs])

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        try:
            if not request.model.strip():
                raise errors.InvalidRequest([("model", "required")])
            target = self.registry.resolve(request.model.strip())[0]
            auth.require_permitted(target.state.name, target.model, requested=request.model.strip())
        except errors.BrokerError as exc:
            await self._abort(context, exc)
        return pb.GetModelResponse(model=convert.model_to_proto(target.spec))

    async def ListProviders(
        self, request: pb.ListProvidersRequest, context: Context
    ) -> pb.ListProvidersResponse:
        out = pb.ListProvidersResponse()
        for s in self.registry.providers:
            info = out.providers.add(
                name=s.name,
                type=s.type,
                base_url=s.provider.base_url,
                priority=s.config.priority,
                last_error=s.last_error,
                model_count=len(s.served_models()),
            )
            if s.healthy is not None or s.breaker.is_open:
                serving = self.health.serving(s)
                info.health = pb.PROVIDER_HEALTH_SERVING if serving else pb.PROVIDER_HEALTH_NOT_SERVING
            info.breaker_state = _BREAKER_TO_PB[s.breaker.state]
            if s.last_check_wall is not None:
                info.last_check_time.FromNanoseconds(int(s.last_check_wall * 1e9))
        return out

    async def SelectModel(self, request: pb.SelectModelRequest, context: Context) -> pb.SelectModelResponse:
        """The model a completion with these requirements would use, the ranked rest, and why others did not qualify."""
        try:
            v: list[tuple[str, str]] = []
            req = convert.requirements_from_proto(request.requirements, "requirements", v)
            if v:
                raise errors.InvalidRequest(v)
            router = self.completions.router
            router.validate(req)
            selection = router.select(req, permitted=auth.permitted)
            ranked = selection.ranked
            if not ranked:
                raise selection.error()
        except errors.BrokerError as exc:
            await self._abort(context, exc)
        return pb.SelectModelResponse(
            selected=convert.model_to_proto(ranked[0].spec),
            alternatives=[convert.model_to_proto(t.spec) for t in ranked[1:]],
            excluded=[pb.ExcludedCandidate(model_id=e.model_id, reason=e.reason) for e in selection.excluded],
        )


class BrokerServer:
    """Owns the registry, health monitor and grpc.aio server; start() binds, stop() drains."""

    def __init__(
        self,
        settings: Settings,
        *,
        reuse_port: bool = False,
        metrics: BrokerMetrics | None = None,
        serve_metrics: bool = True,
    ) -> None:
        """`reuse_port`: share the port with sibling workers (SO_REUSEPORT); off by default so a
        second daemon on a taken port fails loudly. `serve_metrics` False: a supervising
        parent serves the workers' metrics instead (see broker/workers.py)."""
        self.settings = settings
        self.registry = Registry(settings)
        self.metrics = metrics or BrokerMetrics()
        self.serve_metrics = serve_metrics
        self.metrics_server: MetricsServer | None = None
        self.health = HealthMonitor(
            self.registry, settings.health, servicer=MeteredHealthServicer(self.metrics)
        )
        max_bytes = settings.server.max_message_bytes + 1024 * 1024  # room for the envelope
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            # Long token streams: let clients keep idle connections alive with pings.
            ("grpc.keepalive_time_ms", int(settings.server.keepalive_time_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(settings.server.keepalive_timeout_seconds * 1000)),
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                int(settings.server.min_ping_interval_seconds * 1000),
            ),
            ("grpc.keepalive_permit_without_calls", 1),
            *(
                [
                    ("grpc.max_connection_age_ms", int(settings.server.max_connection_age_seconds * 1000)),
                    (
                        "grpc.max_connection_age_grace_ms",
                        int(settings.server.max_connection_age_grace_seconds * 1000),
                    ),
                ]
                if settings.server.max_connection_age_seconds
                else []
            ),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
        # Caller auth and admission limits (broker/auth.py); health and reflection pass open.
        self.gate = auth.Gatekeeper(
            settings.auth, settings.server.max_concurrent_streams, on_refused=self.metrics.count_refused
        )
        self.server = grpc.aio.server(
            options=options,
            maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
            interceptors=[self.gate.interceptor],
        )
        self.servicer = ModelBrokerServicer(settings, self.registry, self.health, self.metrics)
        pb_grpc.add_ModelBrokerServicer_to_server(self.servicer, self.server)
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["ModelBroker"].full_name,
                "grpc.health.v1.Health",
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = 0

    async def start(self, listen: str | None = None) -> int:
        listen = listen or self.settings.server.listen
        host, port = parse_listen(listen)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tls = self.settings.tls
        try:
            if tls.enabled:
                bound: int = self.server.add_secure_port(address, server_credentials(tls))
            else:
                bound = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio 1.85 raises instead of returning 0
            raise OSError(f"cannot listen on {listen}: {exc}") from None
        if bound == 0:
            raise OSError(f"cannot listen on {listen}")
        self.port = bound
        if self.serve_metrics and self.settings.metrics.listen:
            self.metrics_server = MetricsServer(self.settings.metrics.listen, self.metrics.registry)
        await self.registry.start()
        await self.server.start()
        await self.health.start()
        log.info(
            "serving",
            listen=f"{host}:{bound}",
            pid=os.getpid(),
            providers=[s.name for s in self.registry.providers],
            ready=self.health.ready(),
            auth=f"{len(self.settings.auth.keys)} keys" if self.gate.enabled else "off",
            tls="mtls" if tls.client_ca_file else "tls" if tls.enabled else "off",
            metrics=f"{self.metrics_server.host}:{self.metrics_server.port}" if self.metrics_server else "",
        )
        return bound

    async def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING, new RPCs are refused, in-flight ones get `grace` seconds."""
        grace = self.settings.server.shutdown_grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        # Completions refused from here with SHUTTING_DOWN (a clean, retryable status), and
        # by grpc itself once stop() runs; the Watch streams have ended (health.py).
        self.servicer.draining = True
        await self.server.stop(grace)
        await self.health.close()
        await self.registry.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
            self.metrics_server = None
        log.info("stopped")

    async def serve_until_signal(self, listen: str | None = None) -> None:
        """Run until SIGTERM or SIGINT, then drain for the grace period and return."""
        await self.start(listen)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutdown_requested", grace_seconds=self.settings.server.shutdown_grace_seconds)
        await self.stop()
