"""Shared fixtures: fake upstreams on 127.0.0.1:0 and a real grpc.aio daemon on a real port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.config import Settings, settings_from_dict
from broker.server import BrokerServer
from modelbroker.v1 import broker_pb2_grpc as pb_grpc

# A key the fake upstream demands; tests assert it never reaches a caller or a log.
OPENAI_TEST_KEY = "sk-test-openai-3f9a7c2e1b0d4e5f"

# Retries fast enough for a test and a breaker that stays out of the way unless a test
# turns it on: each test states the routing it relies on.
FAST_ROUTING: dict[str, Any] = {
    "retry": {
        "max_attempts": 2,
        "initial_backoff_seconds": 0.01,
        "max_backoff_seconds": 0.05,
        "budget_min_retries_per_second": 100,
    },
    "breaker": {"consecutive_failures": 1000, "min_requests": 1000},
}


def broker_settings(providers: list[dict[str, Any]], **extra: Any) -> Settings:
    raw: dict[str, Any] = {
        "providers": providers,
        "health": {"interval_seconds": 0.2, "timeout_seconds": 1.0},
    }
    raw.update(extra)
    return settings_from_dict(raw, env={})


Daemon = Callable[..., Awaitable[tuple[BrokerServer, str]]]


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    """Start BrokerServers on 127.0.0.1:0; every one is stopped at teardown."""
    servers: list[BrokerServer] = []

    async def start(settings: Settings) -> tuple[BrokerServer, str]:
        server = BrokerServer(settings)
        port = await server.start("127.0.0.1:0")
        servers.append(server)
        return server, f"127.0.0.1:{port}"

    yield start
    for s in servers:
        await s.stop(0)


@pytest.fixture
async def channel_to() -> AsyncIterator[Callable[[str], grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []

    def make(target: str) -> grpc.aio.Channel:
        ch = grpc.aio.insecure_channel(target)
        channels.append(ch)
        return ch

    yield make
    for ch in channels:
        await ch.close()


def stub(channel: grpc.aio.Channel) -> pb_grpc.ModelBrokerStub:
    return pb_grpc.ModelBrokerStub(channel)


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc ErrorInfo a failed call carries (None: no rich status, or none in it)."""
    st = rpc_status.from_call(err)
    for d in st.details if st is not None else ():
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info
    return None


def reason_of(err: grpc.aio.AioRpcError) -> str:
    """ErrorInfo.reason, or "" when the call carries none."""
    info = error_info(err)
    return "" if info is None else str(info.reason)


def required_error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo a failed call must carry: asserts it has a rich status and one in it."""
    assert rpc_status.from_call(err) is not None, (err.code(), err.details())
    info = error_info(err)
    if info is None:
        raise AssertionError("no ErrorInfo")
    return info
