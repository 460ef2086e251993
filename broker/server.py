"""The grpc.aio server: a thin servicer over the completion service, health, reflection, start/stop.

The servicer converts proto <-> neutral types and maps BrokerErrors to statuses through
`errors.to_grpc_status`; it holds no provider logic. Cancellation: when the caller goes
away or its deadline passes, grpc.aio raises CancelledError in the handler at its next
await; the provider stream is closed by `aclosing` on the way out (closing the upstream
HTTP request) and the CancelledError is re-raised.

Request ids: the auth gate (broker/auth.py) gives every ModelBroker RPC its id
before the servicer runs (the caller's valid `x-request-id`, else a fresh one) and puts it
in the trailers; `_abort` keeps it there for every error, streams included.

Start and stop (`serve_until_signal`): the SIGTERM/SIGINT handlers are installed before the
port is bound, so a signal at any moment (start-up included) turns health NOT_SERVING,
drains and returns; start-up waits for discovery at most `health.timeout_seconds`, then lets
it finish in the background. `stop` gives in-flight completions the grace period, then ends
those still running with UNAVAILABLE / SHUTTING_DOWN (not a bare cancellation). SIGHUP,
and the config file changing, reload the config without a restart (broker/reload.py, which
`BrokerServer.apply` serves); tracing (broker/tracing.py) starts with the server and
flushes at its stop.
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

from broker import auth, convert, errors, guard, tracing
from broker.breaker import BreakerState
from broker.coalesce import coalesced
from broker.completion import Accumulated, CompletionService
from broker.config import Settings, parse_listen
from broker.embedding import EmbeddingService
from broker.health import HealthMonitor
from broker.metrics import BrokerMetrics, MeteredHealthServicer, MetricsServer
from broker.redact import redact
from broker.registry import Registry
from broker.reload import Reloader
from broker.scope import RequestScope, Scopes
from broker.state import StateStore, open_state
from broker.state.local_state import LocalState
from broker.state.usage import UsageService, priced, pricer
from broker.tls import server_credentials
from broker.types import Finished, FinishReason, Output
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


class ModelBrokerServicer(pb_grpc.ModelBrokerServicer):
    """Thin: each RPC is convert -> service -> convert. Request bookkeeping (id, drain,
    in-flight, timing, log line, metrics, token charging) is the scope's (broker/scope.py);
    every exception becomes a status in one place, `_abort`, which broker/guard.py calls."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        health: HealthMonitor,
        metrics: BrokerMetrics | None = None,
        state: StateStore | None = None,
    ) -> None:
        self.health = health
        self.metrics = metrics or BrokerMetrics(process=False)
        self.scopes = Scopes(self.metrics, settings.server.shutdown_grace_seconds)
        self.state = state or LocalState()
        self.use(settings, registry)

    def use(self, settings: Settings, registry: Registry) -> None:
        """Build what RPCs use from the config and registry: at start, and for each config
        reload (broker/reload.py). No await in here, so on the event loop an RPC sees all of
        the old or all of the new; calls already running keep the services they started on."""
        old: CompletionService | None = getattr(self, "completions", None)
        self.settings = settings
        self.registry = registry
        # A breaker that opens or closes re-publishes that provider's health at once.
        self.completions = CompletionService(registry, on_breaker_change=self.health.publish)
        if old is not None:
            self.completions.router.latency = old.router.latency  # observed TTFTs carry over
        self.embeddings = EmbeddingService(self.completions)
        # Requests that end without usage are charged an estimate at the model's price.
        self.scopes.pricer = pricer(registry)
        # GetUsage: each key's spend and counters, from the store the gate admits with.
        self.usage = UsageService(settings.auth, self.state)

    @property
    def in_flight(self) -> int:
        return self.scopes.in_flight

    async def _abort(self, context: Context, exc: BaseException) -> None:
        """The one mapping of an RPC's exception to its status (with the request id); raises."""
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

    # --- completions -----------------------------------------------------------------------------

    def _outputs(
        self, request: pb.CompleteRequest | pb.StreamCompleteRequest, scope: RequestScope
    ) -> AsyncIterator[Output]:
        call = convert.completion_from_proto(
            request, max_message_bytes=self.settings.server.max_message_bytes
        )
        # Unary buffers: a failure part-way may still retry, as nothing reached the caller.
        outputs = self.completions.stream(
            call,
            scope.request_id,
            deadline=scope.deadline,
            record=scope.record,
            buffered=scope.kind == "Complete",
            permissions=auth.permissions(),  # the gate's, judged once in candidates()
        )
        scope.call = call  # an end without usage is charged an estimate from it
        return scope.relay(outputs)

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        acc = Accumulated()
        with self.scopes.open("Complete", context, request.model) as scope:
            async for out in self._outputs(request, scope):
                acc.add(out)
        return convert.complete_response(acc)

    async def StreamComplete(
        self, request: pb.StreamCompleteRequest, context: Context
    ) -> AsyncIterator[pb.StreamCompleteResponse]:
        deltas = 0  # content messages sent
        try:
            with self.scopes.open("StreamComplete", context, request.model) as scope:
                # coalesced(): deltas that queue up while the caller is still reading the last
                # message go out as one; a caller that keeps up gets every delta on its own.
                async for out in coalesced(self._outputs(request, scope)):
                    message = convert.stream_message(out)
                    if message.WhichOneof("event") in ("text_delta", "tool_call_delta"):
                        deltas += 1
                    yield message
                if scope.finished is None and self.scopes.cutting:
                    # A cut can end the relay early without an error (its reader cancelled
                    # between two reads): the caller still learns why.
                    raise self.scopes.cut_error()
        except errors.ShuttingDown as exc:
            if deltas:
                exc.metadata.update(interrupted="true", delivered_chunks=str(deltas))
            raise

    # --- embeddings -------------------------------------------------------------------------------

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        max_bytes = self.settings.server.max_message_bytes
        with self.scopes.open("Embed", context, request.model) as scope:
            call = convert.embed_from_proto(request, max_message_bytes=max_bytes)
            out = await self.embeddings.embed(
                call, scope.request_id, record=scope.record, permissions=auth.permissions()
            )
            # The scope's log line, metrics and token charging read the usage from here.
            scope.finished = Finished(FinishReason.STOP, out.usage, out.cost)
            return convert.embed_response(out, max_bytes=max_bytes)

    # --- models and providers -------------------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        query = convert.list_models_query(request, self.registry.by_name)
        specs = [s for s in self.registry.list_models(query.provider, query.capabilities) if query.admits(s)]
        specs = [s for s in specs if auth.permitted(s.provider, s.name)]  # a caller sees only its models
        return convert.list_models_page(specs, query)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        ref = convert.model_ref_from_proto(request.model)
        target = self.registry.resolve(ref)[0]
        auth.require_permitted(target.state.name, target.model, requested=ref)
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
        return convert.select_model_response(
            ranked[0].spec, [t.spec for t in ranked[1:]], [(e.model_id, e.reason) for e in selection.excluded]
        )

    # --- usage ---------------------------------------------------------------------------------------

    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        names = convert.usage_query(request)
        report = await self.usage.report(auth.caller_name() or None, names)
        return convert.usage_response(report)


