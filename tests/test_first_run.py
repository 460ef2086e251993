"""First run: `model-broker serve` with nothing configured, as a new user starts it.

It probes 127.0.0.1 for local model servers and serves those that answer (logging what it
found; under --workers the parent probes once and its workers serve the finds); with none
answering it prints one screen of what to set; config turns it off. The
probe ports come from MODEL_BROKER_DISCOVER_PORTS, pointed at fakes on port 0 or at closed
ports, so no test depends on what runs on the real 11434, 1234, 8080 or 8000.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from broker.config import ConfigError, Settings
from broker.discover_local import SERVERS, probe_ports
from tests.clirun import clean_env, run_cli, serving
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.procs import ServeDaemon, free_port, start_serve, stop, write_config


def first_run_env(**ports: int) -> dict[str, str]:
    """No provider variables, probes on: each server's port as given, else a closed port."""
    closed = free_port()  # bound and released: nothing listens there
    env = clean_env()
    del env["MODEL_BROKER_DISCOVER_LOCAL"]
    chosen = {s.name: ports.get(s.name.replace("-", "_"), closed) for s in SERVERS}
    env["MODEL_BROKER_DISCOVER_PORTS"] = ",".join(f"{name}={port}" for name, port in chosen.items())
    return env


def plain_lines(lines: list[str]) -> list[str]:
    """A serve process's stderr lines that are meant for a person (not JSON log events)."""
    return [line for line in lines if not line.startswith("{")]


async def test_serves_the_local_servers_that_answer() -> None:
    async with FakeOllama() as ollama, FakeOpenAI(models=["qwen2.5-7b"]) as vllm, FakeOllama() as other:
        ollama.reply = Reply(text_chunks=["Sa", "lut"])
        port, vport = ollama.server.port, vllm.server.port
        # LM Studio's port is held by a server that is not OpenAI-compatible: not a find.
        env = first_run_env(ollama=port, vllm=vport, lm_studio=other.server.port)
        async with serving(env=env) as (target, daemon):
            found = daemon.logged("local_server_found")
            assert [(e["message"], e["provider"]) for e in found] == [
                (f"found Ollama at 127.0.0.1:{port} (3 models)", "ollama"),
                (f"found vLLM at 127.0.0.1:{vport} (1 model)", "vllm"),
            ]
            assert (
                f"model-broker: found Ollama at 127.0.0.1:{port} (3 models): serving it as provider 'ollama'"
                in (plain_lines(daemon.lines))
            )
            assert daemon.logged("serving")[0]["providers"] == ["ollama", "vllm"]

            code, out, err = await run_cli("providers", "--target", target, "--json")
            assert code == 0, err
            assert [(p["name"], p["type"], p["base_url"], p["priority"]) for p in json.loads(out)] == [
                ("ollama", "ollama", f"http://127.0.0.1:{port}", 10),
                ("vllm", "openai", f"http://127.0.0.1:{vport}/v1", 20),
            ]
            code, out, err = await run_cli("complete", "--target", target, "--model", "ollama/llama3.2", "hi")
            assert (code, out) == (0, "Salut\n"), err
            code, out, err = await run_cli("complete", "--target", target, "--model", "vllm/qwen2.5-7b", "hi")
            assert (code, out) == (0, "Hello there!\n"), err
        assert not [r for r in other.requests if r.path != "/v1/models"], "only the probe reached it"


async def test_under_workers_the_parent_probes_once_and_every_worker_serves_the_find() -> None:
    async with FakeOllama() as ollama:
        port = free_port()
        proc = await start_serve(
            None, f"127.0.0.1:{port}", "--workers", "2", env=first_run_env(ollama=ollama.server.port)
        )
        daemon = ServeDaemon(proc)
        try:
            for _ in range(200):
                if len([e for e in daemon.logged("serving") if e.get("worker") is not None]) == 2:
                    break
                await asyncio.sleep(0.1)
            workers = [e for e in daemon.logged("serving") if e.get("worker") is not None]
            assert sorted(e["providers"] for e in workers) == [["ollama"], ["ollama"]], daemon.lines
            said = [line for line in plain_lines(daemon.lines) if "found Ollama" in line]
            assert len(said) == 1 and len(daemon.logged("local_server_found")) == 1  # the parent's
            code, out, err = await run_cli(
                "complete", "--target", f"127.0.0.1:{port}", "--model", "ollama/llama3.2", "hi"
            )
            assert (code, out) == (0, "Hello there!\n"), err
        finally:
            await stop(daemon.proc, 20)  # SIGTERM: the parent stops its workers
            await daemon.close()


async def test_nothing_answers_prints_one_screen_of_what_to_set() -> None:
    async with serving(env=first_run_env()) as (target, daemon):
        code, out, _ = await run_cli("health", "--target", target, "--service", "modelbroker.v1.ModelBroker")
        assert (code, out.strip()) == (4, "modelbroker.v1.ModelBroker: NOT_SERVING")
        screen = plain_lines(daemon.lines)
    text = "\n".join(screen)
    assert len(screen) <= 24 and max(map(len, screen)) <= 100, text  # one terminal screen
    assert screen[0].startswith(
        "model-broker: warning: no providers configured, and no local model server answered"
    )
    for what in (
        "OPENAI_API_KEY=",
        "OPENAI_BASE_URL=http://127.0.0.1:8000/v1",
        "ANTHROPIC_API_KEY=",
        "OLLAMA_HOST=",
    ):
        assert what in text
    assert "model-broker serve --config broker.yaml" in text and "auto_discover_local: false" in text
    assert daemon.logged("local_servers_none")


async def test_config_can_turn_the_probe_off(tmp_path: Path) -> None:
    async with FakeOllama() as ollama:
        config = write_config({"auto_discover_local": False}, tmp_path)
        async with serving(config, env=first_run_env(ollama=ollama.server.port)) as (_, daemon):
            assert daemon.logged("serving")[0]["providers"] == []
            screen = plain_lines(daemon.lines)
        assert ollama.requests == [], "no probe when turned off"
    assert screen[0].endswith("no providers configured, and looking for local model servers is off")


async def test_a_malformed_ports_variable_is_one_line() -> None:
    env = first_run_env()
    env["MODEL_BROKER_DISCOVER_PORTS"] = "ollama=eleven"
    code, _, err = await run_cli("serve", "--listen", "127.0.0.1:0", env=env)
    lines = plain_lines(err.splitlines())
    assert code == 2 and "Traceback" not in err
    assert lines == [
        "model-broker: MODEL_BROKER_DISCOVER_PORTS: 'ollama=eleven': expected NAME=PORT or NAME=off, "
        "NAME one of ollama, lm-studio, llama-cpp, vllm"
    ]


def test_probe_ports_default_and_overridden() -> None:
    assert [(s.name, s.port) for s in probe_ports({})] == [
        ("ollama", 11434),
        ("lm-studio", 1234),
        ("llama-cpp", 8080),
        ("vllm", 8000),
    ]
    moved = probe_ports({"MODEL_BROKER_DISCOVER_PORTS": "vllm=9000, lm-studio=off"})
    assert [(s.name, s.port) for s in moved] == [("ollama", 11434), ("llama-cpp", 8080), ("vllm", 9000)]
    with pytest.raises(ConfigError):
        probe_ports({"MODEL_BROKER_DISCOVER_PORTS": "lmstudio=1"})
    assert Settings().auto_discover_local is True
