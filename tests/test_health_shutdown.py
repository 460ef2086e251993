"""grpc.health.v1 at the edges, against a real `serve` process: every open Watch ends at
SIGTERM with its final status (sent again when it had not changed) and then status OK with
the trailer `x-health-ended: server shutting down`, never a bare end of stream; Check of an unknown name is
NOT_FOUND naming the known ones (the asked name bounded)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.clirun import serving
from tests.procs import free_port, write_config

Status = health_pb2.HealthCheckResponse
READINESS = "modelbroker.v1.ModelBroker"


def down_provider_config(tmp_path: Path) -> Path:
    """One provider whose upstream is a closed port: liveness SERVING, readiness NOT_SERVING."""
    provider = {"name": "openai", "type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"}
    return write_config({"providers": [provider], "health": {"interval_seconds": 60}}, tmp_path)


async def test_every_watch_ends_with_its_final_status_then_ok(tmp_path: Path) -> None:
    async with serving(down_provider_config(tmp_path)) as (target, daemon):
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            names = {
                "": Status.SERVING,
                READINESS: Status.NOT_SERVING,
                "provider/nope": Status.SERVICE_UNKNOWN,
            }
            watches = {}
            for name, now in names.items():
                watches[name] = health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=30)
                assert (await asyncio.wait_for(watches[name].read(), 5)).status == now, name

            daemon.proc.send_signal(signal.SIGTERM)
            final = {Status.SERVICE_UNKNOWN: Status.SERVICE_UNKNOWN}
            for name, now in names.items():
                watch = watches[name]
                last = await asyncio.wait_for(watch.read(), 5)
                # The status it ends on, even for a name whose status did not change.
                assert last.status == final.get(now, Status.NOT_SERVING), name
                assert await asyncio.wait_for(watch.read(), 5) is grpc.aio.EOF, name
                assert await watch.code() == grpc.StatusCode.OK, name
                assert (await watch.trailing_metadata())["x-health-ended"] == "server shutting down", name
        assert await asyncio.wait_for(daemon.proc.wait(), 30) == 0


async def test_check_of_an_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    async with serving(down_provider_config(tmp_path)) as (target, _):
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health.Check(health_pb2.HealthCheckRequest(service="provider/opena"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            assert unknown.value.details() == (
                "unknown health service 'provider/opena'; known: '', modelbroker.v1.ModelBroker, "
                "provider/openai ('' is liveness)"
            )
            with pytest.raises(grpc.aio.AioRpcError) as huge:
                await health.Check(health_pb2.HealthCheckRequest(service="x" * 100_000), timeout=5)
            assert huge.value.code() == grpc.StatusCode.NOT_FOUND
            assert len(huge.value.details()) < 400 and "x" * 120 + "..." in huge.value.details()
