"""Several `model-broker serve` processes on one real redis-server, in front of one fake OpenAI:
what the shared-state tests run against.

Each daemon is a real subprocess (tests/procs.py) reading the same config file; the fake
upstream runs in the test's event loop. Models: `openai/priced-model` costs $1 per token
(a `models[]` override, so budgets move in whole dollars) and `openai/unpriced-model` has no
price. Every call helper returns the outcome a user would see: "OK" or the ErrorInfo reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc

from broker.auth import hash_key
from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import OPENAI_TEST_KEY, reason_of
from tests.fakes.openai_upstream import FakeOpenAI
from tests.procs import ServeDaemon, env_without, start_serve, stop, write_config

PRICED = "openai/priced-model"
UNPRICED = "openai/unpriced-model"
ADMIN_KEY = "mb_test-state-admin-7a1c9e44b20d"
START_SECONDS = 30.0


def secret(name: str) -> str:
    return f"mb_test-state-{name}-5f0b8c2d91e3"


def key(name: str, **limits: Any) -> dict[str, Any]:
    return {"name": name, "sha256": hash_key(secret(name)), **limits}


def bearer(name: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {ADMIN_KEY if name == 'admin' else secret(name)}"),)


def config(
    upstream_url: str, redis_url: str | None, keys: list[dict[str, Any]], **state: Any
) -> dict[str, Any]:
    return {
        "providers": [
            {
                "name": "openai",
                "type": "openai",
                "base_url": upstream_url,
                "api_key": OPENAI_TEST_KEY,
                "models": ["priced-model", "unpriced-model"],
                "discovery": False,
            }
        ],
        "models": [{"id": PRICED, "input_usd_per_mtok": 1_000_000, "output_usd_per_mtok": 1_000_000}],
        "auth": {"keys": [*keys, {"name": "admin", "sha256": hash_key(ADMIN_KEY), "admin": True}]},
        "health": {"interval_seconds": 0.5, "timeout_seconds": 1.0},
        "routing": {"retry": {"max_attempts": 1}},
        "server": {"shutdown_grace_seconds": 1},
        "state": {"redis_url": redis_url, **state} if redis_url else state,
    }


def user(text: str = "hi") -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


class Daemon:
    """One serve process and a channel to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.daemon: ServeDaemon | None = None
        self.channel: grpc.aio.Channel | None = None
        self.target = ""

    async def start(self) -> Daemon:
        env = env_without("OPENAI_", "ANTHROPIC_", "OLLAMA_", "MODEL_BROKER_")
        env["MODEL_BROKER_DISCOVER_LOCAL"] = "0"
        self.daemon = ServeDaemon(await start_serve(self.path, "127.0.0.1:0", env=env))
        waiting = asyncio.create_task(self.daemon.serving.wait())
        exited = asyncio.create_task(self.daemon.proc.wait())
        await asyncio.wait({waiting, exited}, timeout=START_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        exited.cancel()
        if not self.daemon.serving.is_set():
            lines = "\n".join(self.daemon.lines[-20:])
            await self.daemon.close()
            raise AssertionError(f"serve did not start:\n{lines}")
        self.target = f"127.0.0.1:{self.daemon.port}"
        self.channel = grpc.aio.insecure_channel(self.target)
        return self

    @property
    def stub(self) -> pb_grpc.ModelBrokerStub:
        assert self.channel is not None
        return pb_grpc.ModelBrokerStub(self.channel)

    def logged(self, event: str) -> list[dict[str, Any]]:
        return self.daemon.logged(event) if self.daemon is not None else []

    async def _close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def stop(self) -> None:
        """SIGTERM: a graceful drain."""
        await self._close_channel()
        if self.daemon is not None:
            assert await stop(self.daemon.proc, 10), "serve did not exit within 10 s of SIGTERM"
            await self.daemon.close()

    async def kill(self) -> None:
        """SIGKILL: no drain, no slot released, nothing flushed (the channel closes after)."""
        if self.daemon is not None:
            await self.daemon.close()
        await self._close_channel()

    async def complete(self, who: str, model: str = PRICED, timeout: float = 10) -> str:
        try:
            await self.stub.Complete(
                pb.CompleteRequest(model=model, messages=[user()]), timeout=timeout, metadata=bearer(who)
            )
        except grpc.aio.AioRpcError as err:
            return reason_of(err) or err.code().name
        return "OK"

    async def usage(self, who: str, *names: str) -> pb.GetUsageResponse:
        resp: pb.GetUsageResponse = await self.stub.GetUsage(
            pb.GetUsageRequest(key_names=list(names)), timeout=5, metadata=bearer(who)
        )
        return resp


class Cluster:
    """`n` daemons reading one config (rewritten by `configure`)."""

    def __init__(self, tmp: Path, upstream: FakeOpenAI) -> None:
        self.tmp = tmp
        self.upstream = upstream
        self.daemons: list[Daemon] = []
        self.path = tmp / "broker.yaml"

    def configure(self, cfg: dict[str, Any]) -> None:
        self.path = write_config(cfg, self.tmp)

    async def start(self, n: int) -> list[Daemon]:
        self.daemons = list(await asyncio.gather(*(Daemon(self.path).start() for _ in range(n))))
        return self.daemons

    async def restart_all(self) -> list[Daemon]:
        await asyncio.gather(*(d.stop() for d in self.daemons))
        return await self.start(len(self.daemons))

    async def close(self) -> None:
        for d in self.daemons:
            with contextlib.suppress(Exception):
                await d.kill()
