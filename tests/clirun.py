"""`model-broker` client commands as a user runs them: a subprocess each, against a
`model-broker serve` subprocess, with an environment stripped of provider variables and of
the MODEL_BROKER_* ones the developer's shell may hold."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from tests.procs import CLI, ServeDaemon, env_without, start_serve


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without provider or MODEL_BROKER_ variables (first-run probes off), plus `extra`."""
    env = env_without("OPENAI_", "ANTHROPIC_", "OLLAMA_", "MODEL_BROKER_")
    env["MODEL_BROKER_DISCOVER_LOCAL"] = "0"  # never probe the real 11434, 1234, 8080, 8000
    env.update(extra)
    return env


async def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 30
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `model-broker ARGS...`."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env() if env is None else env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def serving(
    config: Path | None = None, env: dict[str, str] | None = None, *, within: float = 20
) -> AsyncIterator[tuple[str, ServeDaemon]]:
    """A `serve --listen 127.0.0.1:0` process; yields ("127.0.0.1:PORT", its daemon) once it
    logs `serving`, and kills it afterwards."""
    proc = await start_serve(config, "127.0.0.1:0", env=clean_env() if env is None else env)
    daemon = ServeDaemon(proc)
    try:
        waiting = asyncio.create_task(daemon.serving.wait())
        exited = asyncio.create_task(proc.wait())
        await asyncio.wait({waiting, exited}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        exited.cancel()
        if not daemon.serving.is_set():
            await daemon.close()
            raise AssertionError("serve did not start:\n" + "\n".join(daemon.lines))
        yield f"127.0.0.1:{daemon.port}", daemon
    finally:
        await daemon.close()
