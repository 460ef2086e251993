"""Hostile-suite machinery: a real `model-broker serve` per case, a hostile loopback upstream,
health polled and RSS sampled all along, and one result line per case.

`run_case` is the whole protocol of a case:

1. start a control upstream (a well-behaved FakeOpenAI) and the hostile one (`Hostile`: a
   vendor fake whose completion endpoint misbehaves; every other endpoint, discovery and
   health included, answers normally), both on 127.0.0.1:0, both bounded: at most
   `max_requests` hostile answers, each cut off after `max_seconds`, and the server stops
   itself after `lifetime` seconds whatever the test does;
2. start `python -m broker.cli serve` on 127.0.0.1:0 with providers `hostile` and `control`;
3. poll grpc.health.v1 Check for "" and "modelbroker.v1.ModelBroker" every 100 ms on a
   channel of its own, each call with a 1 s deadline, from before the hostile call until
   after the control call; sample the daemon's VmRSS from /proc every 20 ms;
4. make the hostile call (StreamComplete to hostile/<model>), then a normal call through
   the control provider, which must succeed: the daemon still serves;
5. SIGTERM the daemon, which must exit within 5 s; read its VmHWM (peak RSS) first.

The outcome is a `Result`; `Result.problems()` lists every way the case missed its
expectation (status, reason, time bound, RSS cap, health, control call, upstream left
open, exit), so a failure says all of it at once. Every result is printed as one line and
collected into the table printed at the end of the run (pytest_terminal_summary, whatever
`-s` says), also written to <pytest basetemp>/hostile-report.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import FAST_ROUTING, reason_of
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.http import Request, Response
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.procs import ServeDaemon, env_without, start_serve, write_config
from tests.procs import stop as stop_process

OPENAI_KEY = "sk-test-hostile-openai-7d41c09a"
ANTHROPIC_KEY = "sk-ant-test-hostile-52b8e1"
READINESS = "modelbroker.v1.ModelBroker"
SERVING = health_pb2.HealthCheckResponse.SERVING
HEALTH_BOUND = 1.0  # seconds: every health Check must answer within this, all along
EXIT_BOUND = 5.0  # seconds from SIGTERM to exit

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5", "ollama": "llama3.2"}
CHAT_PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "ollama": "/api/chat"}

# Fast retries and no breaker: the documented status of one call, not the breaker's.
ROUTING = FAST_ROUTING


# --- the hostile upstream ------------------------------------------------------------------------

Behaviour = Callable[[Request, Response, "Hostile"], Awaitable[None]]


class Hostile:
    """A vendor fake whose completion endpoint runs `behaviour`; bounded in count and time."""

    def __init__(
        self,
        vendor: str,
        behaviour: Behaviour,
        *,
        max_requests: int = 4,
        max_seconds: float = 20.0,
        lifetime: float = 60.0,
        ssl: Any = None,
    ) -> None:
        self.vendor = vendor
        self.behaviour = behaviour
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.lifetime = lifetime
        self.fake: Any
        if vendor == "openai":
            self.fake = FakeOpenAI(api_key=OPENAI_KEY, models=[MODELS["openai"]])
        elif vendor == "anthropic":
            self.fake = FakeAnthropic(api_key=ANTHROPIC_KEY)
        else:
            self.fake = FakeOllama(models=[MODELS["ollama"]])
        self.server = self.fake.server
        self.server.segmenter = None  # hostile bytes are written as the behaviour says
        self.server.ssl = ssl
        self.inner = self.server.handler  # the vendor fake's own answers
        self.server.handler = self._handle
        self.chat_requests: list[Request] = []
        self.active = 0  # hostile answers still being written
        self.bytes_sent = 0  # by behaviours that count (the lazy generators)
        self.cut_off = 0  # answers ended by max_seconds, not by the client
        self.last_end: float | None = None  # monotonic time the last hostile answer ended
        self._quiet = asyncio.Event()  # set while no hostile answer is being written
        self._quiet.set()
        self._guard: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return str(self.fake.url)

    @property
    def chat_path(self) -> str:
        return CHAT_PATHS[self.vendor]

    async def _handle(self, req: Request, resp: Response) -> None:
        if not (req.method == "POST" and req.path == self.chat_path):
            await self.inner(req, resp)
            return
        self.chat_requests.append(req)
        if len(self.chat_requests) > self.max_requests:
            await resp.send(503, {"error": {"message": "hostile fake: request budget spent", "type": "x"}})
            return
        self.active += 1
        self._quiet.clear()
        try:
            async with asyncio.timeout(self.max_seconds):
                await self.behaviour(req, resp, self)
        except TimeoutError:
            self.cut_off += 1
            resp.abort()
        finally:
            self.active -= 1
            self.last_end = time.monotonic()
            if self.active == 0:
                self._quiet.set()

    async def __aenter__(self) -> Hostile:
        await self.fake.start()
        self._guard = asyncio.create_task(self._stop_after(self.lifetime))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._guard is not None:
            self._guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._guard
        await self.fake.stop()

    async def _stop_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.fake.stop()

    async def idle(self, within: float) -> bool:
        """Whether every hostile answer has ended (the daemon closed its connection) within `within` s."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet.wait(), within)
        return self.active == 0