class BrokerServer:
    """Owns the registry, health monitor and grpc.aio server; start() binds, stop() drains."""

    def __init__(
        self,
        settings: Settings,
        *,
        reuse_port: bool = False,
        metrics: BrokerMetrics | None = None,
        serve_metrics: bool = True,
        config_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """`reuse_port`: share the port with sibling workers (SO_REUSEPORT); off by default so a
        second daemon on a taken port fails loudly. `serve_metrics` False: a supervising
        parent serves the workers' metrics instead (see broker/workers.py). `config_path`:
        the file `settings` came from, watched and re-read on SIGHUP (broker/reload.py)."""
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
            # Not set: grpc.server.max_pending_requests(_hard_limit). Under a burst of 10,000
            # streams from another process grpc.aio still CANCELs part of it before any handler
            # runs, with or without them (the bare null server too: 2,723 of 10,000 in the
            # bench's held-stream row); they help only a client in the server's own process.
        ]
        # Caller limits, budgets and usage: Redis with state.redis_url, else this process
        # (broker/state/); readiness follows its policy when Redis is unavailable.
        self.state = open_state(settings, self.metrics)
        self.health.state_ready = self.state.ready
        self.state.on_change = self.health.update_readiness
        # Caller auth and admission limits (broker/auth.py); health and reflection pass open.
        self.gate = auth.Gatekeeper(
            settings.auth,
            settings.server.max_concurrent_streams,
            on_refused=self.metrics.count_refused,
            state=self.state,
            priced=priced(self.registry) if settings.state.unpriced == "deny" else None,
        )
        # OpenTelemetry (broker/tracing.py): None unless enabled; then a span per RPC and attempt.
        self.tracing = tracing.setup(settings.tracing)
        self.gate.tracing = self.tracing
        self.server = grpc.aio.server(
            options=options,
            maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
        )
        self.servicer = ModelBrokerServicer(
            settings, self.registry, self.health, self.metrics, state=self.state
        )
        # Deserializers that never raise and a catch-all around every handler (broker/guard.py),
        # each handler starting with the gate (auth, request id, admission).
        guard.add_servicer(
            self.server, self.servicer, self.gate, abort=self.servicer._abort, max_response_bytes=max_bytes
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
        self.reloader = Reloader(self, config_path)

    def apply(self, settings: Settings, registry: Registry) -> None:
        """Make a reloaded config and its registry the ones every RPC from now on uses
        (broker/reload.py prepares both). No await in here: on the event loop an RPC sees all
        of the old or all of the new, and calls already running finish on what they started
        with. The sections that need a restart (server, tls, metrics, state, tracing) are the
        running ones: the reloader keeps them."""
        self.servicer.use(settings, registry)
        # As at start: keys with a budget may use only priced models under unpriced: deny.
        self.gate.reconfigure(
            settings.auth, priced=priced(registry) if settings.state.unpriced == "deny" else None
        )
        self.health.registry, self.health.config = registry, settings.health
        self.settings, self.registry = settings, registry

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
        await self.state.start()  # bounded; an unreachable Redis is handled by its policy
        await self.server.start()
        await self.health.start()  # the first round of checks, bounded by the same timeout
        self.reloader.start()  # watch the config file (SIGHUP: serve_until_signal)
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
            state="redis" if self.state.shared else "process",
            # The loop actually running (server.event_loop picks it; cli.run_loop starts it).
            event_loop="uvloop"
            if type(asyncio.get_running_loop()).__module__.startswith("uvloop")
            else "asyncio",
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
        self.servicer.scopes.draining = True
        self.servicer.scopes.grace_seconds = grace
        # grpc refuses new RPCs at once; its own cut (a bare status) comes only after ours.
        stopping = asyncio.create_task(self.server.stop(grace + CUT_SECONDS))
        try:
            if not await self.servicer.scopes.wait_idle(grace):
                cut = self.servicer.scopes.cut()
                log.warning("drain_cut", in_flight=cut, grace_seconds=grace, reason="SHUTTING_DOWN")
        finally:
            await stopping
        await self.reloader.close()  # providers a reload retired, still draining: closed now
        await self.health.close()
        await self.state.close()  # charges still on their way, bounded
        await self.registry.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
            self.metrics_server = None
        if self.tracing is not None:
            # The spans still queued go out (bounded by the exporter's timeout), off the loop.
            await asyncio.to_thread(self.tracing.shutdown)
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
        loop.add_signal_handler(signal.SIGHUP, self.reloader.on_sighup)
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
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
