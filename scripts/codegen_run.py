"""The run half of scripts/check_codegen.py: a live daemon, and the Go and Java callers run against it.

`live_daemon()` starts tests/fakes/serve_fake.py (a fake OpenAI upstream) and `model-broker
serve --listen 127.0.0.1:0` with that upstream as its one provider, waits until the daemon
logs `serving`, yields its HOST:PORT, and stops both (each also exits by itself: the fake
after --max-seconds, the daemon on SIGTERM, killed if it lingers).

`run_go` / `run_java` build scripts/codegen_clients/ against the generated code and run it
once; `check_output` says what a run's output lacks. The fake answers "Hello there!" in four
deltas with 12 input and 5 output tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIENTS = REPO / "scripts" / "codegen_clients"
HEALTH_PROTO = REPO / "clients" / "node" / "vendor-proto"  # grpc/health/v1/health.proto
START_SECONDS = 60
RUN_SECONDS = 120
EXPECTED = (
    "start: provider=openai model=gpt-4o-mini",
    'text: "Hello there!"',
    "end: finish_reason=FINISH_REASON_STOP input_tokens=12 output_tokens=5",
    "health modelbroker.v1.ModelBroker: SERVING",
)
# What a grpc-java 1.41 client needs at run time beyond what compiling the stubs needed
# (Debian: libgrpc-java, libnetty-java, libperfmark-java, libgeronimo-annotation-1.3-spec-java).
JAVA_RUNTIME = {
    "grpc-core": "libgrpc-java",
    "grpc-context": "libgrpc-java",
    "grpc-netty": "libgrpc-java",
    "grpc-protobuf-lite": "libgrpc-java",
    "perfmark-api": "libperfmark-java",
    "netty-buffer": "libnetty-java",
    "netty-codec": "libnetty-java",
    "netty-codec-http": "libnetty-java",
    "netty-codec-http2": "libnetty-java",
    "netty-codec-socks": "libnetty-java",
    "netty-common": "libnetty-java",
    "netty-handler": "libnetty-java",
    "netty-handler-proxy": "libnetty-java",
    "netty-resolver": "libnetty-java",
    "netty-transport": "libnetty-java",
}


def _lines(stream: object, into: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)
    into.put(None)


def _first(lines: queue.Queue[str | None], want: object, seconds: float, seen: list[str]) -> object:
    """The first line `want(line)` turns into something truthy, within `seconds`; else None."""
    import time

    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line.rstrip("\n"))
        found = want(line)  # type: ignore[operator]
        if found:
            return found
    return None


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serving_port(line: str) -> int | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if event.get("event") == "serving":
        return int(str(event["listen"]).rsplit(":", 1)[1])
    return None


@contextlib.contextmanager
def live_daemon() -> Iterator[str]:
    """HOST:PORT of a `model-broker serve` whose provider is a fake OpenAI upstream."""
    fake = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fakes" / "serve_fake.py"), "--max-seconds", "600"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    daemon: subprocess.Popen[str] | None = None
    try:
        out: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_lines, args=(fake.stdout, out), daemon=True).start()
        seen: list[str] = []
        url = _first(out, lambda line: json.loads(line).get("url"), START_SECONDS, seen)
        if not isinstance(url, str):
            raise RuntimeError("the fake upstream did not start: " + " | ".join(seen))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "OLLAMA_"))}
        env.update(OPENAI_BASE_URL=url, MODEL_BROKER_DISCOVER_LOCAL="0", MODEL_BROKER_CONFIG="")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        logs: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_lines, args=(daemon.stderr, logs), daemon=True).start()
        seen = []
        port = _first(logs, _serving_port, START_SECONDS, seen)
        if not isinstance(port, int):
            raise RuntimeError("the daemon did not start:\n" + "\n".join(seen[-20:]))
        yield f"127.0.0.1:{port}"
    finally:
        if daemon is not None:
            _stop(daemon)
        if fake.stdin is not None:
            fake.stdin.close()  # the fake exits when its stdin closes
        _stop(fake)


def check_output(output: str) -> list[str]:
    """The expected lines a client's output lacks (empty: it did everything)."""
    lines = set(output.splitlines())
    return [want for want in EXPECTED if want not in lines]


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> tuple[bool, str]:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_SECONDS)
    except subprocess.TimeoutExpired:
        return False, f"{cmd[0]}: no result within {RUN_SECONDS}s"
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def legacy_go_protobuf(gopath_deps: Path) -> bool:
    """github.com/golang/protobuf older than 1.4: the table-driven marshaler that predates
    google.golang.org/protobuf (1.4+ is a shim over it). grpc-go 1.33 marshals through it."""
    proto_dir = gopath_deps / "src" / "github.com" / "golang" / "protobuf" / "proto"
    sources = list(proto_dir.glob("*.go"))
    return bool(sources) and not any("google.golang.org/protobuf" in p.read_text() for p in sources)


