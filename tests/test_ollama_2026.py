"""Issue 13 on the Ollama side: think, thinking in the answer and in history, format schemas,
documents, metadata and provider options, through OllamaProvider against FakeOllama over
real loopback HTTP.

A neutral CompletionRequest goes in; the /api/chat body the fake received and the neutral
events that came back are asserted exactly. The fake checks `think` as Ollama's
server/routes.go does (a thinking request to a model without the capability is a 400).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker import errors
from broker.config import ProviderConfig
from broker.providers.ollama import OllamaProvider
from broker.types import (
    Capability,
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
from tests.fakes.ollama_upstream import FakeModel, FakeOllama
from tests.fakes.script import Reply
from tests.providers import collect, collect_until_error, started

THINKER = "qwen3"
HI = [{"role": "user", "content": "Hi"}]
EVENT = {
    "type": "object",
    "properties": {"name": {"type": "string"}},
    "required": ["name"],
    "additionalProperties": False,
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    models = [
        FakeModel(THINKER, ("completion", "tools", "thinking"), 40960, "qwen3", "1.7B"),
        FakeModel("llama3.2"),
    ]
    async with FakeOllama(models=models) as f:
        yield f


@pytest.fixture
async def provider(fake: FakeOllama) -> AsyncIterator[OllamaProvider]:
    cfg = ProviderConfig(name="local", type="ollama", base_url=fake.url, read_timeout_seconds=5.0)
    async with started(OllamaProvider(cfg)) as p:
        yield p


def ask(model: str = THINKER, **params: Any) -> CompletionRequest:
    return CompletionRequest(
        model=model,
        messages=[Message(Role.USER, [TextPart("Hi")])],
        params=GenerationParams(**params),
        provider_type="ollama",
    )


async def refused(provider: OllamaProvider, request: CompletionRequest) -> errors.InvalidRequest:
    _, err = await collect_until_error(provider, request)
    assert isinstance(err, errors.InvalidRequest)
    return err


# --- reasoning: the request ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reasoning", "think"),
    [
        (ReasoningConfig(effort=ReasoningEffort.MINIMAL), "low"),
        (ReasoningConfig(effort=ReasoningEffort.LOW), "low"),
        (ReasoningConfig(effort=ReasoningEffort.MEDIUM), "medium"),
        (ReasoningConfig(effort=ReasoningEffort.HIGH), "high"),
        (ReasoningConfig(disabled=True), False),
    ],
)
async def test_reasoning_is_think(
    fake: FakeOllama, provider: OllamaProvider, reasoning: ReasoningConfig, think: bool | str
) -> None:
    await collect(provider, ask(reasoning=reasoning))
    assert fake.chat_bodies == [{"model": THINKER, "messages": HI, "stream": True, "think": think}]


async def test_no_reasoning_asked_sends_no_think(fake: FakeOllama, provider: OllamaProvider) -> None:
    await collect(provider, ask())
    assert fake.chat_bodies == [{"model": THINKER, "messages": HI, "stream": True}]


async def test_a_budget_is_refused_before_any_call(fake: FakeOllama, provider: OllamaProvider) -> None:
    err = await refused(provider, ask(reasoning=ReasoningConfig(budget_tokens=4096)))
    [(field, why)] = err.violations
    assert field == "params.reasoning.budget_tokens" and "not a token budget" in why
    assert fake.chat_bodies == []


async def test_thinking_asked_of_a_model_without_it_is_capability_missing(
    fake: FakeOllama, provider: OllamaProvider
) -> None:
    _, err = await collect_until_error(
        provider, ask("llama3.2", reasoning=ReasoningConfig(effort=ReasoningEffort.HIGH))
    )
    assert isinstance(err, errors.CapabilityMissing)
    assert '"llama3.2" does not support thinking' in err.message
    # Turning thinking off is fine on any model.
    events = await collect(provider, ask("llama3.2", reasoning=ReasoningConfig(disabled=True)))
    assert isinstance(events[-1], EndEvent) and events[-1].finish_reason == FinishReason.STOP


# --- reasoning: the answer and the history -------------------------------------------------------


async def test_thinking_is_relayed_in_order_before_the_text(
    fake: FakeOllama, provider: OllamaProvider
) -> None:
    fake.thinking_chunks = ["Okay, ", "the user ", "says hi."]
    fake.reply = Reply(text_chunks=["Hel", "lo!"], input_tokens=150, output_tokens=181)
    events = await collect(provider, ask(reasoning=ReasoningConfig(effort=ReasoningEffort.MEDIUM)))
    assert events == [
        StartEvent(THINKER),
        ReasoningDeltaEvent(0, text="Okay, "),
        ReasoningDeltaEvent(0, text="the user "),
        ReasoningDeltaEvent(0, text="says hi."),
        TextDeltaEvent("Hel"),
        TextDeltaEvent("lo!"),
        EndEvent(FinishReason.STOP, Usage(150, 181)),
    ]


async def test_think_false_gets_no_thinking(fake: FakeOllama, provider: OllamaProvider) -> None:
    fake.thinking_chunks = ["not shown"]
    events = await collect(provider, ask(reasoning=ReasoningConfig(disabled=True)))
    assert not [e for e in events if isinstance(e, ReasoningDeltaEvent)]


async def test_reasoning_in_history_goes_back_as_thinking(fake: FakeOllama, provider: OllamaProvider) -> None:
    request = ask()
    request.messages = [
        Message(Role.USER, [TextPart("Weather in New York?")]),
        Message(
            Role.ASSISTANT,
            [
                ReasoningPart("The user wants the weather. ", provider_type="ollama"),
                ReasoningPart("Call it.", provider_type="ollama"),
            ],
            tool_calls=[ToolCall("call_fadz9if9", "get_weather", '{"location":"New York"}')],
        ),
        Message(Role.TOOL, [TextPart("3C, snow")], tool_call_id="call_fadz9if9"),
    ]
    await collect(provider, request)
    assert fake.chat_bodies[0]["messages"] == [
        {"role": "user", "content": "Weather in New York?"},
        {
            "role": "assistant",
            "content": "",
            "thinking": "The user wants the weather. Call it.",
            "tool_calls": [
                {
                    "function": {"name": "get_weather", "arguments": {"location": "New York"}},
                    "id": "call_fadz9if9",
                }
            ],
        },
        {"role": "tool", "content": "3C, snow", "tool_name": "get_weather", "tool_call_id": "call_fadz9if9"},
    ]


# --- structured outputs, documents, metadata -----------------------------------------------------


async def test_a_json_schema_is_format_and_strict_tools_send_no_strict(
    fake: FakeOllama, provider: OllamaProvider
) -> None:
    request = ask(
        response_format=ResponseFormat.JSON_SCHEMA, json_schema=JsonSchemaFormat("event", EVENT, strict=True)
    )
    request.tools = [Tool("find", "Find an event", EVENT, strict=True)]
    await collect(provider, request)
    assert fake.chat_bodies == [
        {
            "model": THINKER,
            "messages": HI,
            "stream": True,
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "find", "description": "Find an event", "parameters": EVENT},
                }
            ],
            "format": EVENT,
        }
    ]


async def test_a_document_is_refused(fake: FakeOllama, provider: OllamaProvider) -> None:
    request = ask()
    request.messages = [Message(Role.USER, [TextPart("Read"), DocumentPart(data=b"%PDF-1.7")])]
    err = await refused(provider, request)
    assert err.violations[0][0] == "messages[0].content[1].document"
    assert fake.chat_bodies == []


async def test_metadata_is_not_sent(fake: FakeOllama, provider: OllamaProvider) -> None:
    request = ask()
    request.metadata = RequestMetadata(end_user_id="user-7f3a", tags=(("team", "search"),))
    await collect(provider, request)
    assert fake.chat_bodies == [{"model": THINKER, "messages": HI, "stream": True}]


# --- provider options ----------------------------------------------------------------------------


async def test_provider_options_merge_into_the_body_and_its_options(
    fake: FakeOllama, provider: OllamaProvider
) -> None:
    request = ask(temperature=0.2, max_tokens=64)
    options: dict[str, Any] = {"options": {"num_ctx": 8192}, "keep_alive": "10m", "think": "max"}
    request.provider_options = options
    await collect(provider, request)
    assert fake.chat_bodies == [
        {
            "model": THINKER,
            "messages": HI,
            "stream": True,
            "options": {"temperature": 0.2, "num_predict": 64, "num_ctx": 8192},
            "keep_alive": "10m",
            "think": "max",  # the broker set no think: Ollama's own level beyond high
        }
    ]


@pytest.mark.parametrize(
    ("options", "params", "named"),
    [
        (
            {"options": {"temperature": 1}},
            {"temperature": 0.2},
            "provider_options[ollama].options.temperature",
        ),
        ({"think": True}, {"reasoning": ReasoningConfig(disabled=True)}, "provider_options[ollama].think"),
        (
            {"format": {"required": []}},
            {"response_format": ResponseFormat.JSON_SCHEMA, "json_schema": JsonSchemaFormat("e", EVENT)},
            "provider_options[ollama].format",
        ),
        ({"tools": []}, {}, "provider_options[ollama].tools"),
        ({"model": "llama3.2"}, {}, "provider_options[ollama].model"),
        ({"stream": False}, {}, "provider_options[ollama].stream"),
    ],
)
async def test_provider_options_never_replace_what_the_broker_sets(
    fake: FakeOllama, provider: OllamaProvider, options: dict[str, Any], params: dict[str, Any], named: str
) -> None:
    request = ask(**params)
    request.provider_options = options
    err = await refused(provider, request)
    assert [f for f, _ in err.violations] == [named]
    assert fake.chat_bodies == []


async def test_a_format_option_is_fine_when_the_broker_set_none(
    fake: FakeOllama, provider: OllamaProvider
) -> None:
    request = ask()
    request.provider_options = {"format": EVENT}
    await collect(provider, request)
    assert fake.chat_bodies[0]["format"] == EVENT


# --- discovery -----------------------------------------------------------------------------------


async def test_a_thinking_model_is_discovered_with_reasoning(provider: OllamaProvider) -> None:
    models = {m.name: m for m in await provider.list_models()}
    formats = {Capability.JSON_MODE, Capability.STRUCTURED_OUTPUTS}
    assert models[THINKER].capabilities == frozenset({Capability.TOOLS, Capability.REASONING, *formats})
    assert models["llama3.2"].capabilities == frozenset({Capability.TOOLS, *formats})
