"""Hostile values from each upstream (issue 11 item 3), through a real daemon: token counts of
2**63, 2**53 + 1, -1 or 12.5, an `"index": 1e999`, a negative or huge index, a lone surrogate
in the text, a tool name of 1,000 characters. Each is UNAVAILABLE UPSTREAM_PROTOCOL_ERROR
when nothing reached the caller (and for unary calls, which buffer), STREAM_INTERRUPTED
when a stream had already delivered content; never INTERNAL or UNKNOWN.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import broker_settings, required_error_info, stub
from tests.fuzz.hostile import (
    Hostile,
    Raw,
    anthropic_end,
    anthropic_event,
    anthropic_start,
    anthropic_text,
    ollama_done,
    ollama_line,
    ollama_text,
    openai_body,
    openai_chunk,
    provider_config,
)

BIG = 2**63
OK_USAGE = {"prompt_tokens": 5, "completion_tokens": 3}

# (case id, provider, body, whether content precedes the bad value)
CASES: list[tuple[str, str, bytes, bool]] = [
    (
        "openai usage 2**63 after content",
        "openai",
        openai_body(
            openai_chunk({"content": "Hi"}),
            openai_chunk({}, finish="stop"),
            openai_chunk(None, usage={"prompt_tokens": BIG, "completion_tokens": 3}),
        ),
        True,
    ),
    (
        "openai usage 2**53+1 after content",
        "openai",
        openai_body(openai_chunk({"content": "Hi"}), openai_chunk(None, usage={"prompt_tokens": 2**53 + 1})),
        True,
    ),
    (
        "openai usage -1 before content",
        "openai",
        openai_body(openai_chunk(None, usage={"prompt_tokens": -1}), openai_chunk({"content": "Hi"})),
        False,
    ),
    (
        "openai usage 12.5 after content",
        "openai",
        openai_body(openai_chunk({"content": "Hi"}), openai_chunk(None, usage={"completion_tokens": 12.5})),
        True,
    ),
    (
        "openai usage 2**64 (a double to orjson)",
        "openai",
        openai_body(openai_chunk({"content": "Hi"}), openai_chunk(None, usage={"completion_tokens": 2**64})),
        True,
    ),
    (
        "openai cached 2**63",
        "openai",
        openai_body(
            openai_chunk({"content": "Hi"}),
            openai_chunk(None, usage={**OK_USAGE, "prompt_tokens_details": {"cached_tokens": BIG}}),
        ),
        True,
    ),
    (
        "openai tool index 1e999",
        "openai",
        openai_body(
            openai_chunk({"tool_calls": [{"index": Raw("1e999"), "id": "c", "function": {"name": "f"}}]})
        ),
        False,
    ),
    (
        "openai tool index 2**40",
        "openai",
        openai_body(openai_chunk({"tool_calls": [{"index": 2**40, "id": "c", "function": {"name": "f"}}]})),
        False,
    ),
    (
        "openai tool index -1 after content",
        "openai",
        openai_body(
            openai_chunk({"content": "Hi"}),
            openai_chunk({"tool_calls": [{"index": -1, "id": "c", "function": {"name": "f"}}]}),
        ),
        True,
    ),
    (
        "openai tool name 1000 chars",
        "openai",
        openai_body(
            openai_chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "n" * 1000}}]})
        ),
        False,
    ),
    (
        "anthropic input_tokens 2**63",
        "anthropic",
        anthropic_start({"input_tokens": BIG, "output_tokens": 1})
        + anthropic_text(0, "Hi")
        + anthropic_end(),
        False,
    ),
    (
        "anthropic output_tokens 2**63 after content",
        "anthropic",
        anthropic_start() + anthropic_text(0, "Hi") + anthropic_end({"output_tokens": BIG}),
        True,
    ),
    (
        "anthropic cache_read -4 after content",
        "anthropic",
        anthropic_start() + anthropic_text(0, "Hi") + anthropic_end({"cache_read_input_tokens": -4}),
        True,
    ),
    (
        "anthropic index 1e999",
        "anthropic",
        anthropic_start() + anthropic_text(Raw("1e999"), "Hi") + anthropic_end(),
        False,
    ),
    (
        "anthropic tool index -5 after content",
        "anthropic",
        anthropic_start()
        + anthropic_text(0, "Hi")
        + anthropic_event(
            {
                "type": "content_block_start",
                "index": -5,
                "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
            }
        )
        + anthropic_end(),
        True,
    ),
    (
        "anthropic index 2**63",
        "anthropic",
        anthropic_start()
        + anthropic_event(
            {
                "type": "content_block_start",
                "index": BIG,
                "content_block": {"type": "tool_use", "id": "t", "name": "f"},
            }
        )
        + anthropic_end(),
        False,
    ),
    (
        "anthropic lone surrogate",
        "anthropic",
        anthropic_start() + anthropic_text(0, Raw('"\\ud800"')) + anthropic_end(),
        False,
    ),
    (
        "ollama eval_count 2**63 after content",
        "ollama",
        ollama_text("Hi") + ollama_done(prompt_eval_count=5, eval_count=BIG),
        True,
    ),
    (
        "ollama prompt_eval_count -3 after content",
        "ollama",
        ollama_text("Hi") + ollama_done(prompt_eval_count=-3, eval_count=1),
        True,
    ),
    (
        "ollama eval_count string",
        "ollama",
        ollama_text("Hi") + ollama_done(prompt_eval_count=5, eval_count="12"),
        True,
    ),
    (
        "ollama lone surrogate",
        "ollama",
        ollama_text(Raw('"\\udc00"')) + ollama_done(),
        False,
    ),
    (
        "ollama tool name 1000 chars",
        "ollama",
        ollama_line(
            {
                "model": "m1",
                "message": {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "n" * 1000}}],
                },
                "done": False,
            }
        )
        + ollama_done(),
        False,
    ),
    (
        "ollama depth 5000",
        "ollama",
        ollama_line(
            {"model": "m1", "message": {"role": "assistant", "content": Raw("[" * 5000 + "]" * 5000)}}
        )
        + ollama_done(),
        False,
    ),
]


@pytest.fixture
async def broker(daemon, channel_to) -> AsyncIterator[tuple[dict[str, Hostile], Any]]:
    ups = {kind: Hostile(kind) for kind in ("openai", "anthropic", "ollama")}
    for up in ups.values():
        await up.__aenter__()
    try:
        settings = broker_settings(
            [provider_config(up) for up in ups.values()],
            health={"interval_seconds": 30, "timeout_seconds": 2},
            routing={"retry": {"max_attempts": 2, "initial_backoff_seconds": 0.01}},
        )
        _, target = await daemon(settings)
        yield ups, stub(channel_to(target))
    finally:
        for up in ups.values():
            await up.__aexit__(None, None, None)


def _reason(err: grpc.aio.AioRpcError) -> str:
    return str(required_error_info(err).reason)


@pytest.mark.parametrize(("case", "kind", "body", "after_content"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("rpc", ["Complete", "StreamComplete"])
async def test_hostile_value_is_a_protocol_error(broker, case, kind, body, after_content, rpc) -> None:
    ups, s = broker
    up = ups[kind]
    up.body = body
    messages = [pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])]
    model = f"{kind}/{up.model}"
    got: list[pb.StreamCompleteResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if rpc == "Complete":
            await s.Complete(pb.CompleteRequest(model=model, messages=messages), timeout=10)
        else:
            async for m in s.StreamComplete(
                pb.StreamCompleteRequest(model=model, messages=messages), timeout=10
            ):
                got.append(m)
    err = info.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    delivered = any(m.HasField("text_delta") or m.HasField("tool_call_delta") for m in got)
    expected = (
        "STREAM_INTERRUPTED" if rpc == "StreamComplete" and after_content else "UPSTREAM_PROTOCOL_ERROR"
    )
    assert _reason(err) == expected, (err.details(), delivered)
    assert delivered == (expected == "STREAM_INTERRUPTED")
    assert "Traceback" not in (err.details() or "") and "<class" not in (err.details() or "")


async def test_the_daemon_serves_after_hostile_values(broker) -> None:
    ups, s = broker
    up = ups["openai"]
    up.body = openai_body(openai_chunk({"content": "fine"}), openai_chunk(None, usage=OK_USAGE))
    answer = await s.Complete(
        pb.CompleteRequest(
            model="openai/m1", messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])]
        ),
        timeout=10,
    )
    assert answer.message.content[0].text == "fine" and answer.usage.input_tokens == 5


async def test_an_unforeseen_parser_failure_is_a_protocol_error(broker, monkeypatch) -> None:
    """A shape no check foresaw (here: the parser itself raising ValueError) is still
    UPSTREAM_PROTOCOL_ERROR with a stable message, never INTERNAL with the exception's text."""
    from broker.providers import ollama_wire

    def broken(self: Any, line: str) -> list[Any]:
        raise ValueError("secret-internal-detail")

    monkeypatch.setattr(ollama_wire.ChatStreamParser, "feed", broken)
    ups, s = broker
    ups["ollama"].body = ollama_text("Hi") + ollama_done()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.Complete(
            pb.CompleteRequest(
                model="ollama/m1",
                messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])],
            ),
            timeout=10,
        )
    err = info.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE and _reason(err) == "UPSTREAM_PROTOCOL_ERROR"
    assert "secret-internal-detail" not in (err.details() or "") and "ValueError" not in (err.details() or "")
