"""A real model server nobody here wrote: llama-cpp-python's OpenAI-compatible server serving
Gemma 3 270M (Q4_K_M GGUF from PyPI), started once per session on a free loopback port.

It lives in its own venv, made by `make real-model` (scripts/real_model.sh): `.venv-llama` at
the repository root, or $MB_LLAMA_VENV. Without it the tests are skipped with a reason that
names the make target; with MB_REAL_MODEL=1 (what `make test-real-model` sets) a missing venv
is a failure, not a skip.

The server runs with `--interrupt_requests false`: a second request then waits for the one
in flight instead of cutting it off, so a request answered promptly after a cancellation
proves that the cancelled generation stopped by itself, not that the new one preempted it.
The GGUF has no chat template, so `--chat_format gemma` (llama-cpp-python's built-in Gemma
turn format); without it the server falls back to the llama-2 format and Gemma answers with
an empty message. The model is a base model: its text is fluent nonsense, and it keeps
going to max_tokens, which the cancellation tests rely on (1,500 tokens is ~45 s here).
Its stdout/stderr go to a log file that tests read ("Disconnected from client" is what
llama_cpp.server prints when it drops a generation whose client went away).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The id the server lists at /v1/models (--model_alias) and the daemon routes to.
MODEL = "gemma-3-270m"
PROVIDER = "llama"
STARTUP_SECONDS = 120.0
SKIP_REASON = (
    "no llama-cpp-python venv ({venv}): run `make test-real-model` "
    "(or `make real-model` to only install llama-cpp-python + Gemma 3 270M)"
)


@dataclass
class LlamaServer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        """What an `openai` provider's base_url is set to (OpenAI's includes /v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 of stat(5); after the ")" they are at 11 and 12.
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")


def llama_venv() -> Path:
    return Path(os.environ.get("MB_LLAMA_VENV") or REPO / ".venv-llama").resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    venv = llama_venv()
    python = venv / "bin" / "python"
    gguf_file = venv / "gguf-path"
    if not python.exists() or not gguf_file.exists():
        if os.environ.get("MB_REAL_MODEL") == "1":
            pytest.fail(f"MB_REAL_MODEL=1 but {SKIP_REASON.format(venv=venv)}")
        pytest.skip(SKIP_REASON.format(venv=venv))
    gguf = gguf_file.read_text().strip()
    port = _free_port()
    log = tmp_path_factory.mktemp("llama") / "llama-server.log"
    cmd = [
        str(python), "-m", "llama_cpp.server",
        "--model", gguf, "--model_alias", MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--embedding", "true",
        # The GGUF carries no chat template: the server's fallback (llama-2 [INST] format)
        # makes Gemma answer nothing at all; Gemma's own turn format is built in.
        "--chat_format", "gemma",
        "--interrupt_requests", "false",
        "--seed", "7",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    server = LlamaServer(proc, port, log)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _answers(f"{server.base_url}/models"):
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{server.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"llama_cpp.server not up in {STARTUP_SECONDS:.0f}s:\n{server.log_text()[-3000:]}"
                )
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
