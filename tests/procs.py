"""`model-broker serve` as a real subprocess: a free port, the config file, the process, its
JSON log lines, readiness, and SIGTERM (or kill) and wait. Shared by the suites that run the
daemon as a user does (hostile, reliability, fuzz, e2e)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

CLI = [sys.executable, "-m", "broker.cli"]
READINESS = "modelbroker.v1.ModelBroker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(config: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def env_without(*prefixes: str) -> dict[str, str]:
    """os.environ without the variables whose names start with one of `prefixes`."""
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


async def start_serve(
    config: Path | None,
    listen: str = "127.0.0.1:0",
    *extra: str,
    env: dict[str, str] | None = None,
    stdin: int | None = asyncio.subprocess.DEVNULL,
    stdout: int | None = asyncio.subprocess.DEVNULL,
    stderr: int | None = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """`python -m broker.cli serve [--config PATH] --listen LISTEN [EXTRA...]`."""
    args = ["serve"] + (["--config", str(config)] if config is not None else []) + ["--listen", listen]
    return await asyncio.create_subprocess_exec(
        *CLI, *args, *extra, stdin=stdin, stdout=stdout, stderr=stderr, env=env
    )


async def wait_ready(target: str, *, tries: int = 150) -> None:
    """Poll grpc.health.v1 Check for the readiness service every 100 ms until SERVING."""
    async with grpc.aio.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for _ in range(tries):
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(service=READINESS), timeout=0.5)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the daemon did not become ready")


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def terminate(proc: asyncio.subprocess.Process, timeout: float) -> int:
    """SIGTERM (unless it has exited) and wait at most `timeout` seconds for the exit code."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), timeout)


async def stop(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """SIGTERM and wait; killed if it has not exited within `timeout` (then False)."""
    try:
        await terminate(proc, timeout)
        return True
    except TimeoutError:
        await kill(proc)
        return False


class ServeDaemon:
    """A serve process's stderr read as it comes: every line in `lines`, the JSON ones parsed
    into `events` (the others in `other`); `serving` is set, and `port` known, once it says so."""

    stamp = False  # add each event's arrival time (monotonic) as "_t"

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.other: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.serving = asyncio.Event()
        self.port = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                self.other.append(line.rstrip())  # a warning line, not a log event
                continue
            if self.stamp:
                event["_t"] = time.monotonic()
            self.events.append(event)
            if event.get("event") == "serving":
                self.port = int(event["listen"].rsplit(":", 1)[1])
                self.serving.set()

    def logged(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    async def output_closed(self) -> None:
        """Every line the process wrote has been read (its stderr reached EOF)."""
        await asyncio.wait_for(asyncio.shield(self._reader), 5)

    async def close(self) -> None:
        await kill(self.proc)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
