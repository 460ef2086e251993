"""Prometheus metrics: per-request counters and histograms, in-flight streams, health, overhead.

Served on `metrics.listen` / `serve --metrics-listen HOST:PORT` at any path (use /metrics).

Cost on the hot path: one dict lookup for all of a request's children (`_series`, keyed by
its rpc, model, provider and status: `.labels()` is a lock and a few Python calls per use)
plus a handful of inc/observe calls per request, once at its end; nothing per chunk. Label
values come from the resolved target, never from raw request text, and distinct models are
capped (`MAX_MODELS`, then "_other") so a caller naming random models cannot grow the series
without bound (nor the lookup table, emptied at `MAX_SERIES`).

With `serve --workers N` each worker writes its samples to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, picked when that variable
is set before the worker starts) and the supervising parent serves the sum over workers
(`multiprocess_registry`); gauges use live* modes so an exited worker's in-flight count and
health drop out once the parent marks it dead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from grpc_health.v1 import health_pb2
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from broker.config import parse_listen
from broker.health import SERVICE_NAME, HealthServicer

# `_created` series double the output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

MAX_MODELS = 256
OTHER = "_other"
# Entries of the (rpc, model, provider, status) -> children table before it is emptied (the
# children themselves stay registered: this only bounds the table of shortcuts to them).
MAX_SERIES = 4096
RPCS = ("Complete", "StreamComplete", "Embed")
SERVING = health_pb2.HealthCheckResponse.SERVING

# Completions run from tens of milliseconds (a cached local model) to minutes (long outputs).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
# The broker's own time per request: sub-millisecond is the goal, so the buckets start low.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


@dataclass(slots=True)
class _Children:
    """The labelled children for one (model, provider), looked up once and reused."""

    duration: Any
    ttft: Any
    tokens_in: Any
    tokens_out: Any
    cost: Any


@dataclass(slots=True)
class _Series:
    """Everything one finished request of (rpc, model, provider, status) touches."""

    requests: Any  # modelbroker_requests{rpc, model, provider, status}
    duration: Any  # modelbroker_request_duration_seconds{model, provider}
    children: _Children | None  # None: no provider (refused before one was chosen)
    overhead: Any  # modelbroker_overhead_seconds{rpc}, None for an rpc without it


class BrokerMetrics:
    """Every metric the daemon exports, on its own registry (tests run several daemons per process)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)  # cpu/memory/fds of this process (not in multiprocess mode)
        self.requests = Counter(
            "modelbroker_requests",
            "Completion RPCs by resolved model, provider and final gRPC status",
            ["rpc", "model", "provider", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "modelbroker_request_duration_seconds",
            "Completion RPC latency, from the request to the last message",
            ["model", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "modelbroker_time_to_first_token_seconds",
            "From the request to the first content from the provider",
            ["model", "provider"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "modelbroker_tokens",
            "Tokens reported by providers, by direction (input, output)",
            ["model", "provider", "direction"],
            registry=r,
        )
        self.cost = Counter(
            "modelbroker_cost_micro_usd",
            "Cost of completions in micro-USD (only where prices are known)",
            ["model", "provider"],
            registry=r,
        )
        self.overhead = Histogram(
            "modelbroker_overhead_seconds",
            "The broker's own time per completion: duration minus time waiting on the provider",
            ["rpc"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        inflight = Gauge(
            "modelbroker_inflight_streams",
            "Completion RPCs in progress",
            ["rpc"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.provider_healthy = Gauge(
            "modelbroker_provider_healthy",
            "1 when the provider's health checks pass (min over workers)",
            ["provider"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.ready = Gauge(
            "modelbroker_ready",
            f"1 when {SERVICE_NAME} is SERVING (readiness; min over workers)",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.refused = Counter(
            "modelbroker_refused_requests",
            "RPCs refused before the servicer ran (caller auth, caller limits, broker overload)",
            ["rpc", "status", "reason"],
            registry=r,
        )
        # Caller names come from auth.keys, so this label set is bounded by the config.
        self.spend = Counter(
            "modelbroker_caller_spend_micro_usd",
            "Cost of each key's completions in micro-USD, charged when each ends (known prices only)",
            ["caller"],
            registry=r,
        )
        self.state_unavailable = Counter(
            "modelbroker_state_unavailable",
            "Times the shared state (Redis, state.redis_url) became unavailable",
            registry=r,
        )
        self.state_available = Gauge(
            "modelbroker_state_available",
            "1 while the shared state (Redis) answers (min over workers); 1 without Redis",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.state_degraded = Counter(
            "modelbroker_state_degraded_admissions",
            "Completions admitted by per-process limits while Redis was unavailable (fail_open)",
            registry=r,
        )
        self.state_available.set(1)
        self.config_reloads = Counter(
            "modelbroker_config_reloads",
            "Config reloads (SIGHUP or the watched file changing) by result: success, or failure "
            "(the running config was kept)",
            ["result"],
            registry=r,
        )
        for result in ("success", "failure"):
            self.config_reloads.labels(result)  # both series from the start, at 0
        self.inflight = {rpc: inflight.labels(rpc) for rpc in RPCS}
        self._overhead = {rpc: self.overhead.labels(rpc) for rpc in RPCS}
        self._children: dict[tuple[str, str], _Children] = {}
        self._models: set[str] = set()
        # (rpc, model as the request named it, provider, status) -> its children; by the raw
        # model, as `model_label` maps a given model the same way for good.
        self._series: dict[tuple[str, str, str, str], _Series] = {}

    def _for(self, model: str, provider: str) -> _Children:
        key = (model, provider)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = _Children(
                duration=self.duration.labels(model, provider),
                ttft=self.ttft.labels(model, provider),
                tokens_in=self.tokens.labels(model, provider, "input"),
                tokens_out=self.tokens.labels(model, provider, "output"),
                cost=self.cost.labels(model, provider),
            )
        return c

    def model_label(self, model: str) -> str:
        if model in self._models or not model:
            return model
        if len(self._models) >= MAX_MODELS:
            return OTHER
        self._models.add(model)
        return model

    def _series_for(self, rpc: str, model: str, provider: str, status: str) -> _Series:
        label = self.model_label(model)
        children = self._for(label, provider) if provider else None
        series = _Series(
            self.requests.labels(rpc, label, provider, status),
            self.duration.labels(label, provider) if children is None else children.duration,
            children,
            self._overhead.get(rpc),
        )
        if len(self._series) >= MAX_SERIES:
            self._series.clear()
        self._series[(rpc, model, provider, status)] = series
        return series

    def observe(
        self,
        rpc: str,
        *,
        model: str,
        provider: str,
        status: str,
        duration: float,
        ttft: float | None,
        upstream_wait: float | None,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost_micro_usd: int | None = None,
    ) -> None:
        """One finished completion RPC. `upstream_wait` None: it never reached a provider."""
        series = self._series.get((rpc, model, provider, status))
        if series is None:
            series = self._series_for(rpc, model, provider, status)
        series.requests.inc()
        series.duration.observe(duration)
        c = series.children
        if c is None:  # refused before any provider was chosen: only count and time it
            return
        if ttft is not None:
            c.ttft.observe(ttft)
        if tokens_in:
            c.tokens_in.inc(tokens_in)
        if tokens_out:
            c.tokens_out.inc(tokens_out)
        if cost_micro_usd:
            c.cost.inc(cost_micro_usd)
        if upstream_wait is not None and series.overhead is not None:
            series.overhead.observe(max(duration - upstream_wait, 0.0))

    def count_spend(self, caller: str, micro_usd: int) -> None:
        self.spend.labels(caller).inc(micro_usd)

    def count_refused(self, rpc: str, status: str, reason: str) -> None:
        self.refused.labels(rpc, status, reason).inc()

    def health_status(self, service: str, status: int | None) -> None:
        up = 1 if status == SERVING else 0
        if service.startswith("provider/"):
            self.provider_healthy.labels(service.removeprefix("provider/")).set(up)
        elif service == SERVICE_NAME:
            self.ready.set(up)


class MeteredHealthServicer(HealthServicer):
    """The health servicer, mirroring every status change into the health gauges."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    async def set(self, service: str, status: Any) -> None:
        await super().set(service, status)
        self._metrics.health_status(service, self.status(service))

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        for service in list(self._server_status):
            self._metrics.health_status(service, self.status(service))


class MetricsServer:
    """prometheus_client's threaded HTTP server for one registry; `port` is the bound port."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        host, port = parse_listen(listen)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
        self.port: int = self._httpd.server_port
        self.host = host

    def close_sync(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    async def close(self) -> None:
        # shutdown() waits for the serving thread's poll loop (up to 0.5 s): not on the event loop.
        await asyncio.to_thread(self.close_sync)


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry that sums the samples every worker wrote under `path` (served by the parent)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry
