"""`serve --workers 2`: two processes answer on one port, metrics sum over them, SIGTERM drains.

Each request's log line names the worker's pid, so the test sees which process served it
(x-request-id ties a call to its line). New connections are spread by the kernel
(SO_REUSEPORT), so the test opens a fresh TCP connection per call until both pids answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import OPENAI_TEST_KEY
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.httpclient import HTTP
from tests.procs import env_without, start_serve, terminate, write_config

MAX_CALLS = 40  # P(all on one of two workers) = 2**-39


class Group:
    """The `serve --workers` parent as a child process, with every output line parsed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.other: list[str] = []
        self.changed = asyncio.Event()
        assert proc.stderr is not None
        self.reader = asyncio.create_task(self._read(proc.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.other.append(line.decode(errors="replace"))
            self.changed.set()

    async def wait_for(self, pred: Any, what: str, timeout: float = 30) -> list[dict[str, Any]]:
        async def poll() -> list[dict[str, Any]]:
            while not (found := [e for e in self.events if pred(e)]):
                self.changed.clear()
                await self.changed.wait()
            return found

        try:
            return await asyncio.wait_for(poll(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout}s; output: {self.events} {self.other}") from None

    async def stop(self) -> int:
        code = await terminate(self.proc, 40)
        await self.reader
        return code


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        fake.reply = Reply(text_chunks=["w", "o", "rk"], input_tokens=5, output_tokens=3)
        yield fake


async def start_group(
    tmp_path: Path, upstream: FakeOpenAI, *extra: str, own_metrics_dir: bool = False
) -> Group:
    """own_metrics_dir: let the parent make (and remove) its own samples directory."""
    config = {
        "providers": [
            {"name": "openai", "type": "openai", "base_url": upstream.url, "api_key": OPENAI_TEST_KEY}
        ],
        "health": {"interval_seconds": 0.5, "timeout_seconds": 1},
        "server": {"shutdown_grace_seconds": 10},
    }
    path = write_config(config, tmp_path)
    env = env_without("OPENAI_", "PROMETHEUS_")
    if not own_metrics_dir:
        # Samples go under tmp_path, not a /tmp directory a killed parent could leave behind.
        prom = tmp_path / "prom"
        prom.mkdir(exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    proc = await start_serve(path, "127.0.0.1:0", *extra, stdin=None, env=env)
    return Group(proc)


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def fresh_channel(target: str) -> grpc.aio.Channel:
    # A private subchannel pool: a new TCP connection per channel, so the kernel picks a worker.
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with HTTP() as http:
        resp = await http.get(url, timeout=5)
    assert resp.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(resp.text)
        for s in fam.samples
    }


async def test_two_workers_serve_one_port_and_drain_on_sigterm(tmp_path, upstream) -> None:
    group = await start_group(
        tmp_path, upstream, "--workers", "2", "--metrics-listen", "127.0.0.1:0", own_metrics_dir=True
    )
    try:
        parent = (await group.wait_for(lambda e: e["event"] == "serving" and "workers" in e, "parent"))[0]
        worker_pids = set(parent["worker_pids"])
        assert parent["workers"] == 2 and len(worker_pids) == 2 and parent["pid"] not in worker_pids
        await group.wait_for(
            lambda e: len({x["pid"] for x in group.events if x["event"] == "serving" and "worker" in x}) == 2,
            "two serving workers",
        )
        target, metrics_url = parent["listen"], f"http://{parent['metrics']}/metrics"

        # Health answers on the shared port, whichever worker takes the connection.
        async with fresh_channel(target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "modelbroker.v1.ModelBroker"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING

        served_by: dict[str, int] = {}
        for _ in range(MAX_CALLS):
            rid = uuid.uuid4().hex
            async with fresh_channel(target) as ch:
                resp = await pb_grpc.ModelBrokerStub(ch).Complete(
                    pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]),
                    timeout=10,
                    metadata=(("x-request-id", rid),),
                )
            assert resp.request_id == rid and resp.message.content[0].text == "work"
            line = await group.wait_for(
                lambda e, rid=rid: e["event"] == "request" and e["request_id"] == rid, "request line"
            )
            served_by[rid] = line[0]["pid"]
            if len(set(served_by.values())) == 2:
                break
        assert set(served_by.values()) == worker_pids, "both workers must serve requests"

        # The parent's /metrics sums the workers' samples.
        samples = await scrape(metrics_url)
        key = frozenset(
            {"rpc": "Complete", "model": "gpt-4o-mini", "provider": "openai", "status": "OK"}.items()
        )
        assert samples[("modelbroker_requests_total", key)] == len(served_by)
        tokens = frozenset({"model": "gpt-4o-mini", "provider": "openai", "direction": "output"}.items())
        assert samples[("modelbroker_tokens_total", tokens)] == 3 * len(served_by)
        assert samples[("modelbroker_provider_healthy", frozenset({"provider": "openai"}.items()))] == 1

        # Drain: a stream in flight when SIGTERM arrives still finishes, then all exit 0.
        upstream.reply = Reply(text_chunks=["slow"] * 5, chunk_delay=0.3, input_tokens=1, output_tokens=5)
        async with fresh_channel(target) as ch:
            call = pb_grpc.ModelBrokerStub(ch).StreamComplete(
                pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]), timeout=20
            )
            first = await call.read()
            assert first.HasField("start")
            group.proc.send_signal(signal.SIGTERM)
            rest = []
            while (m := await call.read()) is not grpc.aio.EOF:
                rest.append(m)
        assert rest[-1].HasField("end") and rest[-1].end.usage.output_tokens == 5
        assert "".join(m.text_delta.text for m in rest if m.HasField("text_delta")) == "slow" * 5
        # Each worker logs that it got the forwarded SIGTERM (bounded wait: lines from three
        # processes share one pipe and may trail the stream's end).
        await group.wait_for(
            lambda e: (
                {x["pid"] for x in group.events if x["event"] == "shutdown_requested" and "worker" in x}
                == worker_pids
            ),
            "every worker's shutdown_requested line",
        )
        assert await group.stop() == 0
        # Three processes share one stderr: every line must still be one whole JSON object.
        assert not [line for line in group.other if line.strip()], group.other
    finally:
        if group.proc.returncode is None:
            group.proc.kill()
            await group.proc.wait()

    drained = {e["pid"] for e in group.events if e["event"] == "shutdown_requested" and "worker" in e}
    seen = [e for e in group.events if e["event"] in ("shutdown_requested", "stopped", "serving")]
    assert drained == worker_pids, f"SIGTERM reaches every worker: {seen}"
    stopped = next(e for e in group.events if e["event"] == "stopped" and "worker_exit_codes" in e)
    assert stopped["worker_exit_codes"] == [0, 0]
    for pid in worker_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    left_behind = await asyncio.to_thread(os.path.exists, parent["metrics_dir"])
    assert not left_behind, "the parent removes the samples directory it made"


