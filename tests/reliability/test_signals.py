"""SIGTERM at the awkward moments, against a real `model-broker serve` process (issue 11, item 7).

1. During start-up, while discovery and the first health check hang on an upstream that
   accepts connections and never answers: the handlers are already in, so health turns
   NOT_SERVING, the Watch ends, a new call is refused, and the process exits 0 at once
   instead of dying of the signal (-15) or finishing a start-up nobody wants.
2. Start-up itself is bounded when discovery hangs (`health.timeout_seconds`, not the
   discovery call's own 5x that): the daemon serves, and says discovery is pending.
3. At the end of the grace period: a stream and a unary call that outlive it end with
   UNAVAILABLE and ErrorInfo reason SHUTTING_DOWN (the stream's metadata says it was
   interrupted), the x-request-id trailer the caller chose, the upstream requests closed,
   one `request` log line each, and exit 0.

Each test prints a transcript of what the caller saw (run with -s to read it).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, error_info
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.procs import ServeDaemon, free_port, start_serve, write_config
from tests.reliability.conftest import openai_provider, stub, user

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HangingUpstream:
    """Accepts every connection, reads the request, never answers (until stopped)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.seen = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(Exception):
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head.split(b"\r\n", 1)[0].decode())
            self.seen.set()
            await reader.read()  # until the client gives up

    async def __aenter__(self) -> HangingUpstream:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()


class Daemon(ServeDaemon):
    """`python -m broker.cli serve` with every stderr line kept (JSON events parsed, timed)."""

    stamp = True

    def __init__(self, proc: asyncio.subprocess.Process, t0: float) -> None:
        super().__init__(proc)
        self.t0 = t0


@contextlib.asynccontextmanager
async def serve(config: dict[str, Any], tmp_path: Path, listen: str = "127.0.0.1:0") -> AsyncIterator[Daemon]:
    path = write_config(config, tmp_path)
    t0 = time.monotonic()
    proc = await start_serve(path, listen)
    daemon = Daemon(proc, t0)
    try:
        yield daemon
    finally:
        await daemon.close()


def status_of(err: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo | None, dict[str, str]]:
    info = error_info(err)
    trailers = {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}
    return info, trailers


async def test_sigterm_during_startup_while_discovery_hangs_drains_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    transcript: list[str] = []
    async with HangingUpstream() as up:
        config = {
            "providers": [openai_provider("openai", up.url)],
            # The first health round and the wait for discovery would hold start-up 8 s.
            "health": {"interval_seconds": 30, "timeout_seconds": 8},
            "server": {"shutdown_grace_seconds": 5},
        }
        async with serve(config, tmp_path, listen=target) as daemon:
            await asyncio.wait_for(up.seen.wait(), 20)  # discovery (or the check) is hanging now
            async with grpc.aio.insecure_channel(target) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                live = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                ready = await health.Check(
                    health_pb2.HealthCheckRequest(service="modelbroker.v1.ModelBroker"), timeout=5
                )
                transcript.append(
                    f"start-up, upstream saw {up.requests}: liveness {health_pb2.HealthCheckResponse.ServingStatus.Name(live.status)}, "
                    f"readiness {health_pb2.HealthCheckResponse.ServingStatus.Name(ready.status)}"
                )
                assert live.status == SERVING and ready.status == NOT_SERVING
                assert not daemon.serving.is_set(), "start-up should still be waiting on the upstream"
                watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
                assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING

                t_sig = time.monotonic()
                daemon.proc.send_signal(signal.SIGTERM)
                transcript.append("SIGTERM sent")
                first = await asyncio.wait_for(watch.read(), 5)
                transcript.append(
                    f"+{time.monotonic() - t_sig:.2f}s Watch(''): "
                    f"{health_pb2.HealthCheckResponse.ServingStatus.Name(first.status)}"
                )
                assert first.status == NOT_SERVING
                assert await asyncio.wait_for(watch.read(), 5) is grpc.aio.EOF
                transcript.append(f"+{time.monotonic() - t_sig:.2f}s Watch(''): ended (OK)")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub(ch).Complete(
                        pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("late")]), timeout=5
                    )
                info, _ = status_of(refused.value)
                transcript.append(
                    f"+{time.monotonic() - t_sig:.2f}s Complete: {refused.value.code().name} "
                    f"{info.reason if info else '(no ErrorInfo)'}"
                )
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            code = await asyncio.wait_for(daemon.proc.wait(), 10)
            took = time.monotonic() - t_sig
            transcript.append(f"+{took:.2f}s process exited with {code}")
            await daemon.output_closed()
    print("\n--- SIGTERM during start-up (discovery hanging) ---\n" + "\n".join(transcript))
    assert code == 0, "\n".join(daemon.lines)
    assert took < 5, f"took {took:.1f}s: start-up was not interrupted"
    names = [e.get("event") for e in daemon.events]
    assert "serving" not in names
    (req,) = daemon.logged("shutdown_requested")
    assert req["during"] == "start-up" and req["signal"] == "SIGTERM"
    assert names.index("shutdown_requested") < names.index("health_shutdown") < names.index("stopped")
    assert not any("Traceback" in line for line in daemon.lines), "\n".join(daemon.lines)


async def test_startup_is_bounded_when_discovery_hangs(tmp_path: Path) -> None:
    async with HangingUpstream() as up:
        config = {
            "providers": [openai_provider("openai", up.url)],
            "health": {"interval_seconds": 30, "timeout_seconds": 1},
        }
        async with serve(config, tmp_path) as daemon:
            await asyncio.wait_for(up.seen.wait(), 20)
            t_seen = time.monotonic()
            await asyncio.wait_for(daemon.serving.wait(), 10)
            waited = time.monotonic() - t_seen
            (serving,) = daemon.logged("serving")
            assert serving["discovery_pending"] == ["openai"]
            assert daemon.logged("discovery_pending")
            # Bounded by health.timeout_seconds (1 s), not the listing's own 5 s.
            assert waited < 3, f"start-up took {waited:.1f}s after the upstream was reached"
            daemon.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.proc.wait(), 15) == 0
    print(f"\nstart-up with discovery hanging: serving {waited:.2f}s after the first upstream request")


