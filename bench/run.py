"""`make bench`: the same workloads direct, through the broker and through two peers, in one run.

    .venv/bin/python -m bench.run [--quick] [--only direct,broker,...] [--skip-litellm] [--skip-portkey]
    BENCH_QUICK=1 .venv/bin/python -m bench.run      every workload, very briefly (under a minute)

Starts, each in its own process and on 127.0.0.1 only (bench.servers): the fast fake
upstream (bench.upstream), the daemon (`model-broker serve`, as an operator runs it) and a
second daemon with `--workers 2`, LiteLLM's proxy and Portkey's gateway (the peers: a peer
not installed is a note, and the run carries on), and a do-nothing gRPC server
(bench.null_server), the floor under the broker. Each workload is run by a fresh load
generator process (bench.loadgen) against each way in turn, so that the ways are measured
minutes apart at most. The runner samples the CPU time of every server in exactly the
window the load generator measured, and the daemon's memory while streams are held open.

Prints a markdown table and writes bench/results/bench.json and bench/results/bench.png
(a run narrowed by --only or --workloads: bench/results/partial/, so that it never replaces
a whole run's files).

`--quick` (or BENCH_QUICK=1) proves the harness end to end in ~35 s: every workload on every
way, with 0.2 s windows (held open until each way has answered QUICK_MIN_OK times, 10 s at
most), held streams cut to a twentieth (at least 100) at 25 ms gaps, each peer in a lane of
its own running beside ours; it exits 1 when any run had an error or no answer, and writes
to bench/results/quick/. Its figures are not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import report
from bench.procs import Proc, cpu_seconds, rss_bytes, tree, worker_pids
from bench.servers import (
    BENCH_KEY,
    LITELLM_PIN,
    PORTKEY_PIN,
    PY,
    ROOT,
    Launch,
    Server,
    launch_broker,
    launch_litellm,
    launch_null,
    launch_portkey,
    start_upstream,
)

RESULTS = ROOT / "bench" / "results"
# LiteLLM is the slowest way by far: a workload gets this long past its windows before its generator is stopped.
LOADGEN_GRACE_S = 90.0
PEERS = ("litellm", "portkey")
ALL_WAYS = ("direct", "broker", "broker-w2", "litellm", "portkey", "grpc-null")
DEFAULT_WAYS = ("direct", "broker", "litellm", "portkey", "grpc-null")
# Sockets a process needs beyond one per held stream (the runtime's own, logs, pipes).
FD_MARGIN = 1024


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # unary | stream | hold | embed (chunks = inputs per call)
    chunks: int
    concurrency: int
    warmup: float = 1.0
    duration: float = 5.0
    hold_gap_ms: int = 0
    reasoning: int = 0  # reasoning chunks before the content (bench-think-R-N)
    channels: int = 0  # gRPC connections; 0: 4 above 64 callers, else 1
    deadline: float = 60.0  # hold: streams still open after this are errors
    ways: tuple[str, ...] = DEFAULT_WAYS

    def model(self) -> str:
        if self.kind == "hold":
            return f"bench-hold-{self.chunks}-{self.hold_gap_ms}"
        if self.reasoning:
            return f"bench-think-{self.reasoning}-{self.chunks}"
        return f"bench-{self.chunks}"

    def grpc_channels(self) -> int:
        return self.channels or (4 if self.concurrency > 64 else 1)


HOLD_WAYS = ("direct", "broker", "litellm", "portkey")
WORKERS_WAYS = ("broker", "broker-w2")
WORKLOADS = [
    Workload("unary_c1", "unary", 1, 1, warmup=1.0, duration=5.0),
    Workload("unary_c32", "unary", 1, 32),
    Workload("unary_c256", "unary", 1, 256),
    Workload("stream20_c1", "stream", 20, 1, warmup=0.5, duration=4.0),
    Workload("stream200_c1", "stream", 200, 1, warmup=0.5, duration=4.0),
    Workload("stream20_c32", "stream", 20, 32),
    Workload("stream200_c32", "stream", 200, 32),
    # A reasoning model's stream: 20 reasoning deltas, then 20 of text (both checked).
    Workload("reason20_c1", "stream", 20, 1, reasoning=20, warmup=0.5, duration=4.0),
    Workload("reason20_c32", "stream", 20, 32, reasoning=20),
    # 1,000 streams held open together: 20 chunks 250 ms apart, so each lasts about 5 s.
    Workload("hold1000", "hold", 20, 1000, hold_gap_ms=250, ways=HOLD_WAYS),
    # 10,000 at once (where the open-file limit allows): 20 chunks 3 s apart, 60 s each, so
    # that all are open together although opening them takes the daemon ~20 s (1,000 took
    # 1.9 s); 16 gRPC connections.
    Workload(
        "hold10000",
        "hold",
        20,
        10_000,
        hold_gap_ms=3000,
        channels=16,
        deadline=150,
        # The floor too: a bare grpc.aio server holding the same streams shows what grpc alone
        # loses to the burst (CANCELLED before any handler runs), apart from the broker's cost.
        ways=("direct", "broker", "grpc-null"),
    ),
    # Embeddings: 16 inputs per call (256 floats each), direct POST /v1/embeddings vs the Embed RPC.
    Workload("embed16_c1", "embed", 16, 1, warmup=0.5, duration=4.0, ways=("direct", "broker")),
    Workload("embed16_c32", "embed", 16, 32, ways=("direct", "broker")),
    # `serve --workers 2` against one worker under the same load, over 16 connections so that
    # the kernel's SO_REUSEPORT hash has something to spread over the two workers.
    Workload("workers_unary_c32", "unary", 1, 32, channels=16, ways=WORKERS_WAYS),
    Workload("workers_stream20_c32", "stream", 20, 32, channels=16, ways=WORKERS_WAYS),
]


def quick(w: Workload) -> Workload:
    """The same workload, just long enough to show every part works (BENCH_QUICK)."""
    if w.kind == "hold":
        return replace(w, concurrency=max(w.concurrency // 20, 100), hold_gap_ms=25, deadline=20)
    return replace(w, warmup=0.05, duration=0.2)


# A quick run's window stays open until each way has answered this many, for this long at most.
QUICK_MIN_OK = 3
QUICK_MIN_OK_WAIT_S = 10.0


def run_workload(w: Workload, server: Server, upstream: Server, *, min_ok: int = 0) -> dict[str, Any]:
    """One load generator process against one way; server CPU and memory sampled in its window."""
    argv = [
        PY, "-m", "bench.loadgen",
        "--proto", server.proto,
        "--target", server.target,
        "--kind", w.kind,
        "--model", server.model_prefix + w.model(),
        "--concurrency", str(w.concurrency),
        "--warmup", str(w.warmup),
        "--duration", str(w.duration),
        "--api-key", BENCH_KEY,
        "--deadline", str(w.deadline),
    ]  # fmt: skip
    if server.proto == "grpc":
        argv += ["--channels", str(w.grpc_channels())]
    for header in server.headers:
        argv += ["--header", header]
    if min_ok:
        argv += ["--min-ok", str(min_ok), "--min-ok-wait", str(QUICK_MIN_OK_WAIT_S)]
    tmp = Path(server.proc.log_path).parent
    started = time.monotonic()
    gen = Proc(
        f"loadgen-{w.name}-{server.name}", argv, log=tmp / f"loadgen-{w.name}-{server.name}.log", cwd=ROOT
    )
    # The process trees once, before the window: reading a few stat files at each mark is
    # then quick, where a scan of /proc on a busy machine can take longer than a short window.
    workers = worker_pids(server.proc.pid) if server.name.startswith("broker-w") else []
    watched = {"server": tree(server.proc.pid), "upstream": tree(upstream.proc.pid)} | {
        f"worker{i}": tree(pid) for i, pid in enumerate(workers)
    }
    rss0 = rss_bytes(watched["server"])
    cpu0: dict[str, float] = {}
    cpu1: dict[str, float] = {}
    rss_peak = rss0
    t0 = wall = 0.0
    result: dict[str, Any] | None = None
    window = (
        w.deadline if w.kind == "hold" else w.warmup + w.duration + (QUICK_MIN_OK_WAIT_S if min_ok else 0)
    )
    deadline = time.monotonic() + window + LOADGEN_GRACE_S
    while time.monotonic() < deadline:
        try:
            line = gen.lines.get(timeout=0.05)
        except Exception:
            line = ""
        if w.kind == "hold" and cpu0 and not cpu1:
            rss_peak = max(rss_peak, rss_bytes(watched["server"]))
        if line is None:
            break
        if line == "MARK start":
            t0 = time.monotonic()
            cpu0 = {k: cpu_seconds(p) for k, p in watched.items()}
        elif line == "MARK end":
            wall = time.monotonic() - t0
            cpu1 = {k: cpu_seconds(p) for k, p in watched.items()}
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    gen.stop(5)
    if result is not None:
        result["run_wall_s"] = time.monotonic() - started  # the generator's life, start-up included
    if result is None:
        return {"ok": 0, "errors": 1, "error_samples": [f"load generator gave no result:\n{gen.tail()}"]}
    if cpu0 and cpu1:
        for k in watched:
            result[f"{k}_cpu_pct"] = 100.0 * (cpu1[k] - cpu0[k]) / wall
        result["server_cpu_s"] = cpu1["server"] - cpu0["server"]
        if result.get("ok"):
            # Daemon CPU per completed request: what the HTTP client and everything else cost.
            result["server_cpu_us_per_req"] = 1e6 * result["server_cpu_s"] / result["ok"]
    result["server_rss_mb"] = rss_bytes(watched["server"]) / 2**20
    if w.kind == "hold":
        result["server_rss_mb_before"] = rss0 / 2**20
        result["server_rss_mb_peak"] = rss_peak / 2**20
        if result.get("max_open"):
            result["server_kb_per_open_stream"] = (rss_peak - rss0) / 1024 / result["max_open"]
    if w.kind == "stream":
        result["chunks_per_s"] = (
            result.get("ok", 0) * w.chunks / result["elapsed_s"] if result.get("elapsed_s") else 0
        )
        result["messages_per_stream"] = result["messages"] / result["ok"] if result.get("ok") else None
        if result.get("server_cpu_s"):
            result["chunks_per_server_cpu_s"] = result["ok"] * w.chunks / result["server_cpu_s"]
    return result


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (every server and generator inherits it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _node_version() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    done = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10, check=False)
    return done.stdout.strip() or None


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import grpc

    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "litellm": LITELLM_PIN,
        "portkey": PORTKEY_PIN,
        "node": _node_version(),
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
    }


def launch_all(
    tmp: Path, upstream: Server, ways: list[str], workloads: list[Workload], notes: list[str]
) -> dict[str, Launch]:
    """Every server the run needs, started together (LiteLLM's import is the long pole)."""
    needed = {way for w in workloads for way in w.ways if way in ways}
    launches: dict[str, Launch] = {}
    if "litellm" in needed:
        ll = launch_litellm(tmp, upstream, [w.model() for w in workloads if "litellm" in w.ways])
        if isinstance(ll, str):
            notes.append(ll)
        else:
            launches["litellm"] = ll
    if "portkey" in needed:
        pk = launch_portkey(tmp, upstream)
        if isinstance(pk, str):
            notes.append(pk)
        else:
            launches["portkey"] = pk
    if "broker" in needed:
        launches["broker"] = launch_broker(tmp, upstream)
    if "broker-w2" in needed:
        launches["broker-w2"] = launch_broker(tmp, upstream, workers=2)
    if "grpc-null" in needed:
        launches["grpc-null"] = launch_null(tmp)
    return launches


def server_for(way: str, launches: dict[str, Launch], notes: list[str]) -> Server | None:
    launch = launches.get(way)
    if launch is None:
        return None
    first = launch.result is None
    got = launch.wait()
    if isinstance(got, str):
        if first:
            notes.append(got)
            print(f"NOTE: {got}\nThe run carries on without {way}.", flush=True)
        return None
    return got


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated ways: " + ",".join(ALL_WAYS))
    p.add_argument("--workloads", default="", help="comma-separated workload names")
    p.add_argument("--skip-litellm", action="store_true")
    p.add_argument("--skip-portkey", action="store_true")
    p.add_argument("--quick", action="store_true", help="every workload very briefly (also BENCH_QUICK=1)")
    p.add_argument("--keep-logs", action="store_true", help="copy the servers' logs to bench/results/logs")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where bench.json and bench.png go (default bench/results; quick: bench/results/quick; "
        "narrowed by --only or --workloads: bench/results/partial)",
    )
    args = p.parse_args()
    args.quick = args.quick or os.environ.get("BENCH_QUICK", "") not in ("", "0")
    ways = [x for x in args.only.split(",") if x] or list(ALL_WAYS)
    for skip, way in ((args.skip_litellm, "litellm"), (args.skip_portkey, "portkey")):
        if skip and way in ways:
            ways.remove(way)
    workloads = [w for w in WORKLOADS if not args.workloads or w.name in args.workloads.split(",")]
    if args.quick:
        workloads = [quick(w) for w in workloads]
    notes: list[str] = []
    fd_limit = raise_fd_limit()
    for w in list(workloads):
        if w.kind == "hold" and fd_limit < w.concurrency + FD_MARGIN:
            workloads.remove(w)
            notes.append(
                f"{w.name} left out: the open-file limit is {fd_limit} (hard), and each of the load generator, "
                f"the daemon and the upstream needs one socket per held stream plus ~{FD_MARGIN}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="model-broker-bench-"))
    out: dict[str, Any] = {"machine": machine(), "quick": args.quick, "workloads": {}, "notes": notes}
    out["machine"]["fd_limit"] = fd_limit
    started: list[Proc] = []
    runs = [(w, way) for w in workloads for way in ways if way in w.ways]
    if not args.quick:
        print("starting the servers (LiteLLM's proxy takes ~15 s to import)...", flush=True)
    try:
        upstream = start_upstream(tmp)
        started.append(upstream.proc)
        launches = launch_all(tmp, upstream, ways, workloads, notes)
        started += [launch.proc for launch in launches.values()]

        def lane(runs: list[tuple[Workload, str]]) -> None:
            for w, way in runs:
                server = upstream if way == "direct" else server_for(way, launches, notes)
                if server is None:
                    continue
                r = run_workload(w, server, upstream, min_ok=QUICK_MIN_OK if args.quick else 0)
                out["workloads"].setdefault(w.name, {"spec": asdict(w)})[way] = r
                print(report.progress_line(w.name, way, r), flush=True)

        if args.quick:
            # Each peer in a lane of its own beside ours, all at once: LiteLLM's import and
            # its slow answers are the long pole, and a quick run's figures are not compared.
            lanes: dict[str, list[tuple[Workload, str]]] = {}
            for w, way in runs:
                lanes.setdefault(way if way in PEERS else "ours", []).append((w, way))
            with ThreadPoolExecutor(len(lanes) or 1) as pool:
                for done in [pool.submit(lane, rs) for rs in lanes.values()]:
                    done.result()
        else:
            for way in launches:
                server_for(way, launches, notes)  # every server up before the first window opens
            lane(runs)
        # In the order of WORKLOADS and ALL_WAYS, however the lanes finished.
        order = {name: i for i, name in enumerate(("spec", *ALL_WAYS))}
        out["workloads"] = {
            w.name: dict(sorted(out["workloads"][w.name].items(), key=lambda kv: order[kv[0]]))
            for w in workloads
            if w.name in out["workloads"]
        }
    finally:
        for proc in reversed(started):
            proc.stop()
        if args.keep_logs:
            shutil.copytree(tmp, RESULTS / "logs", dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    out["machine"]["loadavg_end"] = os.getloadavg()
    out["wall_s"] = time.monotonic() - t_start
    table = report.markdown(out)
    out["table"] = table
    # Only a whole run replaces bench/results/bench.json: a quick run's figures are not
    # measurements, and a narrowed run's are not the whole table.
    dest = args.out or (
        RESULTS / "quick" if args.quick else RESULTS / "partial" if args.only or args.workloads else RESULTS
    )
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "bench.json").write_text(json.dumps(out, indent=1, default=str))
    report.chart(out, dest / "bench.png")
    print()
    print(table)
    print(f"\nwrote {dest}/bench.json and bench.png in {out['wall_s']:.0f} s")
    if args.quick:
        failed = [
            f"{name} {way}: {r.get('errors')} errors; {(r.get('error_samples') or [''])[0][:300]}"
            for name, row in out["workloads"].items()
            for way, r in row.items()
            if way != "spec" and (r.get("errors") or not r.get("ok") or "elapsed_s" not in r)
        ]
        if failed:
            print("quick run FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
            return 1
        print("quick run: every workload ran on every way present, no errors (figures are not measurements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