async def test_a_killed_worker_is_replaced(tmp_path, upstream) -> None:
    group = await start_group(tmp_path, upstream, "--workers", "2")
    try:
        parent = (await group.wait_for(lambda e: e["event"] == "serving" and "workers" in e, "parent"))[0]
        victim = parent["worker_pids"][0]
        os.kill(victim, signal.SIGKILL)
        restarted = await group.wait_for(lambda e: e["event"] == "worker_restarted", "a restart")
        new_pid = restarted[0]["worker_pid"]
        assert new_pid not in parent["worker_pids"]
        await group.wait_for(lambda e: e["event"] == "serving" and e.get("pid") == new_pid, "new worker")
        async with fresh_channel(parent["listen"]) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert await group.stop() == 0
    finally:
        if group.proc.returncode is None:
            group.proc.kill()
            await group.proc.wait()


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for whoever adopted it to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_workers_exit_when_the_parent_is_killed(tmp_path, upstream) -> None:
    group = await start_group(tmp_path, upstream, "--workers", "2")
    pids: list[int] = []
    try:
        parent = (await group.wait_for(lambda e: e["event"] == "serving" and "workers" in e, "parent"))[0]
        pids = parent["worker_pids"]
        await group.wait_for(
            lambda e: len({x["pid"] for x in group.events if x["event"] == "serving" and "worker" in x}) == 2,
            "two serving workers",
        )
        group.proc.kill()
        await group.proc.wait()
        for _ in range(100):  # they poll for their parent every second; allow ~10 s
            if all(gone(pid) for pid in pids):
                break
            await asyncio.sleep(0.1)
        assert all(gone(pid) for pid in pids), "orphaned workers must drain and exit"
        await asyncio.wait_for(group.reader, 10)  # their stderr (our pipe) closed as they exited
    finally:
        if group.proc.returncode is None:
            group.proc.kill()
            await group.proc.wait()
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    left = [e for e in group.events if e["event"] in ("parent_gone", "stopped") and "worker" in e]
    assert sorted(e["event"] for e in left) == ["parent_gone", "parent_gone", "stopped", "stopped"]


async def test_a_taken_port_fails_fast_with_its_address(tmp_path, upstream) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        group = await start_group(tmp_path, upstream, "--workers", "2", "--listen", f"127.0.0.1:{port}")
        code = await asyncio.wait_for(group.proc.wait(), 30)
        await group.reader
    assert code == 1
    assert any(f"cannot listen on 127.0.0.1:{port}" in line for line in group.other), group.other
