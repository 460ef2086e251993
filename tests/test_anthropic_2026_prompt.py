"""AnthropicProvider and the 2026 prompt features (issue 13), against FakeAnthropic.

Structured outputs (native output_config.format, or a forced tool relayed as text), strict
tools, cache breakpoints with their TTL and order, documents, metadata and provider options:
the neutral request in, the body the fake received asserted exactly.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest

from broker import errors
from broker.providers.anthropic import AnthropicProvider
from broker.types import (
    CacheTTL,
    DocumentPart,
    FinishReason,
    GenerationParams,
    ImagePart,
    Message,
    ReasoningConfig,
    ReasoningEffort,
    RequestMetadata,
    ResponseFormat,
    Role,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDeltaEvent,
    ToolChoice,
    ToolChoiceMode,
)
from tests.anthropic_support import (
    OPUS_46,
    PERSON,
    SONNET_4,
    WEATHER,
    ask,
    fake_anthropic,
    provider_for,
    refused,
    run,
    user,
)
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.script import Reply, ToolCallScript


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with fake_anthropic() as f:
        yield f


@pytest.fixture
async def provider(fake: FakeAnthropic) -> AsyncIterator[AnthropicProvider]:
    async with provider_for(fake) as p:
        yield p


# --- structured outputs and strict tools ---------------------------------------------------


async def test_a_json_schema_is_native_output_config_on_new_models(fake, provider):
    fake.reply = Reply(text_chunks=['{"name": "Ada",', ' "age": 36}'])
    params = GenerationParams(response_format=ResponseFormat.JSON_SCHEMA, json_schema=PERSON)
    out = await run(provider, ask(params=params))
    assert out.text == '{"name": "Ada", "age": 36}' and out.end.finish_reason is FinishReason.STOP
    body = fake.message_bodies[-1]
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": PERSON.schema}}
    assert "tools" not in body and "tool_choice" not in body
    # With adaptive thinking the effort sits beside it.
    params = GenerationParams(
        response_format=ResponseFormat.JSON_SCHEMA,
        json_schema=PERSON,
        reasoning=ReasoningConfig(effort=ReasoningEffort.MEDIUM),
    )
    await run(provider, ask(model=OPUS_46, params=params))
    assert fake.message_bodies[-1]["output_config"] == {
        "effort": "medium",
        "format": {"type": "json_schema", "schema": PERSON.schema},
    }


async def test_a_json_schema_on_an_older_model_is_a_forced_tool_relayed_as_text(fake, provider):
    fake.reply = Reply(
        text_chunks=[],
        tool_calls=[ToolCallScript("toolu_p", "person", ['{"name": "Ada",', ' "age": 36}'])],
        finish="tool_calls",
    )
    params = GenerationParams(response_format=ResponseFormat.JSON_SCHEMA, json_schema=PERSON)
    out = await run(provider, ask(model=SONNET_4, params=params))
    body = fake.message_bodies[-1]
    assert body["tools"] == [{"name": "person", "description": "A person", "input_schema": PERSON.schema}]
    assert body["tool_choice"] == {"type": "tool", "name": "person"}
    assert "output_config" not in body
    assert out.text == '{"name": "Ada", "age": 36}'
    assert not any(isinstance(e, ToolCallDeltaEvent) for e in out.events)
    assert out.end.finish_reason is FinishReason.STOP


@pytest.mark.parametrize(
    ("extra", "fields"),
    [
        ({"tools": [WEATHER]}, ["tools"]),
        ({"tool_choice": ToolChoice(ToolChoiceMode.NONE)}, ["tool_choice"]),
        ({"reasoning": ReasoningConfig(budget_tokens=2048)}, ["params.reasoning"]),
    ],
)
async def test_the_forced_tool_does_not_combine(fake, provider, extra, fields):
    reasoning_config = extra.pop("reasoning", None)
    params = GenerationParams(
        response_format=ResponseFormat.JSON_SCHEMA, json_schema=PERSON, reasoning=reasoning_config
    )
    assert await refused(provider, fake, ask(model=SONNET_4, params=params, **extra)) == fields


async def test_strict_tools_say_so(fake, provider):
    strict = Tool("get_weather", "Weather", WEATHER.parameters | {"additionalProperties": False}, strict=True)
    await run(provider, ask(tools=[strict, Tool("get_time")]))
    assert fake.message_bodies[-1]["tools"] == [
        {"name": "get_weather", "description": "Weather", "input_schema": strict.parameters, "strict": True},
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]


# --- prompt caching ------------------------------------------------------------------------


async def test_cache_breakpoints_land_on_their_blocks_with_their_ttl(fake, provider):
    png = b"\x89PNG\r\n\x1a\nfake"
    request = ask(
        Message(Role.SYSTEM, [TextPart("You are terse.", CacheTTL.ONE_HOUR), TextPart("Today is Monday.")]),
        user(TextPart("A long document...", CacheTTL.DEFAULT), ImagePart(data=png, media_type="image/png")),
        Message(Role.ASSISTANT, tool_calls=[ToolCall("toolu_1", "get_weather", '{"city":"Rome"}')]),
        Message(Role.TOOL, [TextPart("21C", CacheTTL.FIVE_MINUTES)], tool_call_id="toolu_1"),
        tools=[Tool("get_weather", "Weather", WEATHER.parameters, cache=CacheTTL.ONE_HOUR)],
    )
    out = await run(provider, request)
    assert out.error is None
    body = fake.message_bodies[-1]
    one_hour, default, five = (
        {"type": "ephemeral", "ttl": "1h"},
        {"type": "ephemeral"},
        {"type": "ephemeral", "ttl": "5m"},
    )
    assert body["tools"][0]["cache_control"] == one_hour
    assert body["system"] == [  # a breakpoint forces the array form
        {"type": "text", "text": "You are terse.", "cache_control": one_hour},
        {"type": "text", "text": "Today is Monday."},
    ]
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "A long document...", "cache_control": default},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png).decode()},
        },
    ]
    assert body["messages"][2]["content"] == [
        {
            "type": "tool_result",
            "tool_use_id": "toolu_1",
            "content": [{"type": "text", "text": "21C", "cache_control": five}],
            "is_error": False,
        }
    ]


async def test_a_one_hour_breakpoint_after_a_five_minute_one_is_refused(fake, provider):
    request = ask(
        Message(Role.SYSTEM, [TextPart("System.", CacheTTL.DEFAULT)]),
        user(TextPart("Long context", CacheTTL.ONE_HOUR)),
        tools=[Tool("get_time", cache=CacheTTL.FIVE_MINUTES)],
    )
    out = await run(provider, request)
    assert isinstance(out.error, errors.InvalidRequest)
    # The user part (system's default TTL and the tool's 5m come first in the API's order).
    assert out.error.violations[0][0] == "messages[1].content[0].cache_control"
    assert "tools[0].cache_control" in out.error.message
    assert fake.message_bodies == []


async def test_a_system_without_breakpoints_stays_a_string(fake, provider):
    await run(provider, ask(Message(Role.SYSTEM, [TextPart("Be terse.")]), user("Hi")))
    assert fake.message_bodies[-1]["system"] == "Be terse."


# --- documents, metadata -------------------------------------------------------------------


async def test_documents_as_pdf_bytes_text_and_url(fake, provider):
    pdf = b"%PDF-1.7\n%fake\n"
    request = ask(
        user(
            "Summarize these.",
            DocumentPart(data=pdf, title="Q3 report", cache=CacheTTL.DEFAULT),
            DocumentPart(data="Notizen: Grüße\nline 2".encode(), media_type="text/plain"),
            DocumentPart(url="https://example.com/paper.pdf", title="Paper"),
        )
    )
    assert (await run(provider, request)).error is None
    assert fake.message_bodies[-1]["messages"][0]["content"][1:] == [
        {
            "type": "document",
            "source": {
                "type": "base64",
                "media_type": "application/pdf",
                "data": base64.b64encode(pdf).decode(),
            },
            "title": "Q3 report",
            "cache_control": {"type": "ephemeral"},
        },
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "Notizen: Grüße\nline 2"},
        },
        {
            "type": "document",
            "source": {"type": "url", "url": "https://example.com/paper.pdf"},
            "title": "Paper",
        },
    ]


async def test_a_document_in_an_assistant_message_is_refused(fake, provider):
    request = ask(user("Hi"), Message(Role.ASSISTANT, [DocumentPart(data=b"%PDF-1.7")]), user("?"))
    assert await refused(provider, fake, request) == ["messages[1].content[0]"]


async def test_the_end_user_id_is_metadata_user_id_and_tags_stay_home(fake, provider):
    meta = RequestMetadata(end_user_id="u_7f3a9c", tags=(("team", "search"),))
    await run(provider, ask(metadata=meta))
    body = fake.message_bodies[-1]
    assert body["metadata"] == {"user_id": "u_7f3a9c"}
    assert b"search" not in fake.message_raw_bodies[-1]


# --- provider options ----------------------------------------------------------------------


async def test_provider_options_are_merged_last(fake, provider):
    options = {"top_k": 5, "service_tier": "auto", "output_config": {"effort": "xhigh"}}
    params = GenerationParams(response_format=ResponseFormat.JSON_SCHEMA, json_schema=PERSON)
    assert (await run(provider, ask(params=params, provider_options=options))).error is None
    body = fake.message_bodies[-1]
    assert (body["top_k"], body["service_tier"]) == (5, "auto")
    assert body["output_config"] == {
        "format": {"type": "json_schema", "schema": PERSON.schema},
        "effort": "xhigh",
    }


@pytest.mark.parametrize(
    ("options", "params", "key"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, GenerationParams(), "thinking"),
        ({"max_tokens": 10}, GenerationParams(), "max_tokens"),
        ({"system": "x"}, GenerationParams(), "system"),
        ({"model": "claude-opus-4-7"}, GenerationParams(), "model"),
        ({"temperature": 0.1}, GenerationParams(temperature=0.5), "temperature"),
        (
            {"output_config": {"effort": "max"}},
            GenerationParams(reasoning=ReasoningConfig(effort=ReasoningEffort.LOW)),
            "output_config.effort",
        ),
    ],
)
async def test_provider_options_cannot_override_the_broker(fake, provider, options, params, key):
    out = await run(provider, ask(model=OPUS_46, params=params, provider_options=options))
    assert isinstance(out.error, errors.InvalidRequest)
    assert out.error.violations[0][0] == f"provider_options[anthropic].{key}"
    assert fake.message_bodies == []