def run_go(gopath: Path, env: dict[str, str], target: str, gopath_deps: Path) -> tuple[bool, str]:
    """Build scripts/codegen_clients/main.go in `gopath` (where the generated package already
    sits) and run it against `target`."""
    pkg = gopath / "src" / "mbcheck"
    pkg.mkdir(parents=True)
    shutil.copy(CLIENTS / "main.go", pkg / "main.go")
    exe = gopath / "mbcheck-client"
    ok, log = _run(["go", "build", "-o", str(exe), "mbcheck"], cwd=gopath, env=env)
    if not ok:
        return False, "go build: " + log
    ok, output = _run([str(exe), target], cwd=gopath, env=env)
    if not ok and ("makeOneOfMarshaler" in output or legacy_go_protobuf(gopath_deps)):
        output += (
            "\n(github.com/golang/protobuf in the GOPATH is older than 1.4, so grpc-go marshals with "
            "the legacy code: Debian's golang-github-golang-protobuf-1-3-dev; `make codegen-tools` "
            "installs golang-github-golang-protobuf-1-5-dev instead)"
        )
    return ok, output


def java_runtime_missing(jars: Path) -> list[str]:
    """Debian packages whose jars a grpc-java client needs at run time and that are missing."""
    return sorted({pkg for name, pkg in JAVA_RUNTIME.items() if not (jars / f"{name}.jar").exists()})


def run_java(out: Path, classpath: list[Path], jars: Path, target: str) -> tuple[bool, str]:
    """Generate grpc.health.v1 for Java, compile scripts/codegen_clients/Main.java with it
    against the generated classes in out/classes, and run it against `target`."""
    missing = java_runtime_missing(jars)
    if missing:
        return False, f"cannot run: jars missing (Debian: {' '.join(missing)}; make codegen-tools)"
    health = out / "health-java"
    health.mkdir()
    plugin = shutil.which("grpc_java_plugin") or "grpc_java_plugin"
    ok, log = _run(
        [
            "protoc",
            f"-I{HEALTH_PROTO}",
            f"--java_out={health}",
            f"--plugin=protoc-gen-grpc-java={plugin}",
            f"--grpc-java_out=@generated=omit:{health}",
            "grpc/health/v1/health.proto",
        ],
        cwd=out,
    )
    if not ok:
        return False, "protoc (health.proto): " + log
    classes = out / "classes"
    compile_cp = os.pathsep.join(map(str, [classes, *classpath]))
    sources = [str(p) for p in health.rglob("*.java")] + [str(CLIENTS / "Main.java")]
    ok, log = _run(["javac", "-nowarn", "-d", str(classes), "-cp", compile_cp, *sources], cwd=out)
    if not ok:
        return False, "javac (client): " + log
    run_cp = os.pathsep.join(map(str, [classes, *classpath, *(jars / f"{n}.jar" for n in JAVA_RUNTIME)]))
    return _run(["java", "-cp", run_cp, "mbcheck.Main", target], cwd=out)