async def test_streams_outliving_the_grace_period_end_with_shutting_down(tmp_path: Path) -> None:
    grace = 1.5
    transcript: list[str] = []
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as up:
        up.reply = Reply(text_chunks=[f"w{i} " for i in range(60)], chunk_delay=0.25)  # ~15 s
        config = {
            "providers": [openai_provider("openai", up.url)],
            "health": {"interval_seconds": 0.5},
            "server": {"shutdown_grace_seconds": grace},
        }
        async with serve(config, tmp_path) as daemon:
            await asyncio.wait_for(daemon.serving.wait(), 30)
            target = f"127.0.0.1:{daemon.port}"
            async with grpc.aio.insecure_channel(target) as ch:
                s = stub(ch)
                stream = s.StreamComplete(
                    pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("count")]),
                    timeout=30,
                    metadata=(("x-request-id", "stream-outlives-grace"),),
                )
                unary = asyncio.ensure_future(
                    s.Complete(
                        pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("count")]),
                        timeout=30,
                        metadata=(("x-request-id", "unary-outlives-grace"),),
                    )
                )
                got: list[pb.StreamCompleteResponse] = []
                async for m in stream:
                    got.append(m)
                    if len(got) == 3:
                        break
                transcript.append(
                    f"stream: start (request_id={got[0].start.request_id}), "
                    f"{sum(m.HasField('text_delta') for m in got)} text deltas so far"
                )
                t_sig = time.monotonic()
                daemon.proc.send_signal(signal.SIGTERM)
                transcript.append(f"SIGTERM sent (grace {grace:g}s)")
                with pytest.raises(grpc.aio.AioRpcError) as cut:
                    async for m in stream:
                        got.append(m)
                t_cut = time.monotonic() - t_sig
                info, trailers = status_of(cut.value)
                transcript.append(
                    f"+{t_cut:.2f}s stream ended: {cut.value.code().name} reason={info.reason if info else None} "
                    f"metadata={dict(info.metadata) if info else {}} x-request-id={trailers.get('x-request-id')} "
                    f"after {sum(m.HasField('text_delta') for m in got)} text deltas, no end message; "
                    f"details={cut.value.details()!r}"
                )
                assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
                assert info is not None and info.reason == "SHUTTING_DOWN"
                assert info.metadata["interrupted"] == "true"
                assert trailers["x-request-id"] == "stream-outlives-grace"
                assert not any(m.HasField("end") for m in got)
                assert grace - 0.3 < t_cut < grace + 2.5, t_cut

                with pytest.raises(grpc.aio.AioRpcError) as cut_unary:
                    await asyncio.wait_for(unary, 10)
                uinfo, utrailers = status_of(cut_unary.value)
                transcript.append(
                    f"+{time.monotonic() - t_sig:.2f}s unary Complete: {cut_unary.value.code().name} "
                    f"reason={uinfo.reason if uinfo else None} x-request-id={utrailers.get('x-request-id')}"
                )
                assert cut_unary.value.code() == grpc.StatusCode.UNAVAILABLE
                assert uinfo is not None and uinfo.reason == "SHUTTING_DOWN"
                assert utrailers["x-request-id"] == "unary-outlives-grace"
            code = await asyncio.wait_for(daemon.proc.wait(), grace + 10)
            transcript.append(f"+{time.monotonic() - t_sig:.2f}s process exited with {code}")
            await daemon.output_closed()
            # Both upstream requests were closed, not left generating for nobody.
            assert up.server.disconnects.qsize() >= 2
    print("\n--- stream outliving the grace period ---\n" + "\n".join(transcript))
    assert code == 0, "\n".join(daemon.lines)
    (drain_cut,) = daemon.logged("drain_cut")
    assert drain_cut["in_flight"] == 2
    lines = {e["request_id"]: e for e in daemon.logged("request")}
    for rid in ("stream-outlives-grace", "unary-outlives-grace"):
        assert lines[rid]["status"] == "UNAVAILABLE" and lines[rid]["reason"] == "SHUTTING_DOWN", lines[rid]
    assert not any("Traceback" in line for line in daemon.lines), "\n".join(daemon.lines)


async def test_sigterm_to_a_workers_parent_while_its_workers_start_exits_0(tmp_path: Path) -> None:
    """The parent forwards SIGTERM to workers that may still be importing: they start with the
    signals blocked and take them once their handlers are in, so each drains (exit 0)."""
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as up:
        config = {"providers": [openai_provider("openai", up.url)], "server": {"shutdown_grace_seconds": 2}}
        proc = await start_serve(write_config(config, tmp_path), "127.0.0.1:0", "--workers", "2")
        daemon = Daemon(proc, time.monotonic())
        try:
            # The parent's `serving` comes right after it spawned the workers, long before
            # they have imported the daemon.
            for _ in range(300):
                if any(e.get("event") == "serving" and "workers" in e for e in daemon.events):
                    break
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
            await daemon.output_closed()
        finally:
            await daemon.close()
    (stopped,) = [e for e in daemon.events if e.get("event") == "stopped" and "worker_exit_codes" in e]
    print(
        f"\n--workers 2, SIGTERM while the workers start: exit {code}, workers {stopped['worker_exit_codes']}"
    )
    assert code == 0 and stopped["worker_exit_codes"] == [0, 0], "\n".join(daemon.lines)
