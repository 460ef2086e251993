"""The fuzz suite's daemon and bookkeeping.

Hypothesis drives plain (sync) tests; the daemon under test is a real BrokerServer with
fake OpenAI, Anthropic and Ollama upstreams, all on one asyncio loop in a background thread
(`LiveDaemon`), called over a real port with grpc's sync client. One daemon serves the whole
module, so thousands of examples cost no start-ups, and what one example does to it (a
breaker, a leak) the next ones see.

Profiles (HYPOTHESIS_PROFILE): `ci` (the default: ~2,000 examples over the suite,
derandomized, so `make test` is reproducible) and `long` (`make fuzz`: 10x the examples,
random seeds). Every outcome is counted and printed as a table at the end of the run.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings

from broker.server import BrokerServer
from tests.conftest import broker_settings
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.ollama_upstream import FakeModel, FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI

T = TypeVar("T")

settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
# Examples per test are `n * SCALE`: the ci counts add up to about 2,000.
SCALE = 10 if PROFILE == "long" else 1

# Every gRPC stack takes trailers up to 8 KiB (grpc's soft limit: over it, RESOURCE_EXHAUSTED
# at random); the broker's are meant to stay well under.
MAX_TRAILER_BYTES = 8 * 1024
NEVER = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})

OUTCOMES: Counter[tuple[str, str, str]] = Counter()

OPENAI_KEY = "sk-test-fuzz-openai-0c1d2e3f"
ANTHROPIC_KEY = "sk-ant-test-fuzz-9a8b7c6d"
MODELS = ("openai/gpt-4o-mini", "anthropic/claude-sonnet-4-5", "ollama/llava")


class LiveDaemon:
    """A BrokerServer and its fake upstreams on a loop in a thread; `target` is its address."""

    def __init__(self, **settings_extra: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-daemon", daemon=True)
        self.thread.start()
        self.settings_extra = settings_extra
        self.fakes: list[Any] = []
        self.server: BrokerServer | None = None
        self.target = ""

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        openai = await FakeOpenAI(api_key=OPENAI_KEY, models=["gpt-4o-mini"]).start()
        anthropic = await FakeAnthropic(api_key=ANTHROPIC_KEY).start()
        ollama = await FakeOllama(
            models=[FakeModel("llava", ("completion", "vision", "tools"), 32768)]
        ).start()
        self.fakes = [openai, anthropic, ollama]
        extra: dict[str, Any] = {
            "health": {"interval_seconds": 30, "timeout_seconds": 2},
            # Upstream refusals of odd-but-valid requests must not open breakers for the rest.
            "routing": {"retry": {"max_attempts": 1}, "breaker": {"enabled": False}},
        }
        extra.update(self.settings_extra)
        settings = broker_settings(
            [
                {"name": "openai", "type": "openai", "base_url": openai.url, "api_key": OPENAI_KEY},
                {
                    "name": "anthropic",
                    "type": "anthropic",
                    "base_url": anthropic.url,
                    "api_key": ANTHROPIC_KEY,
                },
                {"name": "ollama", "type": "ollama", "base_url": ollama.url},
            ],
            **extra,
        )
        self.server = BrokerServer(settings)
        port = await self.server.start("127.0.0.1:0")
        self.target = f"127.0.0.1:{port}"

    async def _stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
        for fake in self.fakes:
            await fake.stop()

    def start(self) -> LiveDaemon:
        self.run(self._start())
        return self

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[LiveDaemon, grpc.Channel]]:
    daemon = LiveDaemon().start()
    channel = grpc.insecure_channel(daemon.target)
    try:
        yield daemon, channel
        assert_alive(channel)
    finally:
        channel.close()
        daemon.stop()


def assert_alive(channel: grpc.Channel) -> None:
    """The daemon still answers grpc.health.v1 Check for the process itself."""
    stub = health_pb2_grpc.HealthStub(channel)
    answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


# --- reading an outcome ----------------------------------------------------------------------


def _percent_encoded_len(text: str) -> int:
    """grpc-message on the wire: bytes outside 0x20-0x7e and '%' take 3."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in text.encode())


def trailer_bytes(err: grpc.RpcError) -> int:
    """The trailers' size as HTTP/2 counts it (RFC 7541: name + value + 32 per entry), with
    -bin values base64-encoded and grpc-status / grpc-message added."""
    total = len("grpc-status") + 2 + 32
    total += len("grpc-message") + _percent_encoded_len(err.details() or "") + 32
    for key, value in err.trailing_metadata() or ():
        raw = value if isinstance(value, bytes) else value.encode()
        size = len(base64.b64encode(raw).rstrip(b"=")) if key.endswith("-bin") else len(raw)
        total += len(key) + size + 32
    return total


def details(
    err: grpc.RpcError,
) -> tuple[error_details_pb2.ErrorInfo | None, error_details_pb2.BadRequest | None]:
    info = bad = None
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            st = status_pb2.Status.FromString(value)
            for d in st.details:
                if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    d.Unpack(info)
                elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    d.Unpack(bad)
    return info, bad


def check_failure(err: grpc.RpcError, kind: str) -> tuple[grpc.StatusCode, str, list[str]]:
    """The properties every failure has: never INTERNAL/UNKNOWN, an ErrorInfo of the broker's
    domain, trailers under 8 KiB, a field path in BadRequest for each INVALID_REQUEST.
    Returns (code, reason, violation fields) and counts the outcome."""
    code = err.code()
    info, bad = details(err)
    reason = info.reason if info is not None else "-"
    OUTCOMES[(kind, code.name, reason)] += 1
    assert code not in NEVER, (code, err.details())
    assert "<class" not in (err.details() or ""), err.details()
    size = trailer_bytes(err)
    assert size < MAX_TRAILER_BYTES, (size, code, reason)
    assert info is not None and info.domain == "modelbroker", (code, err.details())
    fields: list[str] = []
    if info.reason == "INVALID_REQUEST":
        assert bad is not None and bad.field_violations, err.details()
        fields = [v.field for v in bad.field_violations]
        assert all(fields), fields
    return code, reason, fields


def count_ok(kind: str) -> None:
    OUTCOMES[(kind, "OK", "-")] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not OUTCOMES:
        return
    tr = terminalreporter
    tr.section(f"fuzz outcomes (profile {PROFILE}, {sum(OUTCOMES.values())} calls)")
    tr.write_line(f"{'kind':<28} {'status':<20} {'reason':<28} {'count':>7}")
    for (kind, code, reason), n in sorted(OUTCOMES.items()):
        tr.write_line(f"{kind:<28} {code:<20} {reason:<28} {n:>7}")
