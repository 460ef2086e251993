"""Instructions per request through the daemon, counted by callgrind: the figure to compare changes by.

CPU time on a shared 2-core VM drifts by 20% and more between runs of the same code;
callgrind's instruction count (Ir) for the same interpreter, libraries and requests repeats
to ~0.5%, whatever else the machine does. So performance changes are judged here first and
confirmed in seconds by `make bench`.

Each row starts `bench.upstream` and the daemon (or the bare grpc.aio floor, `bench.null_server`)
under `valgrind --tool=callgrind`, warms it up with 60 calls, zeroes the counters, sends N
calls one at a time from a grpc.aio client, dumps, and divides. Everything listens on
127.0.0.1; each row ends by itself (SIGTERM, then SIGKILL after 120 s).

    python -m bench.instructions [--rows unary,stream20,...] [--n 300] [--keep DIR]

writes bench/results/instructions.json; --keep DIR leaves the callgrind files for
callgrind_annotate.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "instructions.json"


@dataclass(frozen=True)
class Row:
    name: str
    what: str  # "unary", "stream" or "embed"
    model: str
    floor: bool = False  # the bare grpc.aio server instead of the daemon


ROWS = {
    r.name: r
    for r in (
        Row("floor_unary", "unary", "bench-1", floor=True),
        Row("unary", "unary", "up/bench-1"),
        Row("floor_stream20", "stream", "bench-20", floor=True),
        Row("stream20", "stream", "up/bench-20"),
        Row("stream200", "stream", "up/bench-200"),
        Row("reasoning20", "stream", "up/bench-think-20-20"),
        Row("embed16", "embed", "up/text-embedding-3-small"),
    )
}
DEFAULT_ROWS = ("floor_unary", "unary", "floor_stream20", "stream20", "embed16")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _control(command: str, pid: int) -> None:
    """callgrind_control COMMAND PID; nothing else runs meanwhile (the client waits for it)."""
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control",
        command,
        str(pid),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"callgrind_control {command} {pid} failed: {err.decode(errors='replace')}")


async def _drive(target: str, row: Row, n: int, pid: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ModelBrokerStub(channel)
        msgs = [pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])]
        req = pb.CompleteRequest(model=row.model, messages=msgs)
        sreq = pb.StreamCompleteRequest(model=row.model, messages=msgs)
        ereq = pb.EmbedRequest(model=row.model, inputs=[f"input {i}" for i in range(16)])

        async def one() -> None:
            if row.what == "embed":
                await stub.Embed(ereq, timeout=60)
            elif row.what == "stream":
                async for _ in stub.StreamComplete(sreq, timeout=60):
                    pass
            else:
                await stub.Complete(req, timeout=60)

        started = time.monotonic()
        while True:  # valgrind makes the daemon's start take a while
            try:
                await one()
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() - started > 240:
                    raise
                await asyncio.sleep(0.5)
        for _ in range(60):
            await one()
        await _control("--zero", pid)
        for _ in range(n):
            await one()
        await _control("--dump=measured", pid)


def measure(row: Row, n: int, keep: Path | None) -> float:
    """Instructions per call for one row (thousands)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'clients' / 'python'}"}
    up = subprocess.Popen(
        [sys.executable, "-m", "bench.upstream"], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env
    )
    work = Path(tempfile.mkdtemp(prefix="mb-instr-"))
    daemon: subprocess.Popen[bytes] | None = None
    try:
        assert up.stdout is not None
        port = next(int(line.split()[1]) for line in up.stdout if line.startswith("PORT "))
        listen = f"127.0.0.1:{_free_port()}"
        if row.floor:
            cmd = [sys.executable, "-m", "bench.null_server", "--port", listen.rsplit(":", 1)[1]]
        else:
            cfg = work / "config.yaml"
            cfg.write_text(
                "providers:\n  - name: up\n    type: openai\n"
                f"    base_url: http://127.0.0.1:{port}/v1\n    api_key: sk-bench-0123456789\n"
            )
            cmd = [sys.executable, "-m", "broker.cli", "serve", "--config", str(cfg), "--listen", listen]
        out = work / "callgrind.out"
        daemon = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        asyncio.run(_drive(listen, row, n, daemon.pid))
        for path in glob.glob(f"{out}*"):
            with open(path) as f:
                head = f.read(4000)
                if "Trigger: dump measured" not in head:
                    continue
                f.seek(0)
                total = next(int(line.split()[1]) for line in f if line.startswith("summary:"))
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, keep / f"callgrind.{row.name}.out")
            return total / n / 1000
        raise RuntimeError(f"{row.name}: callgrind wrote no measured dump")
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(120)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        up.terminate()
        up.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"of {', '.join(ROWS)}")
    ap.add_argument("--n", type=int, default=300, help="measured calls per row")
    ap.add_argument("--keep", type=Path, default=None, help="keep the callgrind files here")
    args = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print(
            "bench.instructions: valgrind is not installed (make bench-instructions installs it)",
            file=sys.stderr,
        )
        return 2
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        print(f"bench.instructions: unknown rows {unknown}; known: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    results: dict[str, float] = {}
    for name in names:
        results[name] = measure(ROWS[name], args.n, args.keep)
        print(f"{name:>16}: {results[name]:8,.0f} k instructions per call", flush=True)
    for what in ("unary", "stream20"):
        if what in results and f"floor_{what}" in results:
            print(f"{what:>16}: {results[what] / results['floor_' + what]:.2f}x the bare grpc.aio floor")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"n": args.n, "k_instructions_per_call": results}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
