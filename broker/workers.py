"""`serve --workers N`: N daemon processes on one port under one supervising parent.

One grpc.aio process uses one core; this spreads callers over N of them without a proxy.

- Port: the parent binds HOST:PORT itself with SO_REUSEPORT (so port 0 becomes a real port
  every worker can share) and keeps that socket bound but not listening, which reserves the
  port for restarted workers and never receives connections. Each worker is a fresh
  `model-broker serve --worker-index I` process binding the same port with
  `grpc.so_reuseport=1`; the kernel spreads new connections over the listening workers.
- Signals: SIGTERM or SIGINT to the parent is forwarded as SIGTERM to every worker, and each
  drains exactly as a single daemon does (health NOT_SERVING, in-flight streams get
  `server.shutdown_grace_seconds`). The parent exits 0 when every worker did. Its handlers
  are in place before it reserves the port or starts a worker, and a worker's before it
  binds, so a signal during start-up is a drain too. In Kubernetes
  the parent is the container's main process, so the kubelet's SIGTERM reaches it. A
  worker whose parent dies without forwarding (SIGKILL) sees it reparented within a second
  and drains the same way (`exit_with_parent`).
- Supervision: a worker that exits while the parent is not stopping is restarted after
  RESTART_DELAY_SECONDS; one that exits with an error code within STARTUP_WINDOW_SECONDS
  of being started (bad config, port taken, unreadable certificate) stops the whole group
  with exit 1, so a broken deployment fails fast instead of restarting forever.
- Health: every worker runs its own provider checks and health service; a probe lands on
  one of them and they all answer alike.
- Metrics: workers write samples to PROMETHEUS_MULTIPROC_DIR (prometheus_client's
  multiprocess mode; a temporary directory unless the operator sets one, whose *.db files
  are cleared at start as prometheus_client requires) and the parent alone serves
  `metrics.listen`, summing counters and histograms over workers. Gauges are live-only: when
  a worker exits the parent marks it dead so its in-flight streams and health drop out.
  Counters from exited workers are kept, so totals never go backwards on a restart.
- Logs: every worker line carries `worker` (its index) and `pid`; all processes write to
  the parent's stderr, one JSON line per write.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

import structlog
from prometheus_client import multiprocess

from broker.config import ConfigError, Settings, parse_listen
from broker.metrics import MetricsServer, multiprocess_registry
from broker.tls import server_credentials

log = structlog.get_logger("broker.workers")

STARTUP_WINDOW_SECONDS = 5.0
RESTART_DELAY_SECONDS = 1.0
# After the drain grace, how long the parent waits before killing a worker that hangs.
KILL_MARGIN_SECONDS = 10.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket on host:port (port 0: a free port)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def format_listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Supervisor:
    def __init__(
        self, args: argparse.Namespace, settings: Settings, workers: int, signalled: list[int] | None = None
    ) -> None:
        self.args = args
        self.settings = settings
        self.n = workers
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.started_at: dict[int, float] = {}
        self.stopping = asyncio.Event()
        # Signals that arrived before the loop ran (the CLI caught them): a stop like any other.
        self.signalled = signalled if signalled is not None else []
        self.failed = False
        self.listen = ""
        self.metrics_dir = ""
        self.env: dict[str, str] = {}

    def worker_argv(self, index: int) -> list[str]:
        argv = [sys.executable, "-m", "broker.cli", "serve", "--listen", self.listen]
        argv += ["--worker-index", str(index), "--workers", "1", "--log-level", self.args.log_level]
        if self.args.config:
            argv += ["--config", str(self.args.config)]
        elif self.args.preset:
            argv += ["--preset", self.args.preset]
        return argv  # without either, the worker reads MODEL_BROKER_CONFIG or the environment, as we did

    async def spawn(self, index: int) -> None:
        # The worker starts with SIGTERM/SIGINT blocked (the mask survives exec) and unblocks
        # them once its handlers are in (cli.py), so a stop forwarded while it is still
        # importing is handled as a drain (exit 0), not a kill by the default action.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.worker_argv(index), stdin=asyncio.subprocess.DEVNULL, env=self.env
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.procs[index] = proc
        self.started_at[index] = time.monotonic()

    async def watch(self, index: int) -> None:
        """Wait for worker `index` to exit; restart it unless the group is stopping."""
        while True:
            proc = self.procs[index]
            code = await proc.wait()
            multiprocess.mark_process_dead(proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            if self.stopping.is_set():
                return
            # Exiting with an error code right after start is the daemon refusing its config or
            # port; being killed by a signal (OOM killer, an operator) is not, so it restarts.
            quick = time.monotonic() - self.started_at[index] < STARTUP_WINDOW_SECONDS
            if quick and code > 0:
                log.error("worker_failed_at_start", worker=index, worker_pid=proc.pid, exit_code=code)
                self.failed = True
                self.stopping.set()
                return
            log.warning(
                "worker_exited", worker=index, worker_pid=proc.pid, exit_code=code, restart_in_seconds=1
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), RESTART_DELAY_SECONDS)
            if self.stopping.is_set():
                return
            await self.spawn(index)
            log.info("worker_restarted", worker=index, worker_pid=self.procs[index].pid)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        if self.signalled:
            self.stopping.set()
        host, port = parse_listen(self.args.listen or self.settings.server.listen)
        try:
            reserved = reserve_port(host, port)
        except OSError as exc:
            print(
                f"model-broker: cannot listen on {format_listen(host, port)}: {exc.strerror}", file=sys.stderr
            )
            return 1
        try:
            return await self._run_with_port(reserved, host)
        finally:
            reserved.close()

    async def _run_with_port(self, reserved: socket.socket, host: str) -> int:
        self.listen = format_listen(host, reserved.getsockname()[1])
        if self.settings.tls.enabled:
            server_credentials(self.settings.tls)  # fail once here, not N times in the workers
        own_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
            prefix="model-broker-metrics-"
        )
        for stale in glob.glob(os.path.join(self.metrics_dir, "*.db")):
            os.remove(stale)  # samples of a previous run would be added to this one's
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        metrics_server = None
        try:
            if self.settings.metrics.listen:
                metrics_server = MetricsServer(
                    self.settings.metrics.listen, multiprocess_registry(self.metrics_dir)
                )
            return await self._supervise(metrics_server)
        finally:
            if metrics_server is not None:
                await metrics_server.close()
            if own_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _supervise(self, metrics_server: MetricsServer | None) -> int:
        for i in range(self.n):
            if self.stopping.is_set():
                break  # stopped while starting: the workers already started drain below
            await self.spawn(i)
        watchers = [asyncio.create_task(self.watch(i), name=f"watch-worker-{i}") for i in self.procs]
        log.info(
            "serving",
            listen=self.listen,
            pid=os.getpid(),
            workers=self.n,
            worker_pids=[p.pid for p in self.procs.values()],
            metrics=f"{metrics_server.host}:{metrics_server.port}" if metrics_server else "",
            metrics_dir=self.metrics_dir,
        )
        await self.stopping.wait()
        if not self.failed:
            log.info("shutdown_requested", grace_seconds=self.settings.server.shutdown_grace_seconds)
        codes = await self._stop_workers()
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        ok = not self.failed and all(c == 0 for c in codes)
        log.info("stopped", pid=os.getpid(), worker_exit_codes=codes)
        return 0 if ok else 1

    async def _stop_workers(self) -> list[int]:
        """SIGTERM every worker (each drains), then wait; kill any that outlive the grace."""
        live = [p for p in self.procs.values() if p.returncode is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        limit = self.settings.server.shutdown_grace_seconds + KILL_MARGIN_SECONDS
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), limit)
        except TimeoutError:
            for p in live:
                if p.returncode is None:
                    log.error("worker_killed", worker_pid=p.pid, after_seconds=limit)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in live))
        return [p.returncode if p.returncode is not None else -1 for p in self.procs.values()]


async def exit_with_parent(poll_seconds: float = 1.0) -> None:
    """In a worker: drain and exit if the supervising parent dies (e.g. SIGKILL), instead of
    serving on as an orphan nobody will stop. Reparenting changes getppid()."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(poll_seconds)
        if os.getppid() != parent:
            log.warning("parent_gone", parent_pid=parent)
            os.kill(os.getpid(), signal.SIGTERM)  # the normal drain path
            return


def supervise(args: argparse.Namespace, settings: Settings, *, signalled: list[int] | None = None) -> int:
    """Run `args.workers` workers until SIGTERM/SIGINT; the exit code for `serve`."""
    try:
        return asyncio.run(Supervisor(args, settings, args.workers, signalled).run())
    except ConfigError as exc:
        print(f"model-broker: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"model-broker: {exc}", file=sys.stderr)
        return 1
