"""The client commands as a user runs them, each a real `model-broker` process against a real
`model-broker serve` process whose provider is a fake OpenAI upstream on 127.0.0.1:

`--json` for models, providers, health and complete (events as JSON lines, an error event
last), `chat` through a pipe (the history goes with every turn, a failed turn is dropped),
`--target` from MODEL_BROKER_TARGET, and `--version`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from tests.clirun import clean_env, run_cli, serving
from tests.fakes.openai_upstream import CHAT_PATH, FakeOpenAI
from tests.fakes.script import Fault, Reply

MODEL = "openai/gpt-4o-mini"


@pytest.fixture
async def daemon() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    async with FakeOpenAI(models=["gpt-4o-mini", "llama3.2"]) as fake:
        fake.reply = Reply(text_chunks=["Bon", "jour", " !"], input_tokens=9, output_tokens=3)
        async with serving(env=clean_env(OPENAI_BASE_URL=fake.url)) as (target, _):
            yield fake, target


def chats(fake: FakeOpenAI) -> list[list[dict[str, str]]]:
    """The `messages` of every chat request the upstream got, in order."""
    return [r.json()["messages"] for r in fake.requests if r.path == CHAT_PATH]


async def test_version() -> None:
    code, out, err = await run_cli("--version")
    assert code == 0, err
    assert out.startswith("model-broker 0.") and "API modelbroker.v1" in out and "grpcio " in out


async def test_list_commands_print_json(daemon) -> None:
    _, target = daemon
    code, out, err = await run_cli("models", "--target", target, "--json")
    assert code == 0, err
    models = {m["id"]: m for m in json.loads(out)}
    assert set(models) == {"openai/gpt-4o-mini", "openai/llama3.2"}
    mini = models["openai/gpt-4o-mini"]
    assert mini["context_window"] == 128000 and "vision" in mini["capabilities"] and mini["kind"] == "chat"
    assert models["openai/llama3.2"]["capabilities_known"] is False

    code, out, err = await run_cli("providers", "--target", target, "--json")
    assert code == 0, err
    [p] = json.loads(out)
    assert (p["name"], p["type"], p["health"], p["breaker_state"], p["model_count"]) == (
        "openai",
        "openai",
        "serving",
        "closed",
        2,
    )
    assert p["last_check_time"].endswith("Z")  # a Timestamp as RFC 3339

    code, out, err = await run_cli("health", "--target", target, "--service", "provider/openai", "--json")
    assert (code, json.loads(out)) == (0, {"service": "provider/openai", "status": "SERVING"}), err


async def test_complete_json_lines_then_an_error_event(daemon) -> None:
    _, target = daemon
    code, out, err = await run_cli("complete", "--target", target, "--model", MODEL, "--json", "Say hello")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == ["start", "text_delta", "text_delta", "text_delta", "end"]
    assert (events[0]["model"], events[0]["provider"]) == ("gpt-4o-mini", "openai")
    assert "".join(e["text"] for e in events if e["event"] == "text_delta") == "Bonjour !"
    end = events[-1]
    assert end["finish_reason"] == "stop"
    assert (end["usage"]["input_tokens"], end["usage"]["output_tokens"]) == (9, 3)
    assert end["cost"] == {"known": False, "input_micro_usd": 0, "output_micro_usd": 0, "total_micro_usd": 0}
    assert err == ""  # with --json, stdout is the whole report

    code, out, err = await run_cli("complete", "--target", target, "--model", "nope/x", "--json", "hi")
    assert code == 1
    [event] = [json.loads(line) for line in out.splitlines()]
    assert (event["event"], event["code"], event["reason"]) == ("error", "NOT_FOUND", "MODEL_NOT_FOUND")
    assert err.startswith("error: NOT_FOUND: model 'nope/x' not found") and err.count("\n") == 1

    code, out, err = await run_cli(
        "complete", "--target", target, "--model", MODEL, "--json", "--no-stream", "hi"
    )
    assert code == 0, err
    answer = json.loads(out)
    assert answer["message"]["content"] == [{"text": "Bonjour !"}] and answer["finish_reason"] == "stop"


async def test_chat_through_a_pipe_keeps_the_history(daemon) -> None:
    fake, target = daemon
    code, out, err = await run_cli(
        "chat",
        "--target",
        target,
        "--model",
        MODEL,
        "--system",
        "Be brief.",
        stdin=b"Hi\n\nAnd again?\n",
    )
    assert code == 0, err
    assert out == "Bonjour !\nBonjour !\n"  # one streamed answer per non-empty line
    assert err.count("[openai/gpt-4o-mini] finish=stop tokens in=9 out=3") == 2
    first, second = chats(fake)
    assert first == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert second == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "And again?"},
    ]


async def test_chat_drops_a_failed_turn_and_goes_on(daemon) -> None:
    fake, target = daemon
    fake.faults.append(Fault("status", status=400))  # the first turn only
    code, out, err = await run_cli(
        "chat", "--target", target, "--model", MODEL, stdin=b"first\nsecond\nthird\n"
    )
    assert code == 1  # a turn failed
    assert out == "Bonjour !\nBonjour !\n"
    assert "error: INVALID_ARGUMENT:" in err and "Traceback" not in err
    assert chats(fake)[-1] == [
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "third"},
    ]


async def test_target_from_the_environment(daemon) -> None:
    _, target = daemon
    env = clean_env(MODEL_BROKER_TARGET=target)
    code, out, err = await run_cli("complete", "--model", MODEL, "hi", env=env)
    assert (code, out) == (0, "Bonjour !\n"), err
    code, out, _ = await run_cli("complete", "--help", env=env)
    assert f"(default: {target}," in " ".join(out.split())  # help shows the default in force
