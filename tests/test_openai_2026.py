"""Issue 13 on the OpenAI side: reasoning, structured outputs, documents, refusals, metadata and
provider options, each through OpenAIProvider against FakeOpenAI over real loopback HTTP.

A neutral CompletionRequest goes in; the body the fake received and the neutral events that
came back are asserted exactly. api.openai.com is played by the fake with the openai type's
vendor_hosts swapped for 127.0.0.1 (kinds.KINDS is read per provider, never copied); the
OpenRouter and Groq rows by `vendor:` in the provider's config.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import SecretStr

from broker import errors
from broker.config import ProviderConfig
from broker.providers import kinds
from broker.providers.openai import OpenAIProvider
from broker.providers.openai_wire import MAX_REFUSAL_CHARS, ChunkParser, WireTarget
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    DocumentPart,
    EndEvent,
    FinishReason,
    GenerationParams,
    JsonSchemaFormat,
    Message,
    ReasoningConfig,
    ReasoningDeltaEvent,
    ReasoningEffort,
    ReasoningPart,
    Refusal,
    RequestMetadata,
    ResponseFormat,
    Role,
    StartEvent,
    TextDeltaEvent,
    TextPart,
    Tool,
    ToolCall,
    Usage,
)
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.providers import collect, collect_until_error

KEY = "sk-test-0123456789abcdef"
HI = [{"role": "user", "content": "Hi"}]
TAIL = {"stream": True, "stream_options": {"include_usage": True}}
EVENT = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "date": {"type": ["string", "null"]}},
    "required": ["name", "date"],
    "additionalProperties": False,
}
PDF = b"%PDF-1.7\n1 0 obj <<>> endobj\n%%EOF\n"

Make = Callable[..., OpenAIProvider]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY, models=("gpt-4o-mini", "gpt-5", "openai/gpt-oss-120b")) as f:
        yield f


@pytest.fixture
def platform(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake on 127.0.0.1 counts as api.openai.com for providers made after this."""
    openai = kinds.kind("openai")
    monkeypatch.setitem(
        kinds.KINDS, "openai", dataclasses.replace(openai, vendor_hosts=frozenset({"127.0.0.1"}))
    )


@pytest.fixture
async def make(fake: FakeOpenAI) -> AsyncIterator[Make]:
    made: list[OpenAIProvider] = []

    def build(vendor: str | None = None) -> OpenAIProvider:
        cfg = ProviderConfig(
            name="oai",
            type="openai",
            vendor=vendor,
            base_url=fake.url,
            api_key=SecretStr(KEY),
            read_timeout_seconds=5.0,
            connect_timeout_seconds=2.0,
        )
        p = OpenAIProvider(cfg)
        made.append(p)
        return p

    yield build
    for p in made:
        await p.close()


async def run(p: OpenAIProvider, request: CompletionRequest) -> list[CompletionEvent]:
    await p.start()
    return await collect(p, request)


def ask(model: str = "gpt-4o-mini", **params: Any) -> CompletionRequest:
    return CompletionRequest(
        model=model,
        messages=[Message(Role.USER, [TextPart("Hi")])],
        params=GenerationParams(**params),
        provider_type="openai",
    )


def effort(level: ReasoningEffort) -> ReasoningConfig:
    return ReasoningConfig(effort=level)


# --- reasoning: the request ----------------------------------------------------------------------


@pytest.mark.parametrize("level", list(ReasoningEffort))
async def test_an_effort_is_reasoning_effort(fake: FakeOpenAI, make: Make, level: ReasoningEffort) -> None:
    await run(make(), ask(reasoning=effort(level), max_tokens=100))
    # A compatible server: the limit field is the model's (gpt-4o-mini takes max_tokens).
    assert fake.chat_bodies == [
        {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 100, "reasoning_effort": level.value, **TAIL}
    ]


async def test_disabled_is_effort_none(fake: FakeOpenAI, make: Make) -> None:
    await run(make(), ask(reasoning=ReasoningConfig(disabled=True)))
    assert fake.chat_bodies == [{"model": "gpt-4o-mini", "messages": HI, "reasoning_effort": "none", **TAIL}]


