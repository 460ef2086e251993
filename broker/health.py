"""Provider health -> grpc.health.v1 statuses.

| service name                   | meaning                                             |
| ""                             | the process is up and not shutting down (liveness)  |
| "modelbroker.v1.ModelBroker"   | can serve: per `health.readiness` (any/all healthy) |
| "provider/<name>"              | that provider's health                              |

Each provider gets a cheap active check (listing models or a version endpoint, never a
paid completion) every `health.interval_seconds`; a failure flips it to NOT_SERVING at
once, so a provider that goes away is seen within one interval plus the check timeout.
A provider is SERVING only while its check passes and its circuit breaker (passive health
from real requests, broker/breaker.py) is not open; readiness follows the same view, and
the shared state's policy too (`state_ready`: Redis unavailable under
state.on_unavailable: fail_closed is NOT_SERVING; broker/state/redis_state.py).

On shutdown every name turns NOT_SERVING and every open Watch stream is sent its final
status (NOT_SERVING, or SERVICE_UNKNOWN for a name it does not know; sent again even when
unchanged, so a watcher always sees the stream's end coming), then ends with status OK and
the trailer `x-health-ended: server shutting down`. A `Check` of an unknown name is NOT_FOUND
naming the known ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2

from broker import errors
from broker.config import HealthConfig
from broker.registry import ProviderState, Registry

log = structlog.get_logger("broker.health")

SERVICE_NAME = "modelbroker.v1.ModelBroker"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_LIST = 100  # grpc.health.v1 List: at most 100 entries, else RESOURCE_EXHAUSTED
SHUTTING_DOWN = "server shutting down"
ENDED_TRAILER = "x-health-ended"  # why a Watch ended, in its trailing metadata
# NOT_FOUND names at most this many known services, and echoes at most this much of the asked one.
MAX_NAMED, MAX_ECHO = 20, 120


def provider_service(name: str) -> str:
    return f"provider/{name}"


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """The library's aio servicer plus `List`, which grpcio-health-checking 1.85 leaves UNIMPLEMENTED."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        statuses = dict(self._server_status)
        if len(statuses) > MAX_LIST:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"more than {MAX_LIST} services")
        resp = health_pb2.HealthListResponse()
        for name, status in statuses.items():
            resp.statuses[name].status = status
        return resp

    def status(self, service: str) -> int | None:
        return self._server_status.get(service)  # type: ignore[no-any-return]

    def unknown_service(self, service: str) -> str:
        """NOT_FOUND's message: the name asked for (bounded) and the names that exist."""
        known = sorted(self._server_status)
        shown = ", ".join(repr(n) if n == "" else n for n in known[:MAX_NAMED])
        more = f" and {len(known) - MAX_NAMED} more" if len(known) > MAX_NAMED else ""
        asked = service if len(service) <= MAX_ECHO else service[:MAX_ECHO] + "..."
        return f"unknown health service {asked!r}; known: {shown}{more} ('' is liveness)"

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        """The library's Check, except that NOT_FOUND says which names there are."""
        status = self._server_status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, self.unknown_service(request.service))
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """The library's Watch, except that at shutdown it sends the final status (even one
        it sent already) and ends with OK, trailer `x-health-ended: server shutting down`.

        A Watch never ends by itself, so during a drain every open one would hold
        server.stop() for the whole grace period; the health spec has watchers reconnect
        (elsewhere) after any ending but UNIMPLEMENTED. Without the repeated status, a
        watcher of a name that was NOT_SERVING already would see only a bare end of stream.
        """
        service = request.service
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last or self._gracefully_shutting_down:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    if self._gracefully_shutting_down:
                        # grpc.aio drops the details of an OK status: the reason goes in a trailer.
                        context.set_trailing_metadata(((ENDED_TRAILER, SHUTTING_DOWN),))
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        # Wake watchers of names that have no status too, so every Watch sees the shutdown.
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()


class HealthMonitor:
    def __init__(
        self, registry: Registry, config: HealthConfig, servicer: HealthServicer | None = None
    ) -> None:
        self.registry = registry
        self.config = config
        self.servicer = servicer or HealthServicer()
        self._task: asyncio.Task[None] | None = None
        self._shutting_down = False
        # False while the caller state cannot admit (set by the server from its state store).
        self.state_ready: Callable[[], bool] | None = None

    async def start(self) -> None:
        """Register every name as NOT_SERVING, run the first round of checks, then keep checking."""
        await self.servicer.set(SERVICE_NAME, NOT_SERVING)
        for s in self.registry.providers:
            await self.servicer.set(provider_service(s.name), NOT_SERVING)
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="health-checks")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def enter_graceful_shutdown(self) -> None:
        """Every name turns NOT_SERVING (liveness too) so probes and balancers stop sending work."""
        self._shutting_down = True
        await self.servicer.enter_graceful_shutdown()
        log.info("health_shutdown", status="NOT_SERVING")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_seconds)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(s) for s in self.registry.providers))
        await self._update_readiness()

    async def _check(self, s: ProviderState) -> None:
        try:
            await asyncio.wait_for(s.provider.health_check(), self.config.timeout_seconds)
        except errors.BrokerError as exc:
            await self.record(s, False, exc.message)
        except TimeoutError:
            await self.record(s, False, f"health check timed out after {self.config.timeout_seconds:g}s")
        except Exception as exc:  # a provider bug must not stop health checking
            await self.record(s, False, f"health check failed: {type(exc).__name__}: {exc}")
        else:
            await self.record(s, True, "")

    async def record(self, s: ProviderState, healthy: bool, error: str) -> None:
        changed = s.healthy is not healthy
        s.healthy = healthy
        s.last_check_wall = time.time()
        if error:
            s.last_error = error  # redacted, then bounded (ProviderState.last_error)
        elif self.serving(s):
            s.mark_recovered()  # check passing, breaker not open: the last error is history
        if changed:
            log.info(
                "provider_health", provider=s.name, serving=healthy, error=s.last_error if not healthy else ""
            )
        await self.servicer.set(provider_service(s.name), SERVING if self.serving(s) else NOT_SERVING)

    @staticmethod
    def serving(s: ProviderState) -> bool:
        """Active check passing and circuit breaker not open (half-open serves: its trial needs traffic)."""
        return s.healthy is True and not s.breaker.is_open

    async def publish(self, s: ProviderState) -> None:
        """Re-publish one provider and readiness now (its breaker opened or closed)."""
        if self.serving(s):
            s.mark_recovered()
        await self.servicer.set(provider_service(s.name), SERVING if self.serving(s) else NOT_SERVING)
        await self._update_readiness()

    async def update_readiness(self) -> None:
        """Re-publish readiness now (the state store's availability changed)."""
        await self._update_readiness()

    def ready(self) -> bool:
        if self.state_ready is not None and not self.state_ready():
            return False
        states = [self.serving(s) for s in self.registry.providers]
        if not states:
            return False
        return all(states) if self.config.readiness == "all" else any(states)

    async def _update_readiness(self) -> None:
        if self._shutting_down:
            return
        want = SERVING if self.ready() else NOT_SERVING
        if self.servicer.status(SERVICE_NAME) != want:
            log.info("readiness", service=SERVICE_NAME, serving=want == SERVING)
        await self.servicer.set(SERVICE_NAME, want)
