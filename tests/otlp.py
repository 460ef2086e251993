"""A real OTLP/gRPC trace receiver on 127.0.0.1 for tests: what a collector would get.

It serves `opentelemetry.proto.collector.trace.v1.TraceService/Export` (the proto from the
`opentelemetry-proto` package) on a grpc.aio server at port 0, and keeps every span it is
sent, decoded into plain values (ids as lowercase hex, attributes as Python values):

    async with OTLPReceiver() as otlp:
        ... run a daemon with OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint ...
        spans = await otlp.wait_for(lambda spans: len(spans) >= 2, within=10)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1 import trace_pb2

_KINDS = {v: k.removeprefix("SPAN_KIND_") for k, v in trace_pb2.Span.SpanKind.items()}
_STATUS = {v: k.removeprefix("STATUS_CODE_") for k, v in trace_pb2.Status.StatusCode.items()}


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return None if which is None else getattr(v, which)


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # SERVER, CLIENT, INTERNAL...
    attributes: dict[str, Any]
    status: str  # UNSET, OK, ERROR
    status_message: str
    start_ns: int
    end_ns: int
    resource: dict[str, Any] = field(default_factory=dict)

    def brief(self) -> dict[str, Any]:
        """The span as a closing note would quote it."""
        return {
            "name": self.name,
            "kind": self.kind,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "status": self.status if not self.status_message else f"{self.status}: {self.status_message}",
            "duration_ms": round((self.end_ns - self.start_ns) / 1e6, 2),
            "attributes": dict(sorted(self.attributes.items())),
        }


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver.exports += 1
        for rs in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.receiver.spans.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=_KINDS.get(s.kind, str(s.kind)),
                            attributes={kv.key: _value(kv.value) for kv in s.attributes},
                            status=_STATUS.get(s.status.code, str(s.status.code)),
                            status_message=s.status.message,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            resource=resource,
                        )
                    )
        self.receiver.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()


class OTLPReceiver:
    """An OTLP/gRPC trace collector on 127.0.0.1 (plaintext); `endpoint` is its http:// URL."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.exports = 0
        self.arrived = asyncio.Event()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> OTLPReceiver:
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def __aenter__(self) -> OTLPReceiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def in_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def wait_for(
        self, done: Callable[[list[ReceivedSpan]], bool], *, within: float = 10.0
    ) -> list[ReceivedSpan]:
        """Every span received, once `done(spans)` holds; fails after `within` seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        while not done(self.spans):
            left = end - loop.time()
            if left <= 0:
                names = [(s.name, s.trace_id[:8]) for s in self.spans]
                raise AssertionError(f"the receiver did not get the spans within {within:g}s; it has {names}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), min(left, 0.5))
            except TimeoutError:
                pass
        return list(self.spans)