@pytest.mark.parametrize("vendor", [None, "groq"])
async def test_a_budget_is_refused_before_any_call(fake: FakeOpenAI, make: Make, vendor: str | None) -> None:
    p = make(vendor)
    await p.start()
    _, err = await collect_until_error(p, ask(reasoning=ReasoningConfig(budget_tokens=2048)))
    assert isinstance(err, errors.InvalidRequest)
    [(field, why)] = err.violations
    assert field == "params.reasoning.budget_tokens"
    assert "effort" in why and "thinking_token_budget" in why
    assert fake.chat_bodies == []


@pytest.mark.usefixtures("platform")
async def test_reasoning_on_api_openai_com_sends_max_completion_tokens(fake: FakeOpenAI, make: Make) -> None:
    # gpt-4o-mini is no reasoning model, but asking for reasoning there makes it a reasoning
    # request; without reasoning the model's own rule stays (max_tokens).
    p = make()
    await run(p, ask(reasoning=effort(ReasoningEffort.HIGH), max_tokens=300))
    await collect(p, ask(max_tokens=300))
    assert fake.chat_bodies == [
        {
            "model": "gpt-4o-mini",
            "messages": HI,
            "max_completion_tokens": 300,
            "reasoning_effort": "high",
            **TAIL,
        },
        {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 300, **TAIL},
    ]


@pytest.mark.usefixtures("platform")
async def test_gpt5_with_reasoning_is_answered_by_the_platform(fake: FakeOpenAI, make: Make) -> None:
    fake.reasoning_tokens = 4
    events = await run(make(), ask("gpt-5", reasoning=effort(ReasoningEffort.MINIMAL), max_tokens=64))
    assert fake.chat_bodies == [
        {"model": "gpt-5", "messages": HI, "max_completion_tokens": 64, "reasoning_effort": "minimal", **TAIL}
    ]
    assert events[-1] == EndEvent(FinishReason.STOP, Usage(12, 5, reasoning_tokens=4))


@pytest.mark.parametrize(
    ("reasoning", "wire"),
    [
        (effort(ReasoningEffort.LOW), {"effort": "low"}),
        (ReasoningConfig(budget_tokens=2048), {"max_tokens": 2048}),
        (ReasoningConfig(disabled=True), {"enabled": False}),
    ],
)
async def test_openrouter_takes_a_reasoning_object(
    fake: FakeOpenAI, make: Make, reasoning: ReasoningConfig, wire: dict[str, Any]
) -> None:
    await run(make("openrouter"), ask(reasoning=reasoning))
    assert fake.chat_bodies == [{"model": "gpt-4o-mini", "messages": HI, "reasoning": wire, **TAIL}]


def test_the_target_is_the_vendor_row_or_the_host() -> None:
    assert WireTarget.of("https://api.openai.com/v1") == WireTarget(platform=True)
    # No `vendor:` in config, but the host is the OpenRouter row's.
    assert WireTarget.of("https://openrouter.ai/api/v1") == WireTarget(vendor="openrouter")
    assert WireTarget.of("http://127.0.0.1:9/v1", "openrouter") == WireTarget(vendor="openrouter")
    assert WireTarget.of("https://api.groq.com/openai/v1") == WireTarget(vendor="groq")
    assert WireTarget.of("http://localhost:8000/v1") == WireTarget()


# --- reasoning: the answer -----------------------------------------------------------------------


THOUGHTS = ["The", " user", " wants", " a greeting."]


@pytest.mark.parametrize(
    ("vendor", "field"),
    [
        ("openai", "reasoning"),  # vLLM, Ollama /v1
        ("openai", "reasoning_content"),  # llama.cpp, DeepSeek
        ("groq", "reasoning"),  # with "channel": "analysis", usage on the finish chunk
        ("openrouter", "reasoning"),  # with reasoning_details and a signature entry
    ],
)
async def test_reasoning_is_relayed_in_order_and_never_as_text(
    fake: FakeOpenAI, make: Make, vendor: str, field: str
) -> None:
    fake.vendor, fake.reasoning_field = vendor, field
    fake.reasoning_chunks = THOUGHTS
    fake.reasoning_tokens = 38
    fake.reply = Reply(text_chunks=["Hel", "lo!"], input_tokens=339, output_tokens=58)
    events = await run(make(vendor if vendor != "openai" else None), ask())
    assert events == [
        StartEvent("gpt-4o-mini"),
        *(ReasoningDeltaEvent(0, text=t) for t in THOUGHTS),
        TextDeltaEvent("Hel"),
        TextDeltaEvent("lo!"),
        EndEvent(FinishReason.STOP, Usage(339, 58, reasoning_tokens=38)),
    ]


