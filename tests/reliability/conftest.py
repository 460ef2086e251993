"""Reliability suite helpers: outcomes of real RPCs, leak checks, and the report it prints.

Every test here runs a real grpc.aio daemon in front of fake upstreams on 127.0.0.1 and
bounds every wait. The fault matrix and the cancellation timings are collected in REPORT
and printed at the end of the run (pytest_terminal_summary), whatever `-s` says, so the
figures can be pasted into a closing note; they are also written to
<pytest basetemp>/reliability-report.md.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.server import BrokerServer
from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import (
    FAST_ROUTING as FAST_ROUTING,  # re-exported: the reliability tests import it from here
)
from tests.conftest import OPENAI_TEST_KEY


def openai_provider(name: str, url: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "type": "openai", "base_url": url, "api_key": OPENAI_TEST_KEY, **kw}


def refused_url() -> str:
    """A loopback URL nothing listens on (bound then closed: the kernel refuses connections)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def stub(channel: grpc.aio.Channel) -> pb_grpc.ModelBrokerStub:
    return pb_grpc.ModelBrokerStub(channel)


@dataclass
class Outcome:
    """What a caller saw: a status (name and ErrorInfo) and, for streams, the messages before it."""

    code: str = "OK"
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_delay: float | None = None
    provider: str = ""
    model: str = ""
    text: str = ""
    messages: list[pb.StreamCompleteResponse] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "OK" if self.code == "OK" else f"{self.code} {self.reason}"

    @property
    def deltas(self) -> int:
        return sum(1 for m in self.messages if m.HasField("text_delta"))


def _fill_error(out: Outcome, err: grpc.aio.AioRpcError) -> Outcome:
    out.code = err.code().name
    st = rpc_status.from_call(err)
    if st is not None:
        for d in st.details:
            if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                d.Unpack(info)
                out.reason, out.metadata = info.reason, dict(info.metadata)
            elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                d.Unpack(ri)
                out.retry_delay = ri.retry_delay.ToTimedelta().total_seconds()
    return out


async def unary(s: pb_grpc.ModelBrokerStub, req: pb.CompleteRequest, *, timeout: float = 10) -> Outcome:
    try:
        resp = await s.Complete(req, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        return _fill_error(Outcome(), err)
    return Outcome(
        provider=resp.provider, model=resp.model, text="".join(p.text for p in resp.message.content)
    )


async def stream(
    s: pb_grpc.ModelBrokerStub, req: pb.StreamCompleteRequest, *, timeout: float = 10
) -> Outcome:
    out = Outcome()
    try:
        async for m in s.StreamComplete(req, timeout=timeout):
            out.messages.append(m)
            if m.HasField("start"):
                out.provider, out.model = m.start.provider, m.start.model
            elif m.HasField("text_delta"):
                out.text += m.text_delta.text
    except grpc.aio.AioRpcError as err:
        return _fill_error(out, err)
    return out


async def until(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    """Poll `check` every 20 ms until it holds; fail naming `what` after `within` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not await check():
        if loop.time() >= end:
            raise AssertionError(f"not within {within:g}s: {what}")
        await asyncio.sleep(0.02)


def _foreign(task: asyncio.Task[Any]) -> bool:
    """Tasks that are not a leak: the test's own and the fakes' (in tests/), and grpc's acceptor.

    A grpc.aio server always keeps one task waiting for the next call
    (`_request_registered_call`); each RPC consumes it and starts its successor.
    """
    code = getattr(task.get_coro(), "cr_code", None)
    if code is not None and "/tests/" in code.co_filename:
        return True
    stack = task.get_stack(limit=1)
    return bool(stack) and stack[0].f_code.co_name == "_request_registered_call"


async def settled(server: BrokerServer, before: set[asyncio.Task[Any]], within: float = 3.0) -> list[str]:
    """Wait until no completion is in flight and no task started since `before` is alive.

    Returns the leftovers (empty when settled): in-flight count and leaked task names.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        leaked = [
            t
            for t in asyncio.all_tasks() - before
            if not t.done() and not _foreign(t) and t is not asyncio.current_task()
        ]
        if server.servicer.in_flight == 0 and not leaked:
            return []
        if loop.time() >= end:
            return [f"in_flight={server.servicer.in_flight}", *(repr(t.get_coro()) for t in leaked)]
        await asyncio.sleep(0.02)


# --- the report ----------------------------------------------------------------------------------


@dataclass
class Report:
    # fault -> (unary status, stream status, fallback used)
    matrix: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    # label -> milliseconds from the caller's cancel (or deadline) to the upstream seeing the close
    cancel_ms: dict[str, list[float]] = field(default_factory=dict)
    path: Path | None = None

    def render(self) -> list[str]:
        lines: list[str] = []
        if self.matrix:
            lines += [
                "Fault matrix (status alone -> with a fallback configured, when they differ)",
                "",
                "| fault | unary status | stream status | fallback used (unary / stream) |",
                "|---|---|---|---|",
            ]
            lines += [f"| {f} | {' | '.join(self.matrix[f])} |" for f in self.order if f in self.matrix]
        if self.cancel_ms:
            lines += ["", "Cancel/deadline -> upstream connection closed (as the fake upstream saw it)", ""]
            for label, values in self.cancel_ms.items():
                shown = ", ".join(f"{v:.1f}" for v in values)
                lines.append(f"- {label}: max {max(values):.1f} ms over {len(values)} runs ({shown} ms)")
        return lines

    def save(self, base: Path) -> None:
        self.path = base / "reliability-report.md"
        self.path.write_text("\n".join(self.render()) + "\n")


REPORT = Report()


@pytest.fixture
def report(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield REPORT
    REPORT.save(tmp_path_factory.getbasetemp())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = REPORT.render()
    if not lines:
        return
    terminalreporter.section("reliability report")
    for line in lines:
        terminalreporter.write_line(line)
    if REPORT.path is not None:
        terminalreporter.write_line(f"(also written to {REPORT.path})")
