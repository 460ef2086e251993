"""The grpc.aio server: a thin servicer over the completion service, health, reflection, start/stop.

The servicer converts proto <-> neutral types and maps BrokerErrors to statuses through
`errors.to_grpc_status`; it holds no provider logic. Cancellation: when the caller goes
away or its deadline passes, grpc.aio raises CancelledError in the handler at its next
await; the provider stream is closed by `aclosing` on the way out (closing the upstream
HTTP request) and the CancelledError is re-raised.

Request ids: the auth interceptor (broker/auth.py) gives every ModelBroker RPC its id
before the handler runs (the caller's valid `x-request-id`, else a fresh one) and puts it
in the trailers; `_abort` keeps it there for every error, streams included.

Start and stop (`serve_until_signal`): the SIGTERM/SIGINT handlers are installed before the
port is bound, so a signal at any moment (start-up included) turns health NOT_SERVING,
drains and returns; start-up waits for discovery at most `health.timeout_seconds`, then lets
it finish in the background. `stop` gives in-flight completions the grace period, then ends
those still running with UNAVAILABLE / SHUTTING_DOWN (not a bare cancellation).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeAlias

import grpc
import structlog
from grpc_reflection.v1alpha import reflection

from broker import auth, convert, errors, guard
from broker.breaker import BreakerState
from broker.coalesce import coalesced
from broker.completion import Accumulated, CallRecord, CompletionService, Finished, Output, Started
from broker.config import Settings, parse_listen
from broker.health import HealthMonitor
from broker.metrics import BrokerMetrics, MeteredHealthServicer, MetricsServer
from broker.redact import redact
from broker.registry import Registry
from broker.tls import server_credentials
from broker.types import TextDeltaEvent, ToolCallDeltaEvent
from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc

log = structlog.get_logger("broker.server")

# grpc ships no type hints (grpc-stubs lags grpc.aio), so the context is untyped here.
Context: TypeAlias = Any
_BREAKER_TO_PB = {
    BreakerState.CLOSED: pb.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: pb.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: pb.BREAKER_STATE_HALF_OPEN,
}
# After the grace period, completions still running are ended with SHUTTING_DOWN; grpc's own
# stop (which would cut them with a bare status) waits this much longer for those statuses.
CUT_SECONDS = 1.0


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
        # Set when the grace period ended with completions still running: each is cancelled
        # (`_runs`) and ends with UNAVAILABLE / SHUTTING_DOWN instead of a bare cancellation.
        self.cutting = False
        self.grace_seconds = settings.server.shutdown_grace_seconds
        self._runs: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self.metrics = metrics or BrokerMetrics(process=False)

    # --- completions -----------------------------------------------------------------------------

    async def _run(
        self, request: pb.CompleteRequest | pb.StreamCompleteRequest, context: Context, kind: str
    ) -> AsyncIterator[Output]:
        """The shared body of both completion RPCs: validate, stream, log one line."""
        t0 = time.monotonic()
        # Set by the interceptor (trailers included); the body has it too (StreamStart /
        # CompleteResponse.request_id). A servicer mounted without the interceptor makes its own.
        request_id = auth.current_request_id.get()
        if not request_id:
            request_id = auth.request_id_for(context.invocation_metadata())
            auth.current_request_id.set(request_id)
            context.set_trailing_metadata(((auth.REQUEST_ID_HEADER, request_id),))
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
        # The task running this body (the handler's, or coalesced()'s reader for streams):
        # what `cut` cancels when the grace period ends.
        task = asyncio.current_task()
        if task is not None:
            self._runs.add(task)
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
        except asyncio.CancelledError as exc:
            if not self.cutting:
                failure = exc
                raise
            # Ours, at the end of the grace period: the upstream is closed by now (the
            # cancellation ran through the provider); the caller gets a status that says why.
            if task is not None:
                task.uncancel()
            failure = self._cut_error()
            raise failure from None
        except BaseException as exc:
            # GeneratorExit while cutting: coalesced()'s reader was cancelled between two reads.
            failure = self._cut_error() if self.cutting and isinstance(exc, GeneratorExit) else exc
            raise
        finally:
            end = time.monotonic()
            if waiting_since is not None and upstream_wait is not None:
                upstream_wait += end - waiting_since
            if inflight is not None:
                inflight.dec()
            self.in_flight -= 1
            if task is not None:
                self._runs.discard(task)
            if self.in_flight == 0:
                self._idle.set()
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
            if finished.usage.estimated:
                fields["usage_estimated"] = True
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

    # --- drain --------------------------------------------------------------------------------

    def _cut_error(self) -> errors.ShuttingDown:
        return errors.ShuttingDown(
            f"the broker shut down before this call finished (its {self.grace_seconds:g}s drain "
            "grace period ended): send it again, another replica takes it"
        )

    async def wait_idle(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for the running completions to end; True if none is left."""
        if self.in_flight == 0:
            return True
        self._idle.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self.in_flight == 0

    def cut(self) -> int:
        """End every completion still running with UNAVAILABLE / SHUTTING_DOWN; how many there were."""
        self.cutting = True
        runs = list(self._runs)
        for t in runs:
            t.cancel()
        return len(runs)

    async def _abort(self, context: Context, exc: BaseException) -> None:
        if isinstance(exc, errors.BrokerError):
            await context.abort_with_status(auth.with_request_id(auth.status_for(exc)))
        log.exception("internal_error", error=repr(exc))
        await context.abort_with_status(
            auth.with_request_id(
                errors.internal_status(
                    "internal error in the broker; see its logs", request_id=auth.current_request_id.get()
                )
            )
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
        deltas = 0  # content messages sent
        ended = False
        try:
            # coalesced(): deltas that queue up while the caller is still reading the last
            # message go out as one; a caller that keeps up gets every delta on its own.
            async for out in coalesced(self._run(request, context, "StreamComplete")):
                if isinstance(out, TextDeltaEvent):
                    deltas += 1
                    yield msg(text_delta=pb.TextDelta(text=out.text))
                elif isinstance(out, ToolCallDeltaEvent):
                    deltas += 1
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
                    ended = True
                    yield msg(
                        end=pb.StreamEnd(
                            finish_reason=convert.FINISH_TO_PB[out.finish_reason],
                            usage=convert.usage_to_proto(out.usage),
                            cost=convert.cost_to_proto(out.cost),
                        )
                    )
                if self.cutting and not ended:
                    raise self._cut_error()
            if self.cutting and not ended:
                # A cut can end the relay early without an error (its reader cancelled
                # between two reads): the caller still learns why.
                raise self._cut_error()
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            if isinstance(exc, errors.ShuttingDown) and deltas:
                exc.metadata.update(interrupted="true", delivered_chunks=str(deltas))
            await self._abort(context, exc)

    # --- models and providers -------------------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        try:
            query = convert.list_models_query(request, self.registry.by_name)
        except errors.BrokerError as exc:
            await self._abort(context, exc)
        specs = self.registry.list_models(query.provider, query.capabilities)
        specs = [s for s in specs if auth.permitted(s.provider, s.name)]  # a caller sees only its models
        return convert.list_models_page(specs, query)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        try:
            ref = convert.model_ref_from_proto(request.model)
            target = self.registry.resolve(ref)[0]
            auth.require_permitted(target.state.name, target.model, requested=ref)
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
                base_url=redact(s.provider.base_url),  # userinfo credentials, if any
                priority=s.config.priority,
                last_error=s.last_error,  # redacted and bounded when it was set
                last_error_resolved=s.last_error_resolved,
                model_count=len(s.served_models()),
            )
            if s.last_error_wall is not None:
                info.last_error_time.FromNanoseconds(int(s.last_error_wall * 1e9))
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
        return convert.select_model_response(
            ranked[0].spec, [t.spec for t in ranked[1:]], [(e.model_id, e.reason) for e in selection.excluded]
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
        # Deserializers that never raise and a catch-all around every handler (broker/guard.py).
        guard.add_servicer(
            self.server, self.servicer, abort=self.servicer._abort, max_response_bytes=max_bytes
        )
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
        """Bind, start the providers and discovery, serve, run the first health checks.

        Discovery runs in the background: start-up waits for it at most
        `health.timeout_seconds` (a listing that hangs is bounded on its own, at 5x that),
        so a hanging upstream cannot hold the daemon from serving for long.
        """
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
        t0 = time.monotonic()
        wait = self.settings.health.timeout_seconds
        await self.registry.start(discovery_wait=0)  # transports open, discovery under way
        await self.server.start()
        await self.health.start()  # the first round of checks, bounded by the same timeout
        settled = await self.registry.first_discovery(max(wait - (time.monotonic() - t0), 0))
        pending = sorted(self.registry.discovering) if not settled else []
        if pending:
            log.warning("discovery_pending", providers=pending, waited_seconds=wait)
        log.info(
            "serving",
            listen=f"{host}:{bound}",
            pid=os.getpid(),
            providers=[s.name for s in self.registry.providers],
            ready=self.health.ready(),
            auth=f"{len(self.settings.auth.keys)} keys" if self.gate.enabled else "off",
            tls="mtls" if tls.client_ca_file else "tls" if tls.enabled else "off",
            metrics=f"{self.metrics_server.host}:{self.metrics_server.port}" if self.metrics_server else "",
            **({"discovery_pending": pending} if pending else {}),
        )
        return bound

    async def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING and new RPCs are refused; in-flight completions get `grace`
        seconds, then those still running end with UNAVAILABLE / SHUTTING_DOWN."""
        grace = self.settings.server.shutdown_grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        # Completions refused from here with SHUTTING_DOWN (a clean, retryable status), and
        # by grpc itself once stop() runs; the Watch streams have ended (health.py).
        self.servicer.draining = True
        self.servicer.grace_seconds = grace
        # grpc refuses new RPCs at once; its own cut (a bare status) comes only after ours.
        stopping = asyncio.create_task(self.server.stop(grace + CUT_SECONDS))
        try:
            if not await self.servicer.wait_idle(grace):
                cut = self.servicer.cut()
                log.warning("drain_cut", in_flight=cut, grace_seconds=grace, reason="SHUTTING_DOWN")
        finally:
            await stopping
        await self.health.close()
        await self.registry.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
            self.metrics_server = None
        log.info("stopped")

    async def serve_until_signal(self, listen: str | None = None, *, signalled: Sequence[int] = ()) -> None:
        """Run until SIGTERM or SIGINT, then drain for the grace period and return.

        The handlers go in before anything binds, so a signal during start-up (discovery or
        the first health checks hanging, say) stops the start and drains like any other:
        NOT_SERVING, then stop. `signalled`: signals that arrived before the loop ran (the
        CLI catches them from its first line), handled the same way.
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        received: list[int] = list(signalled)

        def on_signal(sig: int) -> None:
            received.append(sig)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        if received:
            stop.set()  # signalled before the loop ran: do not even bind
        starting = asyncio.create_task(self.start(listen), name="broker-start")
        stopped = asyncio.create_task(stop.wait(), name="broker-signal")
        try:
            if not stop.is_set():
                await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a start that failed (port taken, bad TLS file) raises here
                await stopped
                during = "serving"
            else:
                # A task cancelled before its first step never runs: nothing was bound then.
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                during = "start-up"
            log.info(
                "shutdown_requested",
                grace_seconds=self.settings.server.shutdown_grace_seconds,
                signal=signal.Signals(received[0]).name if received else "",
                during=during,
            )
            await self.stop()
        finally:
            stopped.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