async def test_usage_reads_cache_writes_and_reasoning_tokens(fake: FakeOpenAI, make: Make) -> None:
    fake.reasoning_tokens, fake.cache_write_tokens = 7, 1024
    fake.reply = Reply(input_tokens=2048, output_tokens=20, cached_input_tokens=512)
    events = await run(make(), ask())
    assert events[-1] == EndEvent(
        FinishReason.STOP,
        Usage(2048, 20, cached_input_tokens=512, cache_write_input_tokens=1024, reasoning_tokens=7),
    )


async def test_reasoning_parts_in_history_are_not_sent(fake: FakeOpenAI, make: Make) -> None:
    request = ask()
    request.messages = [
        Message(Role.USER, [TextPart("Weather in Paris?")]),
        Message(
            Role.ASSISTANT,
            [ReasoningPart("I should call the tool.", provider_type="openai"), TextPart("Checking.")],
            tool_calls=[ToolCall("call_1", "get_weather", '{"city":"Paris"}')],
        ),
        Message(Role.TOOL, [TextPart("18C")], tool_call_id="call_1"),
    ]
    await run(make("groq"), request)  # Groq answers 400 to reasoning_content sent back
    assert fake.chat_bodies[0]["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]


# --- structured outputs --------------------------------------------------------------------------


async def test_a_json_schema_format_and_strict_tools(fake: FakeOpenAI, make: Make) -> None:
    request = ask(
        response_format=ResponseFormat.JSON_SCHEMA,
        json_schema=JsonSchemaFormat("event", EVENT, description="One calendar event", strict=True),
    )
    request.tools = [
        Tool("find", "Find an event", EVENT, strict=True),
        Tool("now", strict=True),  # no parameters: strict needs the closed empty object
        Tool("loose", "Not strict", {"type": "object"}),
    ]
    await run(make(), request)
    [body] = fake.chat_bodies
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "event",
            "description": "One calendar event",
            "schema": EVENT,
            "strict": True,
        },
    }
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "find", "description": "Find an event", "parameters": EVENT, "strict": True},
        },
        {
            "type": "function",
            "function": {
                "name": "now",
                "parameters": {
                    "type": "object",
                    "properties": {},
                    "required": [],
                    "additionalProperties": False,
                },
                "strict": True,
            },
        },
        {
            "type": "function",
            "function": {"name": "loose", "description": "Not strict", "parameters": {"type": "object"}},
        },
    ]


async def test_a_non_strict_schema_says_strict_false(fake: FakeOpenAI, make: Make) -> None:
    schema = JsonSchemaFormat("event", {"type": "object"})
    await run(make(), ask(response_format=ResponseFormat.JSON_SCHEMA, json_schema=schema))
    assert fake.chat_bodies[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "event", "schema": {"type": "object"}, "strict": False},
    }


# --- documents -----------------------------------------------------------------------------------


