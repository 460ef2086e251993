"""The CLI as a user runs it: `model-broker serve` configured from the environment, then
`complete`, `health` and `models` against it, each a real process."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.procs import CLI, env_without, free_port, kill, start_serve


async def run(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def answers_health(target: str) -> bool:
    """Up to ~10 s for the daemon to come up: True once `health` (liveness) exits 0."""
    for _ in range(100):
        code, _, _ = await run("health", "--target", target, "--timeout", "0.5")
        if code == 0:
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeOpenAI, str, asyncio.subprocess.Process]]:
    async with FakeOpenAI(models=["gpt-4o-mini", "llama3.2"]) as fake:
        fake.reply = Reply(text_chunks=["Bon", "jour", " !"], input_tokens=9, output_tokens=3)
        port = free_port()
        env = env_without("OPENAI_", "ANTHROPIC_", "OLLAMA_")
        env.update(OPENAI_BASE_URL=fake.url, MODEL_BROKER_CONFIG="")
        proc = await start_serve(
            None, f"127.0.0.1:{port}", env=env, stdin=None, stdout=asyncio.subprocess.PIPE
        )
        target = f"127.0.0.1:{port}"
        try:
            if not await answers_health(target):
                raise AssertionError("daemon did not come up")
            yield fake, target, proc
        finally:
            await kill(proc)


async def test_complete_streams_and_reports_usage(served) -> None:
    fake, target, _ = served
    code, out, err = await run("complete", "--target", target, "--model", "openai/gpt-4o-mini", "Say hello")
    assert code == 0, err
    assert out == "Bonjour !\n"
    assert "[openai/gpt-4o-mini] finish=stop tokens in=9 out=3" in err
    assert "cost=unknown" in err  # an OpenAI-compatible server is not billed at OpenAI's prices
    sent = fake.server.requests[-1].json()
    assert sent["messages"] == [{"role": "user", "content": "Say hello"}]


async def test_complete_unary_with_system_prompt(served) -> None:
    fake, target, _ = served
    code, out, _ = await run(
        "complete",
        "--target",
        target,
        "--model",
        "gpt-4o-mini",
        "--no-stream",
        "--system",
        "Be terse.",
        "Say hello",
    )
    assert (code, out) == (0, "Bonjour !\n")
    assert fake.server.requests[-1].json()["messages"][0] == {"role": "system", "content": "Be terse."}


async def test_complete_error_exits_nonzero_with_status(served) -> None:
    _, target, _ = served
    code, out, err = await run("complete", "--target", target, "--model", "nope/nothing", "x")
    assert code == 1 and out == ""
    assert err.startswith("error: NOT_FOUND: model 'nope/nothing' not found")
    assert "[MODEL_NOT_FOUND]" in err


async def test_health_exit_codes_per_service(served) -> None:
    fake, target, _ = served
    for service in ("", "modelbroker.v1.ModelBroker", "provider/openai"):
        code, out, _ = await run("health", "--target", target, "--service", service)
        assert (code, out.split(": ")[1].strip()) == (0, "SERVING"), (service, out)
    code, _, err = await run("health", "--target", target, "--service", "provider/nope")
    assert code == 3 and "NOT_FOUND" in err
    await fake.stop()
    for _ in range(60):
        code, out, _ = await run("health", "--target", target, "--service", "provider/openai")
        if code == 4:
            break
        await asyncio.sleep(0.2)
    assert (code, out.strip()) == (4, "provider/openai: NOT_SERVING")
    code, _, _ = await run("health", "--target", target)  # liveness does not follow providers
    assert code == 0


async def test_models_lists_discovered(served) -> None:
    _, target, _ = served
    code, out, _ = await run("models", "--target", target)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"openai/gpt-4o-mini", "openai/llama3.2"}
    assert "vision,tools,json" in rows["openai/gpt-4o-mini"]  # catalogue facts merged
    assert rows["openai/llama3.2"].endswith("unknown")


async def test_sigterm_stops_cleanly_with_json_logs(served) -> None:
    _, _, proc = served
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    events = [json.loads(line)["event"] for line in err.decode().splitlines() if line.startswith("{")]
    assert "serving" in events and "shutdown_requested" in events and events[-1] == "stopped"


async def test_no_providers_warns_and_is_not_ready() -> None:
    port = free_port()
    env = env_without("OPENAI_", "ANTHROPIC_", "OLLAMA_")
    # Not the real local ports (tests/test_first_run.py probes fakes instead).
    env["MODEL_BROKER_DISCOVER_LOCAL"] = "0"
    proc = await start_serve(None, f"127.0.0.1:{port}", env=env, stdin=None, stdout=asyncio.subprocess.PIPE)
    try:
        await answers_health(f"127.0.0.1:{port}")
        code, out, _ = await run(
            "health", "--target", f"127.0.0.1:{port}", "--service", "modelbroker.v1.ModelBroker"
        )
        assert (code, out.strip()) == (4, "modelbroker.v1.ModelBroker: NOT_SERVING")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert "no providers configured" in err.decode()


async def test_complete_with_a_tool_prints_the_call(served) -> None:
    from tests.fakes.script import weather_tool_reply

    fake, target, _ = served
    fake.reply = weather_tool_reply()
    tool = (
        '{"name": "get_weather", "description": "Weather by city", "parameters": {"type": "object", '
        '"properties": {"city": {"type": "string"}}, "required": ["city"]}}'
    )
    code, out, err = await run(
        "complete", "--target", target, "--model", "openai/gpt-4o-mini", "--tool", tool, "Weather in Paris?"
    )
    assert code == 0, err
    assert out == '[tool call call_w1] get_weather({"city": "Paris"})\n'
    assert "finish=tool_calls" in err
    assert fake.server.requests[-1].json()["tools"][0]["function"]["name"] == "get_weather"
    code, _, err = await run(
        "complete", "--target", target, "--model", "openai/gpt-4o-mini", "--tool", "{", "x"
    )
    assert code == 2 and "--tool: not JSON" in err


async def test_embed_prints_dimensions_and_first_values(served) -> None:
    _, target, _ = served
    model = "openai/text-embedding-3-small"
    code, out, err = await run(
        "embed", "--target", target, "--model", model, "--dimensions", "8", "a cat", "a dog"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert (
        len(lines) == 2
        and lines[0].startswith("[0] 'a cat': 8 dimensions [")
        and lines[1].startswith("[1] 'a dog'")
    )
    assert "[openai/text-embedding-3-small] tokens in=4" in err
    code, out, err = await run("embed", "--target", target, "--model", model, "--json", "hello")
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["embeddings"][0]["values"]) == 1536 and doc["usage"]["input_tokens"] == 1
    code, _, err = await run("embed", "--target", target, "--model", "openai/gpt-4o-mini", "x")
    assert code == 1 and "CAPABILITY_MISSING" in err
