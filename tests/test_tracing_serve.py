"""Traces from `model-broker serve` as an operator turns them on: the standard OTEL_* variables
only (no tracing key in the file), a real OTLP receiver on loopback, and the request log line
carrying the trace id the collector has."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import grpc

from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import OPENAI_TEST_KEY
from tests.fakes.openai_upstream import FakeOpenAI
from tests.otlp import OTLPReceiver
from tests.procs import ServeDaemon, env_without, start_serve, stop, wait_ready, write_config


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


async def request_line(daemon: ServeDaemon, request_id: str) -> dict[str, object]:
    for _ in range(200):
        for e in daemon.logged("request"):
            if e.get("request_id") == request_id:
                return e
        await asyncio.sleep(0.05)
    raise AssertionError(f"no request line for {request_id}")


async def test_serve_exports_with_otel_variables_and_logs_the_trace_id(tmp_path: Path) -> None:
    async with OTLPReceiver() as otlp, FakeOpenAI(api_key=OPENAI_TEST_KEY) as upstream:
        config = write_config(
            {
                "providers": [
                    {"name": "openai", "type": "openai", "base_url": upstream.url, "api_key": OPENAI_TEST_KEY}
                ],
                "health": {"interval_seconds": 0.5, "timeout_seconds": 2},
            },
            tmp_path,
        )
        env = env_without("OPENAI_", "ANTHROPIC_", "OLLAMA_", "MODEL_BROKER_", "OTEL_")
        env.update(
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
            OTEL_SERVICE_NAME="broker-under-test",
            OTEL_BSP_SCHEDULE_DELAY="50",  # ms: export within the test's patience, not 5 s
            MODEL_BROKER_DISCOVER_LOCAL="0",
        )
        daemon = ServeDaemon(await start_serve(config, "127.0.0.1:0", env=env))
        try:
            await asyncio.wait_for(daemon.serving.wait(), 30)
            target = f"127.0.0.1:{daemon.port}"
            await wait_ready(target)
            trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
            async with grpc.aio.insecure_channel(target) as ch:
                s = pb_grpc.ModelBrokerStub(ch)
                joined = await s.Complete(
                    pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]),
                    metadata=(("traceparent", f"00-{trace_id}-{parent}-01"),),
                )
                fresh = await s.Complete(
                    pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")])
                )

            line = await request_line(daemon, joined.request_id)
            assert line["trace_id"] == trace_id, "the log line names the caller's trace"
            spans = await otlp.wait_for(lambda _: len(otlp.in_trace(trace_id)) >= 2)
            rpc = next(s for s in otlp.in_trace(trace_id) if s.kind == "SERVER")
            assert rpc.parent_span_id == parent and rpc.resource["service.name"] == "broker-under-test"
            assert rpc.attributes["modelbroker.request_id"] == joined.request_id

            # No traceparent: the broker starts the trace, and its id is in the log line.
            own = str((await request_line(daemon, fresh.request_id))["trace_id"])
            assert len(own) == 32 and own != trace_id
            await otlp.wait_for(lambda _: len(otlp.in_trace(own)) >= 2)
            root = next(s for s in otlp.in_trace(own) if s.kind == "SERVER")
            assert root.parent_span_id == ""
            assert {s.name for s in spans} >= {"modelbroker.v1.ModelBroker/Complete", "chat gpt-4o-mini"}
            assert await stop(daemon.proc, 30), "SIGTERM: drained and exited"
            assert daemon.proc.returncode == 0
        finally:
            await daemon.close()
    assert "Traceback" not in "\n".join(daemon.lines), os.linesep.join(daemon.lines[-20:])