async def test_documents_are_file_and_text_parts(fake: FakeOpenAI, make: Make) -> None:
    request = ask()
    request.messages = [
        Message(
            Role.USER,
            [
                TextPart("Summarise both."),
                DocumentPart(data=PDF, title="report.pdf"),
                DocumentPart(data=PDF),
                DocumentPart(data=b"Line one.\nLine two.", media_type="text/plain", title="notes"),
            ],
        )
    ]
    await run(make(), request)
    data = "data:application/pdf;base64," + base64.b64encode(PDF).decode()
    assert fake.chat_bodies[0]["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Summarise both."},
                {"type": "file", "file": {"filename": "report.pdf", "file_data": data}},
                {"type": "file", "file": {"filename": "document.pdf", "file_data": data}},
                {"type": "text", "text": "notes\n\nLine one.\nLine two."},
            ],
        }
    ]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (
            Message(Role.USER, [TextPart("Read it"), DocumentPart(url="https://example.com/a.pdf")]),
            "messages[0].content[1].document.url",
        ),
        (Message(Role.ASSISTANT, [DocumentPart(data=PDF)]), "messages[0].content"),
        (
            Message(Role.USER, [DocumentPart(data=b"\xff\xfe", media_type="text/plain")]),
            "messages[0].content[0].document.data",
        ),
    ],
)
async def test_documents_chat_completions_cannot_take_are_refused(
    fake: FakeOpenAI, make: Make, message: Message, field: str
) -> None:
    request = ask()
    request.messages = [message]
    p = make()
    await p.start()
    _, err = await collect_until_error(p, request)
    assert isinstance(err, errors.InvalidRequest) and err.violations[0][0] == field
    assert fake.chat_bodies == []


# --- refusals ------------------------------------------------------------------------------------


async def test_a_refusal_ends_the_answer_with_its_explanation(fake: FakeOpenAI, make: Make) -> None:
    fake.refusal_chunks = ["I'm sorry, ", "I can't help with that."]
    fake.reply = Reply(text_chunks=[], output_tokens=9)
    events = await run(make(), ask())
    assert [e for e in events if isinstance(e, TextDeltaEvent | ReasoningDeltaEvent)] == []
    assert events[-1] == EndEvent(
        FinishReason.REFUSAL, Usage(12, 9), refusal=Refusal(explanation="I'm sorry, I can't help with that.")
    )


async def test_a_content_filter_finish_stays_content_filter(fake: FakeOpenAI, make: Make) -> None:
    fake.refusal_chunks = ["Blocked."]
    fake.reply = Reply(text_chunks=[], finish="content_filter")
    events = await run(make(), ask())
    assert events[-1] == EndEvent(FinishReason.CONTENT_FILTER, Usage(12, 5), refusal=Refusal("Blocked."))


# --- metadata ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_platform", "vendor", "key"),
    [(True, None, "safety_identifier"), (False, None, "user"), (False, "groq", "user")],
)
async def test_the_end_user_id_goes_in_the_vendor_s_field(
    fake: FakeOpenAI,
    make: Make,
    monkeypatch: pytest.MonkeyPatch,
    on_platform: bool,
    vendor: str | None,
    key: str,
) -> None:
    if on_platform:
        openai = kinds.kind("openai")
        monkeypatch.setitem(
            kinds.KINDS, "openai", dataclasses.replace(openai, vendor_hosts=frozenset({"127.0.0.1"}))
        )
    request = ask()
    request.metadata = RequestMetadata(end_user_id="user-7f3a", tags=(("team", "search"),))
    await run(make(vendor), request)
    # Tags are never sent (OpenAI's `metadata` needs store: true).
    assert fake.chat_bodies == [{"model": "gpt-4o-mini", "messages": HI, key: "user-7f3a", **TAIL}]


# --- provider options ----------------------------------------------------------------------------


async def test_provider_options_add_vendor_parameters(fake: FakeOpenAI, make: Make) -> None:
    request = ask(temperature=0.3)
    options: dict[str, Any] = {"service_tier": "flex", "verbosity": "low", "reasoning_effort": "xhigh"}
    request.provider_options = options
    await run(make(), request)
    assert fake.chat_bodies == [
        {
            "model": "gpt-4o-mini",
            "messages": HI,
            "temperature": 0.3,
            **TAIL,
            "service_tier": "flex",
            "verbosity": "low",
            "reasoning_effort": "xhigh",  # the neutral efforts stop at high
        }
    ]


async def test_provider_options_merge_into_openrouter_s_reasoning(fake: FakeOpenAI, make: Make) -> None:
    request = ask(reasoning=effort(ReasoningEffort.HIGH))
    request.provider_options = {"reasoning": {"exclude": True}}
    await run(make("openrouter"), request)
    assert fake.chat_bodies[0]["reasoning"] == {"effort": "high", "exclude": True}


