"""The OpenAI wire's shortcuts for the common shapes give what the general code gives."""

from __future__ import annotations

from typing import Any

import pytest

from broker.providers.openai_wire import ChunkParser, build_body, usage_from
from broker.types import CompletionRequest, Message, ReasoningPart, Role, TextPart, Usage


def body_for(*messages: Message) -> dict[str, Any]:
    return build_body(CompletionRequest(model="m", messages=list(messages)))


@pytest.mark.parametrize("role", [Role.USER, Role.SYSTEM])
def test_one_text_part_is_sent_as_the_general_path_sends_it(role: Role) -> None:
    # A trailing reasoning part is dropped, so the general path sees the same one text part.
    short = body_for(Message(role, [TextPart("hi there")]))
    general = body_for(Message(role, [TextPart("hi there"), ReasoningPart(text="x", provider_type="o")]))
    assert short["messages"] == general["messages"] == [{"role": role.value, "content": "hi there"}]


def test_a_text_part_subclass_takes_the_general_path() -> None:
    class Cached(TextPart):
        pass

    assert body_for(Message(Role.USER, [Cached("a")]))["messages"] == [{"role": "user", "content": "a"}]


def events(*chunks: dict[str, Any]) -> list[object]:
    parser = ChunkParser(provider="p", model="m")
    out: list[object] = []
    for c in chunks:
        out += parser.feed(c)
    return [*out, parser.end()]


def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": None}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"role": "assistant"},
        {"reasoning": None},
        {"refusal": None},
        {"tool_calls": None},
        {"logprobs": None},
    ],
)
def test_a_content_only_delta_gives_what_a_fuller_one_gives(extra: dict[str, Any]) -> None:
    only = events(choice({"content": "a"}), choice({"content": "b"}, "stop"))
    fuller = events(choice({"content": "a", **extra}), choice({**extra, "content": "b"}, "stop"))
    assert only == fuller


@pytest.mark.parametrize("content", [None, "", 5, ["x"], {"t": 1}])
def test_a_content_only_delta_that_is_not_text_gives_nothing(content: object) -> None:
    assert events(choice({"content": content})) == events(choice({}))


def test_usage_without_details_counts_them_zero_and_with_them_checks_them() -> None:
    assert usage_from({"prompt_tokens": 3, "completion_tokens": 4}) == Usage(input_tokens=3, output_tokens=4)
    full = usage_from(
        {
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 1, "cache_write_tokens": 2},
            "completion_tokens_details": {"reasoning_tokens": 2},
        }
    )
    assert (full.cached_input_tokens, full.cache_write_input_tokens, full.reasoning_tokens) == (1, 2, 2)
    with pytest.raises(Exception, match="reasoning_tokens"):
        usage_from({"completion_tokens_details": {"reasoning_tokens": -1}})


def test_no_usage_chunk_is_reported_as_none() -> None:
    end = events(choice({"content": "a"}, "stop"))[-1]
    assert end.usage == Usage() and not end.usage_reported  # type: ignore[attr-defined]
    reported = events({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})[-1]
    assert reported.usage_reported  # type: ignore[attr-defined]
