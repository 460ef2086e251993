"""A real `redis-server` on 127.0.0.1 for the shared-state tests: a free port, its own directory,
started, killed (SIGKILL), restarted on the same port, and stopped at the end.

No persistence unless asked (`persist=True`: append-only file in the test's directory, for
tests that restart Redis itself). The binary is Debian's `redis-server` (`make redis-tools`
installs it; `.ci/run` does). Without it the tests skip, saying so, except under CI=true,
where a missing server is a failure: CI must run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.procs import free_port

STOP_SECONDS = 5.0
# No shared-state test takes more than ~15 s; one that hangs this long dumps every thread's
# stack and ends the run (`hang_guard`), so CI never waits out its own time limit on it.
HANG_SECONDS = 120.0


@pytest.fixture
def hang_guard() -> Iterator[None]:
    """Use in a module with `pytestmark = pytest.mark.usefixtures("hang_guard")`."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def redis_server_binary() -> str:
    """The redis-server path, or a skip (a failure under CI=true) that says how to get one."""
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None
    )
    if found is None:
        why = "redis-server not found: `make redis-tools` installs Debian's redis-server (apt-get, as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(why + "; CI must run the shared-state tests")
        pytest.skip(why)
    return found


class RedisProc:
    """One redis-server process on a fixed loopback port (kept across restarts)."""

    def __init__(self, directory: Path, *, persist: bool = False) -> None:
        self.binary = redis_server_binary()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> RedisProc:
        args = [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--daemonize", "no",
            "--enable-debug-command", "local",  # DEBUG SLEEP: a Redis that is slow to answer
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        # setpriv (util-linux) execs redis-server with PR_SET_PDEATHSIG: it is SIGKILLed if the
        # test process dies, so a killed run leaves no server behind (same pid, no fork hooks).
        setpriv = shutil.which("setpriv")
        wrap = [setpriv, "--pdeathsig", "KILL"] if setpriv else []
        self.proc = await asyncio.create_subprocess_exec(
            *wrap,
            self.binary,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            for _ in range(100):  # at most ~10 s
                if self.proc.returncode is not None:
                    raise AssertionError(
                        f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}"
                    )
                with contextlib.suppress(Exception):
                    if await client.ping():
                        return self
                await asyncio.sleep(0.1)
        finally:
            await client.aclose()
        raise AssertionError("redis-server did not answer PING")

    async def kill(self) -> float:
        """SIGKILL, as a crash; returns when the process is gone (the monotonic time of the kill)."""
        assert self.proc is not None
        at = time.monotonic()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        return at

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_SECONDS)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def client(self) -> Redis:
        return Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)


@contextlib.asynccontextmanager
async def running_redis(directory: Path, *, persist: bool = False) -> AsyncIterator[RedisProc]:
    server = await RedisProc(directory, persist=persist).start()
    try:
        yield server
    finally:
        await server.stop()