@pytest.mark.parametrize(
    ("options", "params", "vendor", "named"),
    [
        ({"temperature": 1}, {"temperature": 0.3}, None, "provider_options[openai].temperature"),
        (
            {"reasoning_effort": "low"},
            {"reasoning": effort(ReasoningEffort.HIGH)},
            None,
            "provider_options[openai].reasoning_effort",
        ),
        (
            {"reasoning": {"effort": "low"}},
            {"reasoning": effort(ReasoningEffort.HIGH)},
            "openrouter",
            "provider_options[openai].reasoning.effort",
        ),
        ({"response_format": {"type": "json_object"}}, {}, None, "provider_options[openai].response_format"),
        ({"max_completion_tokens": 9}, {}, None, "provider_options[openai].max_completion_tokens"),
        ({"tools": []}, {}, None, "provider_options[openai].tools"),
        ({"stream": False}, {}, None, "provider_options[openai].stream"),
        ({"user": "someone-else"}, {}, None, "provider_options[openai].user"),
    ],
)
async def test_provider_options_never_replace_what_the_broker_sets(
    fake: FakeOpenAI,
    make: Make,
    options: dict[str, Any],
    params: dict[str, Any],
    vendor: str | None,
    named: str,
) -> None:
    request = ask(**params)
    request.provider_options = options
    if "user" in options:
        request.metadata = RequestMetadata(end_user_id="user-7f3a")
    p = make(vendor)
    await p.start()
    _, err = await collect_until_error(p, request)
    assert isinstance(err, errors.InvalidRequest)
    assert [f for f, _ in err.violations] == [named]
    assert fake.chat_bodies == []


# --- the parser on shapes the fake does not stream -----------------------------------------------


def test_a_whole_message_is_read_like_a_delta() -> None:
    # A server that answers a stream in one piece puts `message` where `delta` would be.
    parser = ChunkParser(provider="p", model="m")
    events = parser.feed(
        {
            "choices": [
                {
                    "index": 0,
                    "message": {"reasoning_content": "Think.", "content": "Done."},
                    "finish_reason": "stop",
                }
            ]
        }
    )
    assert events == [ReasoningDeltaEvent(0, text="Think."), TextDeltaEvent("Done.")]
    assert parser.end().finish_reason == FinishReason.STOP


def test_a_refusal_is_kept_bounded() -> None:
    parser = ChunkParser(provider="p", model="m")
    for _ in range(3):
        parser.feed({"choices": [{"index": 0, "delta": {"refusal": "x" * MAX_REFUSAL_CHARS}}]})
    end = parser.end()
    assert end.finish_reason == FinishReason.REFUSAL
    assert end.refusal is not None and len(end.refusal.explanation) == MAX_REFUSAL_CHARS


def test_api_openai_com_refuses_a_strict_schema_with_an_optional_property_naming_its_path() -> None:
    from broker.providers.openai_request import WireTarget, build_body
    from broker.types import (
        CompletionRequest,
        JsonSchemaFormat,
        Message,
        ResponseFormat,
        Role,
        TextPart,
        Tool,
    )
    from broker.types import GenerationParams as GP

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    req = CompletionRequest(
        model="gpt-4o-mini",
        messages=[Message(Role.USER, [TextPart("hi")])],
        tools=[Tool("find", parameters=schema, strict=True)],
    )
    platform = WireTarget.of("https://api.openai.com/v1")
    with pytest.raises(errors.InvalidRequest) as info:
        build_body(req, target=platform)
    assert info.value.violations[0][0] == "tools[0].parameters.required"
    assert "missing 'days'" in info.value.violations[0][1]
    # A compatible server keeps its own rules: the same body goes out.
    assert build_body(req, target=WireTarget.of("http://127.0.0.1:8000/v1"))["tools"][0]["function"]["strict"]
    fmt = CompletionRequest(
        model="gpt-4o-mini",
        messages=[Message(Role.USER, [TextPart("hi")])],
        params=GP(
            response_format=ResponseFormat.JSON_SCHEMA, json_schema=JsonSchemaFormat("x", schema, strict=True)
        ),
    )
    with pytest.raises(errors.InvalidRequest) as info:
        build_body(fmt, target=platform)
    assert info.value.violations[0][0] == "params.json_schema.schema.required"
