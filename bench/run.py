"""`make bench`: the same workloads direct, through the broker and through LiteLLM's proxy, in one run.

    .venv/bin/python -m bench.run [--quick] [--only direct,broker,...] [--skip-litellm]

Starts, each in its own process and on 127.0.0.1 only: the fast fake upstream
(bench.upstream), the daemon (`model-broker serve`, as an operator runs it), LiteLLM's
proxy from bench/.venv-litellm (if it is installed; if not the run says so and carries
on), and a do-nothing gRPC server (bench.null_server) that shows what the gRPC load
generator can drive. Each workload is run by a fresh load generator process
(bench.loadgen) against each way in turn, so that the ways are measured minutes apart at
most. The runner samples the CPU time of every server in exactly the window the load
generator measured, and the daemon's memory while 1,000 streams are open.

Prints a markdown table and writes bench/results/bench.json and bench/results/bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import report
from bench.procs import Proc, cpu_seconds, free_port, rss_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LITELLM_PIN = (ROOT / "bench" / "requirements-litellm.txt").read_text().split("#")[0].strip()
PY = sys.executable
BENCH_KEY = "sk-bench-upstream-key"
# LiteLLM is the slowest way by far: a workload gets this long before its generator is stopped.
LOADGEN_GRACE_S = 90.0


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # unary | stream | hold | embed (chunks = inputs per call)
    chunks: int
    concurrency: int
    warmup: float = 1.0
    duration: float = 5.0
    hold_gap_ms: int = 0
    ways: tuple[str, ...] = ("direct", "broker", "litellm", "grpc-null")

    def model(self) -> str:
        if self.kind == "hold":
            return f"bench-hold-{self.chunks}-{self.hold_gap_ms}"
        return f"bench-{self.chunks}"


WORKLOADS = [
    Workload("unary_c1", "unary", 1, 1, warmup=1.0, duration=5.0),
    Workload("unary_c32", "unary", 1, 32),
    Workload("unary_c256", "unary", 1, 256),
    Workload("stream20_c1", "stream", 20, 1, warmup=0.5, duration=4.0),
    Workload("stream200_c1", "stream", 200, 1, warmup=0.5, duration=4.0),
    Workload("stream20_c32", "stream", 20, 32),
    Workload("stream200_c32", "stream", 200, 32),
    # 1,000 streams held open together: 20 chunks 250 ms apart, so each lasts about 5 s.
    Workload("hold1000", "hold", 20, 1000, hold_gap_ms=250, ways=("direct", "broker", "litellm")),
    # Embeddings: 16 inputs per call (256 floats each), direct POST /v1/embeddings vs the Embed RPC.
    Workload("embed16_c1", "embed", 16, 1, warmup=0.5, duration=4.0, ways=("direct", "broker")),
    Workload("embed16_c32", "embed", 16, 32, ways=("direct", "broker")),
]


@dataclass
class Server:
    name: str
    proc: Proc
    target: str  # host:port
    proto: str  # http | grpc
    model_prefix: str = ""


def start_upstream(tmp: Path) -> Server:
    proc = Proc("upstream", [PY, "-m", "bench.upstream"], log=tmp / "upstream.log", cwd=ROOT)
    line = proc.wait_line("PORT ", 15)
    if line is None:
        raise RuntimeError(f"the fake upstream did not start:\n{proc.tail()}")
    return Server("upstream", proc, f"127.0.0.1:{line.split()[1]}", "http")


def start_broker(tmp: Path, upstream: Server) -> Server:
    config = tmp / "broker.yaml"
    config.write_text(
        "providers:\n"
        "  - name: up\n"
        "    type: openai\n"
        f"    base_url: http://{upstream.target}/v1\n"
        f"    api_key: {BENCH_KEY}\n"
        # The default pool (200) would queue the 1,000-stream workload; an operator
        # expecting that many concurrent streams raises it the same way.
        "    max_connections: 2000\n"
    )
    port = free_port()
    argv = [
        str(Path(PY).parent / "model-broker"),
        "serve",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
    ]
    proc = Proc("broker", argv, log=tmp / "broker.log", cwd=ROOT)
    if proc.wait_line('"serving"', 30) is None:
        raise RuntimeError(f"the daemon did not start:\n{proc.tail()}")
    return Server("broker", proc, f"127.0.0.1:{port}", "grpc", model_prefix="up/")


def start_null(tmp: Path) -> Server:
    port = free_port()
    proc = Proc(
        "grpc-null", [PY, "-m", "bench.null_server", "--port", str(port)], log=tmp / "null.log", cwd=ROOT
    )
    if proc.wait_line("PORT ", 15) is None:
        raise RuntimeError(f"the null gRPC server did not start:\n{proc.tail()}")
    return Server("grpc-null", proc, f"127.0.0.1:{port}", "grpc")


def start_litellm(tmp: Path, upstream: Server) -> tuple[Server | None, str]:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        return (
            None,
            f"LiteLLM is not installed in {LITELLM_VENV.relative_to(ROOT)} (`make bench` installs {LITELLM_PIN})",
        )
    models = sorted({w.model() for w in WORKLOADS})
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        + "".join(
            f"  - model_name: {m}\n    litellm_params:\n      model: openai/{m}\n"
            f"      api_base: http://{upstream.target}/v1\n      api_key: {BENCH_KEY}\n"
            for m in models
        )
    )
    port = free_port()
    env = {
        **os.environ,
        # No network here: use the cost map it ships instead of fetching one.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        # Like the daemon in this run, no caller auth (its default refuses to start without a key).
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    }
    argv = [
        str(exe),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    proc = Proc("litellm", argv, log=tmp / "litellm.log", env=env, cwd=tmp)
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.alive():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness", timeout=2) as r:
                if r.status == 200:
                    return Server("litellm", proc, f"127.0.0.1:{port}", "http"), ""
        except OSError:
            time.sleep(0.5)
    tail = proc.tail()
    proc.stop()
    return None, f"LiteLLM's proxy did not become ready within 120 s:\n{tail}"


def run_workload(w: Workload, server: Server, upstream: Server) -> dict[str, Any]:
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
        "--deadline", "60",
    ]  # fmt: skip
    if server.proto == "grpc" and w.concurrency > 64:
        argv += ["--channels", "4"]
    tmp = Path(server.proc.log_path).parent
    gen = Proc(
        f"loadgen-{w.name}-{server.name}", argv, log=tmp / f"loadgen-{w.name}-{server.name}.log", cwd=ROOT
    )
    watched = {"server": server.proc.pid, "upstream": upstream.proc.pid}
    rss0 = rss_bytes(server.proc.pid)
    cpu0: dict[str, float] = {}
    cpu1: dict[str, float] = {}
    rss_peak = rss0
    t0 = wall = 0.0
    result: dict[str, Any] | None = None
    deadline = time.monotonic() + w.warmup + w.duration + LOADGEN_GRACE_S
    while time.monotonic() < deadline:
        try:
            line = gen.lines.get(timeout=0.05)
        except Exception:
            line = ""
        if w.kind == "hold" and cpu0 and not cpu1:
            rss_peak = max(rss_peak, rss_bytes(server.proc.pid))
        if line is None:
            break
        if line == "MARK start":
            cpu0 = {k: cpu_seconds(p) for k, p in watched.items()}
            t0 = time.monotonic()
        elif line == "MARK end":
            cpu1 = {k: cpu_seconds(p) for k, p in watched.items()}
            wall = time.monotonic() - t0
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    gen.stop(5)
    if result is None:
        return {"ok": 0, "errors": 1, "error_samples": [f"load generator gave no result:\n{gen.tail()}"]}
    if cpu0 and cpu1:
        for k in watched:
            result[f"{k}_cpu_pct"] = 100.0 * (cpu1[k] - cpu0[k]) / wall
        result["server_cpu_s"] = cpu1["server"] - cpu0["server"]
        if result.get("ok"):
            # Daemon CPU per completed request: what the HTTP client and everything else cost.
            result["server_cpu_us_per_req"] = 1e6 * result["server_cpu_s"] / result["ok"]
    result["server_rss_mb"] = rss_bytes(server.proc.pid) / 2**20
    if w.kind == "hold":
        result["server_rss_mb_before"] = rss0 / 2**20
        result["server_rss_mb_peak"] = rss_peak / 2**20
    if w.kind == "stream":
        result["chunks_per_s"] = (
            result.get("ok", 0) * w.chunks / result["elapsed_s"] if result.get("elapsed_s") else 0
        )
        result["messages_per_stream"] = result["messages"] / result["ok"] if result.get("ok") else None
        if result.get("server_cpu_s"):
            result["chunks_per_server_cpu_s"] = result["ok"] * w.chunks / result["server_cpu_s"]
    return result


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
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated ways: direct,broker,litellm,grpc-null")
    p.add_argument("--workloads", default="", help="comma-separated workload names")
    p.add_argument("--skip-litellm", action="store_true")
    p.add_argument("--quick", action="store_true", help="short windows, for trying the harness out")
    p.add_argument("--keep-logs", action="store_true", help="copy the servers' logs to bench/results/logs")
    args = p.parse_args()
    ways = [x for x in args.only.split(",") if x] or ["direct", "broker", "litellm", "grpc-null"]
    if args.skip_litellm and "litellm" in ways:
        ways.remove("litellm")
    workloads = [w for w in WORKLOADS if not args.workloads or w.name in args.workloads.split(",")]
    if args.quick:
        workloads = [replace(w, warmup=min(w.warmup, 0.3), duration=1.5) for w in workloads]
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="model-broker-bench-"))
    servers: dict[str, Server] = {}
    notes: list[str] = []
    started: list[Proc] = []
    out: dict[str, Any] = {"machine": machine(), "workloads": {}, "notes": notes}
    try:
        upstream = start_upstream(tmp)
        started.append(upstream.proc)
        servers["direct"] = upstream
        if "broker" in ways:
            servers["broker"] = start_broker(tmp, upstream)
            started.append(servers["broker"].proc)
        if "grpc-null" in ways:
            servers["grpc-null"] = start_null(tmp)
            started.append(servers["grpc-null"].proc)
        if "litellm" in ways:
            print("starting LiteLLM's proxy (it takes a while to import)...", flush=True)
            ll, why = start_litellm(tmp, upstream)
            if ll is None:
                notes.append(why)
                print(f"NOTE: {why}\nThe run carries on without LiteLLM.", flush=True)
            else:
                servers["litellm"] = ll
                started.append(ll.proc)
        for w in workloads:
            out["workloads"][w.name] = {"spec": asdict(w)}
            for way in ways:
                if way not in servers or way not in w.ways:
                    continue
                r = run_workload(w, servers[way], upstream)
                out["workloads"][w.name][way] = r
                print(report.progress_line(w.name, way, r), flush=True)
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
    (RESULTS / "bench.json").write_text(json.dumps(out, indent=1, default=str))
    report.chart(out, RESULTS / "bench.png")
    print()
    print(table)
    print(f"\nwrote {RESULTS.relative_to(ROOT)}/bench.json and bench.png in {out['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
