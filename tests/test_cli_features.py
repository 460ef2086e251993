"""`complete --reasoning / --json-schema / --document / --hide-reasoning` as a user runs them:
a real `model-broker` process against a real `serve` process in front of a fake OpenAI
upstream on 127.0.0.1. Reasoning goes to stderr, the answer alone to stdout."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.clirun import clean_env, run_cli, serving
from tests.fakes.openai_upstream import CHAT_PATH, FakeOpenAI
from tests.fakes.script import Reply

PDF = b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n%%EOF\n"
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}},
    "required": ["n"],
    "additionalProperties": False,
}


@pytest.fixture
async def daemon() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    async with FakeOpenAI(models=["gpt-5-mini"]) as fake:
        fake.reasoning_chunks = ["Count", " the r's."]
        fake.reply = Reply(text_chunks=['{"n": ', "2}"], input_tokens=9, output_tokens=12)
        async with serving(env=clean_env(OPENAI_BASE_URL=fake.url)) as (target, _):
            yield fake, target


def last_body(fake: FakeOpenAI) -> Any:
    return [r.json() for r in fake.requests if r.path == CHAT_PATH][-1]


async def test_reasoning_schema_and_document_flags(daemon, tmp_path: Path) -> None:
    fake, target = daemon
    (tmp_path / "count.json").write_text(json.dumps({"name": "count", "schema": SCHEMA}))
    (tmp_path / "q3.pdf").write_bytes(PDF)
    code, out, err = await run_cli(
        "complete", "--target", target, "--model", "openai/gpt-5-mini", "--reasoning", "high",
        "--json-schema", str(tmp_path / "count.json"), "--document", str(tmp_path / "q3.pdf"),
        "How many r in 'carry'?",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out) == {"n": 2}, "stdout holds the answer alone"
    assert "[reasoning] Count the r's." in err
    body = last_body(fake)
    assert body["reasoning_effort"] == "high"
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "count", "schema": SCHEMA, "strict": True},
    }
    parts = body["messages"][0]["content"]
    assert parts[1] == {
        "type": "file",
        "file": {
            "filename": "q3.pdf",
            "file_data": "data:application/pdf;base64," + base64.b64encode(PDF).decode(),
        },
    }
    # Unary, and hidden.
    code, out, err = await run_cli(
        "complete",
        "--target",
        target,
        "--model",
        "openai/gpt-5-mini",
        "--no-stream",
        "--hide-reasoning",
        "hi",
    )
    assert code == 0, err
    assert out.strip() == '{"n": 2}' and "[reasoning]" not in err


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--reasoning", "lots", "give minimal, low, medium, high, a token budget, or off"),
        ("--json-schema", "/nonexistent/schema.json", "No such file"),
        ("--document", "/nonexistent/q3.pdf", "No such file"),
    ],
)
async def test_bad_flag_values_are_one_line_errors(flag: str, value: str, says: str) -> None:
    code, _, err = await run_cli("complete", "--model", "m", flag, value, "hi")
    assert code == 2 and says in err and "Traceback" not in err


async def test_a_tool_loop_with_thinking_over_two_turns_from_the_cli(tmp_path: Path) -> None:
    """Turn 1 prints the answer as JSON (the signed thinking block and the tool call in
    `message`); turn 2 sends that message back with --messages and the fake Anthropic checks
    the block's signature: a changed byte would be its 400."""
    from tests.fakes.anthropic_upstream import FakeAnthropic
    from tests.fakes.script import ToolCallScript

    key = "sk-ant-cli-0123456789abcdef"
    weather = {
        "name": "get_weather",
        "description": "Weather by city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    (tmp_path / "weather.json").write_text(json.dumps(weather))
    async with FakeAnthropic(api_key=key) as ant:
        ant.thinking_chunks = ["The user wants Paris", " weather: call the tool."]
        ant.reply = Reply(
            text_chunks=[],
            tool_calls=[
                ToolCallScript(id="toolu_cli1", name="get_weather", argument_chunks=['{"city": "Paris"}'])
            ],
            finish="tool_calls",
        )
        env = clean_env(ANTHROPIC_API_KEY=key, ANTHROPIC_BASE_URL=ant.url)
        async with serving(env=env) as (target, _):
            common = ["--target", target, "--model", "anthropic/claude-sonnet-4-5", "--reasoning", "2048",
                      "--tool", f"@{tmp_path / 'weather.json'}"]  # fmt: skip
            code, out, err = await run_cli(
                "complete", *common, "--no-stream", "--json", "Weather in Paris?", env=env
            )
            assert code == 0, err
            first = json.loads(out)
            assert first["finish_reason"] == "tool_calls"
            thinking = first["message"]["content"][0]["reasoning"]
            assert (
                thinking["text"] == "The user wants Paris weather: call the tool." and thinking["signature"]
            )
            assert thinking["provider_type"] == "anthropic"
            history = [
                {"role": "user", "content": [{"text": "Weather in Paris?"}]},
                first["message"],
                {"role": "tool", "tool_call_id": "toolu_cli1", "content": [{"text": "24C, sunny"}]},
            ]
            (tmp_path / "turn2.json").write_text(json.dumps(history))
            ant.thinking_chunks = ["It answered."]
            ant.reply = Reply(text_chunks=["Paris: ", "24C and sunny."])
            code, out, err = await run_cli(
                "complete", *common, "--messages", str(tmp_path / "turn2.json"), env=env
            )
            assert code == 0, err
            assert out.strip() == "Paris: 24C and sunny."
            assert "[reasoning] It answered." in err
        sent = ant.message_bodies[-1]["messages"][1]["content"]
        signed = next(b for b in ant.answers[0] if b["type"] == "thinking")
        assert sent[0] == {
            "type": "thinking",
            "thinking": signed["thinking"],
            "signature": signed["signature"],
        }
        assert sent[1]["type"] == "tool_use" and sent[1]["id"] == "toolu_cli1"
