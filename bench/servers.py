"""The servers a bench run measures, started on 127.0.0.1 only, and how each is reached.

The fake upstream first (everything else points at it), then the rest are launched
together and waited for together (LiteLLM's proxy takes ~15 s to import; the others start
meanwhile): the daemon as an operator runs it (`model-broker serve --config`, one process,
and a second one with `--workers 2`), the do-nothing gRPC server, and the two peers,
LiteLLM's proxy from bench/.venv-litellm and Portkey's gateway from bench/portkey. A peer
that is not installed or does not start is a note, and the run goes on without it; a
server of our own that does not start stops the run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Proc, free_port

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LITELLM_PIN = (ROOT / "bench" / "requirements-litellm.txt").read_text().split("#")[0].strip()
PORTKEY_DIR = ROOT / "bench" / "portkey"
PORTKEY_PIN = "@portkey-ai/gateway@1.15.2"  # bench/portkey/package.json
BENCH_KEY = "sk-bench-upstream-key"
# What _first_call asks every HTTP peer for: one chunk, " w0".
FIRST_CALL_MODEL = "bench-1"
# The most streams a run holds open at once (hold10000): the daemon's cap and pool sit above it.
MAX_STREAMS = 12_000


@dataclass
class Server:
    name: str
    proc: Proc
    target: str  # host:port
    proto: str  # http | grpc
    model_prefix: str = ""
    # HTTP request headers every call carries (Portkey: which provider, and where it lives).
    headers: tuple[str, ...] = ()


@dataclass
class Launch:
    """A server process started but not yet known to be ready: `wait()` says which."""

    name: str
    proc: Proc
    ready: Callable[[], Server | str]  # the Server, or why it is not there
    optional: bool = False  # a peer: not being there is a note, not a failure
    result: Server | str | None = field(default=None)

    def wait(self) -> Server | str:
        if self.result is None:
            self.result = self.ready()
            if isinstance(self.result, str):
                self.proc.stop()
        return self.result


def start_upstream(tmp: Path) -> Server:
    proc = Proc("upstream", [PY, "-m", "bench.upstream"], log=tmp / "upstream.log", cwd=ROOT)
    line = proc.wait_line("PORT ", 15)
    if line is None:
        raise RuntimeError(f"the fake upstream did not start:\n{proc.tail()}")
    return Server("upstream", proc, f"127.0.0.1:{line.split()[1]}", "http")


def launch_broker(tmp: Path, upstream: Server, workers: int = 1) -> Launch:
    name = "broker" if workers == 1 else f"broker-w{workers}"
    config = tmp / f"{name}.yaml"
    config.write_text(
        "server:\n"
        # The default cap (1,000) would refuse hold10000; an operator expecting that many
        # concurrent streams raises it. The provider's pool follows it (max_connections unset).
        f"  max_concurrent_streams: {MAX_STREAMS}\n"
        "providers:\n"
        "  - name: up\n"
        "    type: openai\n"
        f"    base_url: http://{upstream.target}/v1\n"
        f"    api_key: {BENCH_KEY}\n"
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
    if workers > 1:
        argv += ["--workers", str(workers)]
    proc = Proc(name, argv, log=tmp / f"{name}.log", cwd=ROOT)

    def ready() -> Server | str:
        # One "serving" line per process: the daemon's own, or each worker's (the
        # supervising parent's comes before its workers are ready, and has no "worker" key).
        deadline = time.monotonic() + 30
        seen = 0
        while seen < workers:
            line = proc.wait_line('"serving"', max(deadline - time.monotonic(), 0.01))
            if line is None:
                raise RuntimeError(f"the daemon ({name}) did not start:\n{proc.tail()}")
            if workers == 1 or '"worker": ' in line:
                seen += 1
        return Server(name, proc, f"127.0.0.1:{port}", "grpc", model_prefix="up/")

    return Launch(name, proc, ready)


def launch_null(tmp: Path) -> Launch:
    port = free_port()
    proc = Proc(
        "grpc-null", [PY, "-m", "bench.null_server", "--port", str(port)], log=tmp / "null.log", cwd=ROOT
    )

    def ready() -> Server | str:
        if proc.wait_line("PORT ", 15) is None:
            raise RuntimeError(f"the null gRPC server did not start:\n{proc.tail()}")
        return Server("grpc-null", proc, f"127.0.0.1:{port}", "grpc")

    return Launch("grpc-null", proc, ready)


def _http_ready(proc: Proc, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.alive():
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def _first_call(server: Server, timeout: float) -> str:
    """One unary completion through an HTTP way, checked: "" when it answered right, else why.

    A peer's first call is its slowest (LiteLLM builds its router and client on it); made
    here, it is out of every measured window, and a peer that cannot reach the upstream is
    found before its workloads run, not in each of them.
    """
    body = json.dumps(
        {"model": FIRST_CALL_MODEL, "messages": [{"role": "user", "content": "Say hi"}]}
    ).encode()
    req = urllib.request.Request(f"http://{server.target}/v1/chat/completions", data=body, method="POST")
    req.add_header("content-type", "application/json")
    req.add_header("authorization", f"Bearer {BENCH_KEY}")
    for header in server.headers:
        name, _, value = header.partition(":")
        req.add_header(name.strip(), value.strip())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            doc = json.loads(r.read())
        text = doc["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as exc:
        return f"{server.name}'s first call answered HTTP {exc.code}: {exc.read()[:300]!r}"
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        return f"{server.name}'s first call failed: {exc!r}"
    return "" if text == " w0" else f"{server.name}'s first call answered {text!r}, not ' w0'"


def launch_litellm(tmp: Path, upstream: Server, models: Iterable[str]) -> Launch | str:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        return f"LiteLLM is not installed in {LITELLM_VENV.relative_to(ROOT)} (`make bench` installs {LITELLM_PIN})"
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        + "".join(
            f"  - model_name: {m}\n    litellm_params:\n      model: openai/{m}\n"
            f"      api_base: http://{upstream.target}/v1\n      api_key: {BENCH_KEY}\n"
            for m in sorted({FIRST_CALL_MODEL, *models})
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

    def ready() -> Server | str:
        if not _http_ready(proc, f"http://127.0.0.1:{port}/health/liveliness", 120):
            return f"LiteLLM's proxy did not become ready within 120 s:\n{proc.tail()}"
        server = Server("litellm", proc, f"127.0.0.1:{port}", "http")
        return _first_call(server, 60) or server

    return Launch("litellm", proc, ready, optional=True)


def launch_portkey(tmp: Path, upstream: Server) -> Launch | str:
    """Portkey's gateway through bench/portkey/serve.mjs, which binds its app to 127.0.0.1."""
    node = shutil.which("node")
    if node is None:
        return f"Portkey's gateway needs Node.js (node not on PATH); `make bench` installs {PORTKEY_PIN} with npm"
    if not (PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "package.json").exists():
        return f"Portkey's gateway is not installed in {PORTKEY_DIR.relative_to(ROOT)} (`make bench` installs {PORTKEY_PIN})"
    env = {**os.environ, "PORTKEY_PORT": "0"}
    proc = Proc(
        "portkey", [node, str(PORTKEY_DIR / "serve.mjs")], log=tmp / "portkey.log", env=env, cwd=PORTKEY_DIR
    )

    def ready() -> Server | str:
        line = proc.wait_line("PORT ", 30)
        if line is None or not _http_ready(proc, f"http://127.0.0.1:{line.split()[1]}/", 30):
            return f"Portkey's gateway did not become ready within 30 s:\n{proc.tail()}"
        # Its OpenAI provider at a custom host: the gateway's own way to reach a server of
        # the OpenAI shape that is not api.openai.com (127.0.0.1 is on its default list of
        # trusted custom hosts). The caller's bearer key goes on to the upstream.
        headers = ("x-portkey-provider: openai", f"x-portkey-custom-host: http://{upstream.target}/v1")
        server = Server("portkey", proc, f"127.0.0.1:{line.split()[1]}", "http", headers=headers)
        return _first_call(server, 30) or server

    return Launch("portkey", proc, ready, optional=True)