# --- the daemon as a process ---------------------------------------------------------------------


def _vm(pid: int, key: str) -> float | None:
    """A /proc/PID/status figure in MB (VmRSS, VmHWM), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Daemon(ServeDaemon):
    """`python -m broker.cli serve` in a subprocess: JSON log lines collected, RSS sampled."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        super().__init__(proc)
        self.start_rss = 0.0
        self.max_rss = 0.0
        self.peak_rss = 0.0
        self._sampler: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config: dict[str, Any], tmp_path: Path) -> Daemon:
        env = {
            k: v
            for k, v in env_without("OPENAI_", "ANTHROPIC_", "OLLAMA_", "MODEL_BROKER_").items()
            if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        }
        proc = await start_serve(write_config(config, tmp_path), env=env)
        daemon = cls(proc)
        waiter = asyncio.create_task(daemon.serving.wait())
        exited = asyncio.create_task(proc.wait())
        await asyncio.wait({waiter, exited}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not daemon.serving.is_set():
            await daemon.stop()
            raise AssertionError(f"the daemon did not start: {daemon.output_tail()}")
        exited.cancel()
        daemon.start_rss = _vm(proc.pid, "VmRSS") or 0.0
        daemon._sampler = asyncio.create_task(daemon._sample())
        return daemon

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _sample(self) -> None:
        while True:
            rss = _vm(self.proc.pid, "VmRSS")
            if rss is None:
                return
            self.max_rss = max(self.max_rss, rss)
            await asyncio.sleep(0.02)

    def output_tail(self, n: int = 12) -> str:
        lines = [json.dumps(e) for e in self.events[-n:]] + self.other[-n:]
        return "\n".join(lines) or "(no output)"

    async def stop(self) -> float | None:
        """SIGTERM; seconds to exit (None: it had to be killed after EXIT_BOUND). Reads peak RSS first."""
        if self._sampler is not None:
            self._sampler.cancel()
        self.peak_rss = max(_vm(self.proc.pid, "VmHWM") or 0.0, self.max_rss)
        took: float | None = 0.0
        if self.proc.returncode is None:
            t0 = time.monotonic()
            took = time.monotonic() - t0 if await stop_process(self.proc, EXIT_BOUND) else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 2)
        self._reader.cancel()
        return took


# --- health, polled all along --------------------------------------------------------------------


