"""What the 2026-contract tests of AnthropicProvider share (tests/test_anthropic_2026*.py):
a FakeAnthropic serving budget-only, adaptive and adaptive-only models, a started provider,
neutral requests, and a stream read to its end or error (`Outcome`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from broker import errors
from broker.config import ProviderConfig
from broker.providers.anthropic import AnthropicProvider
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    DocumentPart,
    EndEvent,
    GenerationParams,
    ImagePart,
    JsonSchemaFormat,
    Message,
    ReasoningConfig,
    ReasoningDeltaEvent,
    ReasoningPart,
    Role,
    TextDeltaEvent,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDeltaEvent,
)
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.providers import started

KEY = "fake-anthropic-key-2026-Rk4"
SONNET_45 = "claude-sonnet-4-5"  # budgeted thinking only; native structured outputs
SONNET_4 = "claude-sonnet-4-20250514"  # budgeted thinking; structured outputs by a forced tool
OPUS_46 = "claude-opus-4-6"  # adaptive thinking (and budgets)
OPUS_47 = "claude-opus-4-7"  # adaptive only
MODELS = [SONNET_45, SONNET_4, OPUS_46, OPUS_47]
WEATHER = Tool(
    "get_weather",
    "Weather by city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
# Thinking as the recordings stream it: pieces, one of them empty, newlines and non-ASCII.
THOUGHTS = ["The user wants", " the weather in ", "Zürich", "", ".\n\nI'll call get_weather 🌦"]
PERSON = JsonSchemaFormat(
    name="person",
    schema={
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    description="A person",
    strict=True,
)


def fake_anthropic() -> FakeAnthropic:
    """The fake for these tests (start it with `async with`)."""
    return FakeAnthropic(api_key=KEY, models=MODELS)


@contextlib.asynccontextmanager
async def provider_for(fake: FakeAnthropic) -> AsyncIterator[AnthropicProvider]:
    config = ProviderConfig(
        name="anthropic",
        type="anthropic",
        base_url=fake.url,
        api_key=SecretStr(KEY),
        read_timeout_seconds=5.0,
        connect_timeout_seconds=2.0,
    )
    async with started(AnthropicProvider(config)) as p:
        yield p


def user(*parts: str | TextPart | ImagePart | DocumentPart) -> Message:
    return Message(Role.USER, [TextPart(p) if isinstance(p, str) else p for p in parts])


def ask(*messages: Message, model: str = SONNET_45, **kw: Any) -> CompletionRequest:
    return CompletionRequest(
        model=model, messages=list(messages) or [user("Hi")], provider_type="anthropic", **kw
    )


def reasoning(**kw: Any) -> GenerationParams:
    extra = {k: kw.pop(k) for k in list(kw) if k in ("temperature", "top_p", "max_tokens")}
    return GenerationParams(reasoning=ReasoningConfig(**kw), **extra)


@dataclass
class Outcome:
    events: list[CompletionEvent] = field(default_factory=list)
    error: errors.BrokerError | None = None

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDeltaEvent))

    @property
    def reasoning(self) -> list[ReasoningDeltaEvent]:
        return [e for e in self.events if isinstance(e, ReasoningDeltaEvent)]

    def reasoning_parts(self) -> list[ReasoningPart]:
        """The reasoning blocks as a caller keeps them to send back (by ordinal)."""
        blocks: dict[int, dict[str, str]] = {}
        for e in self.reasoning:
            b = blocks.setdefault(e.index, {"text": "", "signature": "", "redacted_data": ""})
            b["text"] += e.text
            b["signature"] += e.signature
            b["redacted_data"] += e.redacted_data
        return [ReasoningPart(**blocks[k], provider_type="anthropic") for k in sorted(blocks)]

    @property
    def end(self) -> EndEvent:
        assert self.error is None, self.error
        assert isinstance(self.events[-1], EndEvent)
        return self.events[-1]

    def tool_calls(self) -> list[ToolCall]:
        calls: dict[int, list[str]] = {}
        for e in self.events:
            if isinstance(e, ToolCallDeltaEvent):
                call = calls.setdefault(e.index, ["", "", ""])
                call[0], call[1] = call[0] or e.id, call[1] or e.name
                call[2] += e.arguments_delta
        return [ToolCall(*calls[k]) for k in sorted(calls)]


async def run(provider: AnthropicProvider, request: CompletionRequest) -> Outcome:
    out = Outcome()
    try:
        async for event in provider.stream(request):
            out.events.append(event)
    except errors.BrokerError as exc:
        out.error = exc
    return out


async def refused(provider: AnthropicProvider, fake: FakeAnthropic, request: CompletionRequest) -> list[str]:
    """The fields an InvalidRequest names; asserts nothing went upstream."""
    out = await run(provider, request)
    assert isinstance(out.error, errors.InvalidRequest), out.error
    assert fake.message_bodies == [], "refused before any upstream call"
    return [f for f, _ in out.error.violations]
