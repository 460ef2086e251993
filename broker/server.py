"""The grpc.aio server: a thin servicer over the completion service, health, reflection, start/stop.

The servicer converts proto <-> neutral types and maps BrokerErrors to statuses through
`errors.to_grpc_status`; it holds no provider logic. Cancellation: when the caller goes
away or its deadline passes, grpc.aio raises CancelledError in the handler at its next
await; the provider stream is closed by `aclosing` on the way out (closing the upstream
HTTP request) and the CancelledError is re-raised.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
import structlog
from grpc_reflection.v1alpha import reflection
from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc

from broker import convert, errors
from broker.completion import Accumulated, CallRecord, CompletionService, Finished, Output, Started
from broker.config import Settings, parse_listen
from broker.health import HealthMonitor
from broker.registry import Registry
from broker.types import TextDeltaEvent, ToolCallDeltaEvent

log = structlog.get_logger("broker.server")

# grpc ships no type hints (grpc-stubs lags grpc.aio), so the context is untyped here.
Context: TypeAlias = Any
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_for(context: Context) -> str:
    """The caller's x-request-id when it is sane, else a fresh one; echoed in initial metadata."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


def _status_name(exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    if isinstance(exc, errors.BrokerError):
        return str(exc.code.name)
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


class ModelBrokerServicer(pb_grpc.ModelBrokerServicer):
    def __init__(self, settings: Settings, registry: Registry, health: HealthMonitor) -> None:
        self.settings = settings
        self.registry = registry
        self.health = health
        self.completions = CompletionService(registry)

    # --- completions -----------------------------------------------------------------------------

    async def _run(
        self, request: pb.CompleteRequest | pb.StreamCompleteRequest, context: Context, kind: str
    ) -> AsyncIterator[Output]:
        """The shared body of both completion RPCs: validate, stream, log one line."""
        t0 = time.monotonic()
        request_id = request_id_for(context)
        await context.send_initial_metadata((("x-request-id", request_id),))
        remaining = context.time_remaining()
        deadline = None if remaining is None else t0 + remaining
        record = CallRecord()
        finished: Finished | None = None
        failure: BaseException | None = None
        try:
            call = convert.completion_from_proto(
                request, max_message_bytes=self.settings.server.max_message_bytes
            )
            async for out in self.completions.stream(call, request_id, deadline=deadline, record=record):
                if isinstance(out, Finished):
                    finished = out
                yield out
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._log_request(kind, request_id, request.model, record, finished, failure, t0)

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

    async def _abort(self, context: Context, exc: BaseException) -> None:
        if isinstance(exc, errors.BrokerError):
            await context.abort_with_status(errors.to_grpc_status(exc))
        log.exception("internal_error", error=repr(exc))
        await context.abort_with_status(errors.internal_status("internal error in the broker; see its logs"))

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
            async for out in self._run(request, context, "StreamComplete"):
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
        return pb.ListModelsResponse(models=[convert.model_to_proto(s) for s in specs])

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        try:
            if not request.model.strip():
                raise errors.InvalidRequest([("model", "required")])
            target = self.registry.resolve(request.model.strip())[0]
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
            if s.healthy is not None:
                info.health = pb.PROVIDER_HEALTH_SERVING if s.healthy else pb.PROVIDER_HEALTH_NOT_SERVING
            if s.last_check_wall is not None:
                info.last_check_time.FromNanoseconds(int(s.last_check_wall * 1e9))
        return out

    async def SelectModel(self, request: pb.SelectModelRequest, context: Context) -> pb.SelectModelResponse:
        await self._abort(context, errors.NotImplementedYet("SelectModel is not available yet"))
        raise AssertionError("unreachable")


class BrokerServer:
    """Owns the registry, health monitor and grpc.aio server; start() binds, stop() drains."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings)
        self.health = HealthMonitor(self.registry, settings.health)
        max_bytes = settings.server.max_message_bytes + 1024 * 1024  # room for the envelope
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            # Long token streams: let clients keep idle connections alive with pings.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(
            options=options, maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs
        )
        self.servicer = ModelBrokerServicer(settings, self.registry, self.health)
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
        bound: int = self.server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot listen on {listen}")
        self.port = bound
        await self.registry.start()
        await self.server.start()
        await self.health.start()
        log.info(
            "serving",
            listen=f"{host}:{bound}",
            pid=os.getpid(),
            providers=[s.name for s in self.registry.providers],
            ready=self.health.ready(),
        )
        return bound

    async def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING, new RPCs are refused, in-flight ones get `grace` seconds."""
        grace = self.settings.server.shutdown_grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.health.close()
        await self.registry.close()
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