class HealthWatch:
    """Check "" and the readiness service every 100 ms, each within HEALTH_BOUND."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.checks = 0
        self.slowest = 0.0
        self.problems: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HealthWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.channel.close()

    async def _run(self) -> None:
        while True:
            for service in ("", READINESS):
                t0 = time.monotonic()
                try:
                    resp = await self.stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=HEALTH_BOUND
                    )
                except grpc.aio.AioRpcError as err:
                    self.problems.append(
                        f"health {service!r}: {err.code().name} after {time.monotonic() - t0:.2f}s"
                    )
                    continue
                took = time.monotonic() - t0
                self.checks += 1
                self.slowest = max(self.slowest, took)
                if resp.status != SERVING:
                    # The control provider keeps the daemon ready whatever the hostile one does.
                    self.problems.append(
                        f"health {service!r}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
                    )
            await asyncio.sleep(0.1)


# --- one call --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: str = "OK"
    reason: str = ""
    details: str = ""
    seconds: float = 0.0
    text: str = ""
    end: pb.StreamEnd | None = None

    @property
    def status(self) -> str:
        return f"{self.code} {self.reason}".strip()


async def call(
    s: pb_grpc.ModelBrokerStub, model: str, deadline: float, on_text: Callable[[], None] | None = None
) -> Outcome:
    out = Outcome()
    req = pb.StreamCompleteRequest(
        model=model, messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])]
    )
    t0 = time.monotonic()
    try:
        async for m in s.StreamComplete(req, timeout=deadline):
            if m.HasField("text_delta"):
                out.text += m.text_delta.text
                if on_text is not None:
                    on_text()
            elif m.HasField("end"):
                out.end = m.end
    except grpc.aio.AioRpcError as err:
        out.code, out.reason, out.details = err.code().name, reason_of(err), err.details() or ""
    out.seconds = time.monotonic() - t0
    return out


# --- a case ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    statuses: tuple[str, ...]  # acceptable "CODE REASON" (or "OK", or a bare code)
    within: float  # seconds for the hostile call to end
    rss_cap_mb: float
    deadline: float = 10.0  # the caller's deadline on the hostile call
    # The daemon must have closed the hostile upstream connection within 2 s of the call's end.
    closes_upstream: bool = True
    details_has: tuple[str, ...] = ()  # words the status message must contain (lower-cased)


@dataclass
class Result:
    case: str
    expect: Expect
    outcome: Outcome
    start_rss: float
    peak_rss: float
    health_checks: int
    health_slowest: float
    health_problems: list[str]
    control: Outcome
    upstream_closed: bool
    hostile_requests: int
    exit_seconds: float | None
    # Seconds from the call's end (as the caller saw it) to the hostile answer ending, i.e. the
    # daemon closing that connection (negative: it closed it before the caller had the status).
    close_lag: float | None = None
    extra: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        out: list[str] = []
        o, e = self.outcome, self.expect
        if o.status not in e.statuses and o.code not in e.statuses:
            out.append(f"status {o.status!r} ({o.details}), expected one of {e.statuses}")
        if o.seconds > e.within:
            out.append(f"took {o.seconds:.2f}s, bound {e.within:g}s")
        for word in e.details_has:
            if word not in o.details.lower():
                out.append(f"message {o.details!r} does not mention {word!r}")
        if self.peak_rss > e.rss_cap_mb:
            out.append(f"peak RSS {self.peak_rss:.0f} MB over the {e.rss_cap_mb:g} MB cap")
        if self.health_checks == 0:
            out.append("no health check answered")
        out += self.health_problems[:5]
        if self.control.code != "OK" or self.control.text != CONTROL_TEXT:
            out.append(f"the control call after the case: {self.control.status} {self.control.text!r}")
        if e.closes_upstream and not self.upstream_closed:
            out.append("the hostile upstream connection was still open 2 s after the call ended")
        if self.exit_seconds is None:
            out.append(f"the daemon did not exit within {EXIT_BOUND:g}s of SIGTERM")
        return out + self.extra

    def line(self) -> str:
        return (
            f"hostile | {self.case} | {self.outcome.status} | {self.outcome.seconds:.2f}s | "
            f"peak RSS {self.peak_rss:.0f} MB (start {self.start_rss:.0f}) | "
            f"health {self.health_checks} checks, slowest {self.health_slowest * 1000:.0f} ms | "
            f"upstream closed {self._closed()} | {self.outcome.details[:160]!r}"
        )

    def _closed(self) -> str:
        if not self.upstream_closed:
            return "NO"
        return "yes" if self.close_lag is None else f"yes ({self.close_lag:+.2f} s)"

    def row(self) -> str:
        e = self.expect
        verdict = "ok" if not self.problems() else "FAIL: " + "; ".join(self.problems())
        return (
            f"| {self.case} | {' or '.join(e.statuses)} | {self.outcome.status} | "
            f"{self.outcome.seconds:.2f} s (bound {e.within:g}) | {self.peak_rss:.0f} MB (cap {e.rss_cap_mb:g}) | "
            f"{self.health_slowest * 1000:.0f} ms | {self._closed()} | {verdict} |"
        )


CONTROL_TEXT = "still serving"


async def run_case(
    tmp_path: Path,
    case: str,
    up: Hostile,
    expect: Expect,
    *,
    provider: dict[str, Any] | None = None,
    on_text: Callable[[], None] | None = None,
) -> Result:
    """Run one hostile case end to end (see the module docstring); the Result is also reported."""
    async with asyncio.timeout(expect.deadline + 40):
        control = FakeOpenAI(api_key=OPENAI_KEY, models=["gpt-4o-mini"])
        control.reply = Reply(text_chunks=["still ", "serving"])
        async with control, up:
            key = {"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY}.get(up.vendor)
            hostile_cfg: dict[str, Any] = {
                "name": "hostile",
                "type": up.vendor,
                "base_url": up.url,
                "models": [MODELS[up.vendor]],
                "priority": 10,
                **({"api_key": key} if key else {}),
                **(provider or {}),
            }
            config = {
                "providers": [
                    hostile_cfg,
                    {
                        "name": "control",
                        "type": "openai",
                        "base_url": control.url,
                        "api_key": OPENAI_KEY,
                        "models": ["gpt-4o-mini"],
                        "priority": 20,
                    },
                ],
                "health": {"interval_seconds": 30, "timeout_seconds": 1},
                "routing": ROUTING,
                "server": {"shutdown_grace_seconds": 1},
            }
            daemon = await Daemon.start(config, tmp_path)
            try:
                async with (
                    HealthWatch(daemon.target) as health,
                    grpc.aio.insecure_channel(daemon.target) as ch,
                ):
                    s = pb_grpc.ModelBrokerStub(ch)
                    await _until_ready(health)
                    outcome = await call(s, f"hostile/{MODELS[up.vendor]}", expect.deadline, on_text)
                    call_end = time.monotonic()
                    closed = await up.idle(2.0)
                    close_lag = None if up.last_end is None else up.last_end - call_end
                    control_out = await call(s, "control/gpt-4o-mini", 5)
                    await asyncio.sleep(0.25)  # a last health poll or two after everything
            finally:
                exit_seconds = await daemon.stop()
    result = Result(
        case=case,
        expect=expect,
        outcome=outcome,
        start_rss=daemon.start_rss,
        peak_rss=daemon.peak_rss,
        health_checks=health.checks,
        health_slowest=health.slowest,
        health_problems=health.problems,
        control=control_out,
        upstream_closed=closed,
        hostile_requests=len(up.chat_requests),
        exit_seconds=exit_seconds,
        close_lag=close_lag,
    )
    REPORT.append(result)
    print(result.line())
    return result


async def _until_ready(health: HealthWatch) -> None:
    """Until the readiness service answers SERVING (the control provider's first check passed)."""
    for _ in range(100):
        with contextlib.suppress(grpc.aio.AioRpcError):
            resp = await health.stub.Check(health_pb2.HealthCheckRequest(service=READINESS), timeout=1)
            if resp.status == SERVING:
                health.problems.clear()  # not-ready answers before this moment are start-up
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the daemon never became ready")


# --- the report ----------------------------------------------------------------------------------

REPORT: list[Result] = []


def render() -> list[str]:
    if not REPORT:
        return []
    lines = [
        "| case | expected | got | time (bound) | peak RSS (cap) | slowest health Check | upstream closed | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return lines + [r.row() for r in REPORT]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = render()
    if not lines:
        return
    terminalreporter.section("hostile-upstream report")
    for line in lines:
        terminalreporter.write_line(line)
    path = Path(str(terminalreporter.config._tmp_path_factory.getbasetemp())) / "hostile-report.md"
    with contextlib.suppress(OSError):
        path.write_text("\n".join(lines) + "\n")
        terminalreporter.write_line(f"(also written to {path})")


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon gets no proxy from the environment; the fakes are on loopback."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
