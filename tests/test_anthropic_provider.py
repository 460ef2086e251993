"""AnthropicProvider against FakeAnthropic over real loopback HTTP (and, when a key is set, the real API)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import SecretStr

from broker import errors
from broker.config import ProviderConfig
from broker.providers.anthropic import AnthropicProvider
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    EndEvent,
    FinishReason,
    GenerationParams,
    ImagePart,
    Message,
    ResponseFormat,
    Role,
    StartEvent,
    TextDeltaEvent,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDeltaEvent,
    ToolChoice,
    ToolChoiceMode,
)
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.script import Fault, Reply, ToolCallScript, weather_tool_reply
from tests.httpclient import HTTP
from tests.providers import started

MODEL = "claude-sonnet-4-5"
# Not shaped like a well-known key, so only the provider's own registration can redact it.
KEY = "fake-anthropic-key-7Qx9Zt"
WEATHER = Tool(
    "get_weather", "Weather by city", {"type": "object", "properties": {"city": {"type": "string"}}}
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY) as f:
        yield f


def make_provider(fake: FakeAnthropic, *, api_key: str = KEY, read_timeout: float = 5.0) -> AnthropicProvider:
    config = ProviderConfig(
        name="anthropic",
        type="anthropic",
        base_url=fake.url,
        api_key=SecretStr(api_key),
        read_timeout_seconds=read_timeout,
        connect_timeout_seconds=2.0,
    )
    return AnthropicProvider(config)


@pytest.fixture
async def provider(fake: FakeAnthropic) -> AsyncIterator[AnthropicProvider]:
    async with started(make_provider(fake)) as p:
        yield p


def user(*parts: str | ImagePart) -> Message:
    return Message(Role.USER, [TextPart(p) if isinstance(p, str) else p for p in parts])


def ask(*messages: Message, **kw: Any) -> CompletionRequest:
    return CompletionRequest(model=MODEL, messages=list(messages) or [user("Hi")], **kw)


@dataclass
class Outcome:
    events: list[CompletionEvent] = field(default_factory=list)
    error: errors.BrokerError | None = None

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDeltaEvent))

    @property
    def end(self) -> EndEvent:
        ends = [e for e in self.events if isinstance(e, EndEvent)]
        assert len(ends) == 1 and self.events[-1] is ends[0]
        return ends[0]

    def tool_calls(self) -> dict[int, dict[str, str]]:
        calls: dict[int, dict[str, str]] = {}
        for e in self.events:
            if isinstance(e, ToolCallDeltaEvent):
                call = calls.setdefault(e.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = call["id"] or e.id
                call["name"] = call["name"] or e.name
                call["arguments"] += e.arguments_delta
        return calls


async def run(provider: AnthropicProvider, request: CompletionRequest) -> Outcome:
    out = Outcome()
    try:
        async for event in provider.stream(request):
            out.events.append(event)
    except errors.BrokerError as exc:
        out.error = exc
    return out


# --- the happy path ------------------------------------------------------------------------


async def test_text_arrives_as_several_deltas_between_start_and_end(fake, provider):
    out = await run(provider, ask())
    assert out.error is None
    assert out.events[0] == StartEvent(model=MODEL)
    assert [e.text for e in out.events if isinstance(e, TextDeltaEvent)] == ["Hel", "lo", " there", "!"]
    assert out.end.finish_reason == FinishReason.STOP
    assert (out.end.usage.input_tokens, out.end.usage.output_tokens) == (12, 5)
    sent = fake.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/messages")
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"


async def test_start_names_the_model_requested_even_when_upstream_reports_a_snapshot(fake, provider):
    fake.reply = Reply(model="claude-sonnet-4-5-20250929")
    out = await run(provider, ask())
    assert out.events[0] == StartEvent(model=MODEL)
    assert out.text == "Hello there!"


async def test_completions_reuse_one_pooled_connection(fake, provider):
    for _ in range(3):
        assert (await run(provider, ask())).error is None
    assert fake.connections == 1


async def test_a_consumer_that_stops_at_end_still_leaves_the_connection_reusable(fake, provider):
    for _ in range(2):
        stream = provider.stream(ask())
        async for event in stream:
            if isinstance(event, EndEvent):
                break
        await stream.aclose()
    assert fake.connections == 1


async def test_conversation_maps_to_anthropic_turns(fake, provider):
    png = b"\x89PNG\r\n\x1a\nfake"
    request = ask(
        Message(Role.SYSTEM, [TextPart("Be terse.")]),
        Message(Role.SYSTEM, [TextPart("Answer in French.")]),
        user("Hi"),
        user("Look:", ImagePart(data=png, media_type="image/png")),
        Message(
            Role.ASSISTANT,
            [TextPart("Checking.")],
            tool_calls=[
                ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'),
                ToolCall("toolu_2", "get_weather", '{"city": "Atlantis"}'),
            ],
        ),
        Message(Role.TOOL, [TextPart("18C sunny")], tool_call_id="toolu_1"),
        Message(Role.TOOL, [TextPart("no such city")], tool_call_id="toolu_2", is_error=True),
        user("And this?", ImagePart(url="https://example.com/cat.jpg")),
        tools=[WEATHER],
        tool_choice=ToolChoice(ToolChoiceMode.AUTO),
        params=GenerationParams(temperature=0.2, top_p=0.9, stop=("\n\nHuman:",), seed=7),
        default_max_tokens=64000,
    )
    out = await run(provider, request)
    assert out.error is None  # the fake checks tool_use/tool_result pairing as the API does
    body = fake.message_bodies[-1]
    assert body["system"] == "Be terse.\n\nAnswer in French."
    assert body["stream"] is True
    assert body["max_tokens"] == 64000
    assert (body["temperature"], body["top_p"], body["stop_sequences"]) == (0.2, 0.9, ["\n\nHuman:"])
    assert "seed" not in body
    assert body["tools"] == [
        {"name": "get_weather", "description": "Weather by city", "input_schema": WEATHER.parameters}
    ]
    assert body["tool_choice"] == {"type": "auto"}
    b64 = base64.b64encode(png).decode()
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hi"},
                {"type": "text", "text": "Look:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Atlantis"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C sunny", "is_error": False},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": "no such city",
                    "is_error": True,
                },
                {"type": "text", "text": "And this?"},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("max_tokens", "default_max_tokens", "sent"),
    [(100, 64000, 100), (None, 64000, 64000), (None, None, 4096)],
)
async def test_max_tokens_is_always_sent(fake, provider, max_tokens, default_max_tokens, sent):
    request = ask(params=GenerationParams(max_tokens=max_tokens), default_max_tokens=default_max_tokens)
    assert (await run(provider, request)).error is None
    assert fake.message_bodies[-1]["max_tokens"] == sent


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        (ToolChoice(ToolChoiceMode.REQUIRED), {"type": "any"}),
        (ToolChoice(ToolChoiceMode.NONE), {"type": "none"}),
        (ToolChoice(ToolChoiceMode.TOOL, "get_weather"), {"type": "tool", "name": "get_weather"}),
    ],
)
async def test_tool_choice_modes(fake, provider, choice, sent):
    assert (await run(provider, ask(tools=[WEATHER], tool_choice=choice))).error is None
    assert fake.message_bodies[-1]["tool_choice"] == sent


async def test_json_mode_sends_no_field_the_api_lacks(fake, provider):
    # The fake rejects unknown top-level fields ("Extra inputs are not permitted") as the API does.
    out = await run(provider, ask(params=GenerationParams(response_format=ResponseFormat.JSON)))
    assert out.error is None


async def test_invalid_tool_arguments_are_the_callers_mistake(fake, provider):
    bad = Message(Role.ASSISTANT, tool_calls=[ToolCall("toolu_1", "get_weather", '{"city": ')])
    out = await run(
        provider, ask(user("Hi"), bad, Message(Role.TOOL, [TextPart("x")], tool_call_id="toolu_1"))
    )
    assert isinstance(out.error, errors.InvalidRequest)
    assert out.error.violations[0][0] == "messages[1].tool_calls[0].arguments"
    assert fake.message_bodies == []  # nothing was sent


async def test_temperature_above_one_is_refused_before_sending(fake, provider):
    out = await run(provider, ask(params=GenerationParams(temperature=1.5)))
    assert isinstance(out.error, errors.InvalidRequest)
    assert out.error.violations[0][0] == "params.temperature"
    assert "0 to 1" in out.error.message
    assert (out.error.provider, out.error.model) == ("anthropic", MODEL)
    assert fake.message_bodies == []


async def test_tool_use_without_tool_result_is_rejected_by_upstream(fake, provider):
    asked = Message(Role.ASSISTANT, tool_calls=[ToolCall("toolu_1", "get_weather", '{"city": "Paris"}')])
    out = await run(provider, ask(user("Weather?"), asked, user("Never mind")))
    assert isinstance(out.error, errors.UpstreamRejectedRequest)
    assert "must begin with a matching number of tool_result blocks" in out.error.message
    assert out.error.upstream_status == 400


# --- tool calls, usage, stop reasons -------------------------------------------------------


async def test_tool_call_round_trip(fake, provider):
    fake.reply = weather_tool_reply()
    first = await run(provider, ask(user("Weather in Paris?"), tools=[WEATHER]))
    calls = first.tool_calls()
    assert list(calls) == [0]
    assert (calls[0]["id"], calls[0]["name"]) == ("call_w1", "get_weather")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert first.end.finish_reason == FinishReason.TOOL_CALLS
    assert first.end.usage.input_tokens == 40

    # Send the call back with its result: the fake accepts it only if the pairing is right.
    fake.reply = Reply(text_chunks=["18C and sunny."])
    call = ToolCall(calls[0]["id"], calls[0]["name"], calls[0]["arguments"])
    second = await run(
        provider,
        ask(
            user("Weather in Paris?"),
            Message(Role.ASSISTANT, tool_calls=[call]),
            Message(Role.TOOL, [TextPart("18C sunny")], tool_call_id=call.id),
            tools=[WEATHER],
        ),
    )
    assert second.error is None and second.text == "18C and sunny."


async def test_text_then_two_tool_calls_keep_their_own_index(fake, provider):
    fake.reply = Reply(
        text_chunks=["Let me ", "check."],
        tool_calls=[
            ToolCallScript("toolu_a", "get_weather", ['{"ci', 'ty": "Paris"}']),
            ToolCallScript("toolu_b", "get_time", ["{}"]),
        ],
        finish="tool_calls",
    )
    out = await run(provider, ask(tools=[WEATHER, Tool("get_time")]))
    assert out.text == "Let me check."
    calls = out.tool_calls()
    assert calls == {
        0: {"id": "toolu_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "toolu_b", "name": "get_time", "arguments": "{}"},
    }
    first_tool = next(i for i, e in enumerate(out.events) if isinstance(e, ToolCallDeltaEvent))
    assert all(not isinstance(e, TextDeltaEvent) for e in out.events[first_tool:])


async def test_a_tool_without_parameters_still_gets_json_arguments(fake, provider):
    # Anthropic streams only an empty partial_json for a call with no input.
    fake.reply = Reply(
        text_chunks=[], tool_calls=[ToolCallScript("toolu_n", "get_time", [])], finish="tool_calls"
    )
    out = await run(provider, ask(tools=[Tool("get_time")]))
    assert out.tool_calls() == {0: {"id": "toolu_n", "name": "get_time", "arguments": "{}"}}


async def test_images_as_data_urls_are_sent_inline(fake, provider):
    data = base64.b64encode(b"GIF89a-fake").decode()
    out = await run(provider, ask(user("What is it?", ImagePart(url=f"data:image/gif;base64,{data}"))))
    assert out.error is None
    image = fake.message_bodies[-1]["messages"][0]["content"][1]
    assert image == {"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": data}}


async def test_image_bytes_need_a_media_type(fake, provider):
    out = await run(provider, ask(user("What is it?", ImagePart(data=b"\x89PNG"))))
    assert isinstance(out.error, errors.InvalidRequest)
    assert out.error.violations[0][0] == "messages[0].content[1].media_type"


async def test_usage_counts_cached_input(fake, provider):
    fake.reply = Reply(input_tokens=100, cached_input_tokens=60, output_tokens=7)
    fake.cache_creation_input_tokens = 30
    usage = (await run(provider, ask())).end.usage
    assert (usage.input_tokens, usage.output_tokens) == (100, 7)
    assert (usage.cached_input_tokens, usage.cache_write_input_tokens) == (60, 30)


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", FinishReason.STOP),
        ("stop_sequence", FinishReason.STOP),
        ("pause_turn", FinishReason.STOP),
        ("max_tokens", FinishReason.LENGTH),
        ("model_context_window_exceeded", FinishReason.LENGTH),
        ("tool_use", FinishReason.TOOL_CALLS),
        ("refusal", FinishReason.REFUSAL),
        ("something_new", FinishReason.OTHER),
    ],
)
async def test_stop_reasons(fake, provider, stop_reason, finish):
    fake.reply = Reply(finish=stop_reason)  # the fake passes through values it does not translate
    assert (await run(provider, ask())).end.finish_reason == finish


# --- failures ------------------------------------------------------------------------------

PROMPT_TOO_LONG = "prompt is too long: 250123 tokens > 200000 maximum"
NO_CREDIT = "Your credit balance is too low to access the Anthropic API."


@pytest.mark.parametrize(
    ("fault", "expected", "retryable"),
    [
        (Fault("status", 400), errors.UpstreamRejectedRequest, False),
        (Fault("status", 400, message=PROMPT_TOO_LONG), errors.ContextLengthExceeded, False),
        (Fault("status", 400, message=NO_CREDIT), errors.UpstreamQuotaExceeded, False),
        (Fault("status", 401), errors.UpstreamAuthFailed, False),
        (Fault("status", 402), errors.UpstreamQuotaExceeded, False),
        (Fault("status", 403), errors.UpstreamPermissionDenied, False),
        (Fault("status", 404), errors.ModelNotFound, False),
        (Fault("status", 413), errors.ContextLengthExceeded, False),
        (Fault("status", 429), errors.UpstreamRateLimited, True),
        (Fault("status", 500), errors.UpstreamUnavailable, True),
        (Fault("status", 504), errors.UpstreamTimeout, True),
        (Fault("status", 529), errors.UpstreamUnavailable, True),
        (Fault("reset_before_headers"), errors.UpstreamUnavailable, True),
        (Fault("stall_before_headers", seconds=5), errors.UpstreamTimeout, True),
        (Fault("stall_mid_stream", after_chunks=2, seconds=5), errors.UpstreamTimeout, True),
        (Fault("disconnect_mid_stream", after_chunks=2), errors.UpstreamUnavailable, True),
        (Fault("malformed", after_chunks=2), errors.UpstreamProtocolError, True),
        (Fault("no_terminator"), errors.UpstreamProtocolError, True),
        (Fault("error_event", after_chunks=2), errors.UpstreamUnavailable, True),
        (
            Fault("error_event", error_type="rate_limit_error", message="slow down"),
            errors.UpstreamRateLimited,
            True,
        ),
        (Fault("error_event", error_type="invalid_request_error"), errors.UpstreamRejectedRequest, False),
    ],
    ids=lambda v: (
        f"{v.kind}-{v.status if v.kind == 'status' else v.error_type or ''}" if isinstance(v, Fault) else ""
    ),
)
async def test_faults_map_to_broker_errors(fake, fault, expected, retryable):
    fake.faults.append(fault)
    provider = make_provider(fake, read_timeout=0.3)
    await provider.start()
    try:
        out = await run(provider, ask())
    finally:
        await provider.close()
    assert out.error is not None and type(out.error) is expected, out.error
    assert out.error.retryable is retryable
    assert (out.error.provider, out.error.model) == ("anthropic", MODEL)
    assert KEY not in str(out.error)
    if fault.kind == "status":
        assert out.error.upstream_status == fault.status
        assert not out.events  # nothing streamed before an HTTP error
    if fault.kind in ("stall_mid_stream", "disconnect_mid_stream", "malformed", "error_event"):
        # What arrived before the failure was passed on.
        assert out.text == "".join(Reply().text_chunks[: fault.after_chunks])
    assert not any(isinstance(e, EndEvent) for e in out.events)


async def test_rate_limit_carries_retry_after(fake, provider):
    fake.faults.append(Fault("status", 429, headers={"retry-after": "7"}))
    out = await run(provider, ask())
    assert isinstance(out.error, errors.UpstreamRateLimited)
    assert out.error.retry_after == 7.0


async def test_overloaded_529_is_unavailable_and_keeps_the_message(fake, provider):
    fake.faults.append(Fault("status", 529))
    out = await run(provider, ask())
    assert isinstance(out.error, errors.UpstreamUnavailable) and out.error.retryable
    assert "Overloaded" in out.error.message and "request id req_" in out.error.message


async def test_the_key_never_reaches_an_error_message(fake):
    # An upstream that echoes the key it was given, as some gateways do.
    fake.faults.append(Fault("status", 401, message=f"invalid x-api-key: {KEY}"))
    provider = make_provider(fake)
    await provider.start()
    try:
        echoed = await run(provider, ask())
    finally:
        await provider.close()
    assert isinstance(echoed.error, errors.UpstreamAuthFailed)
    assert KEY not in str(echoed.error) and "[REDACTED]" in echoed.error.message

    wrong = make_provider(fake, api_key="wrong-key-for-this-fake")
    await wrong.start()
    try:
        refused = await run(wrong, ask())
    finally:
        await wrong.close()
    assert isinstance(refused.error, errors.UpstreamAuthFailed)
    assert "wrong-key-for-this-fake" not in str(refused.error)


async def test_closing_the_stream_early_closes_the_upstream_request(fake, provider):
    fake.reply = Reply(text_chunks=[f"word{i} " for i in range(50)], chunk_delay=0.1)
    stream = provider.stream(ask())
    async for event in stream:
        if isinstance(event, TextDeltaEvent):
            break
    closed_at = asyncio.get_running_loop().time()
    await stream.aclose()
    seen_at = await asyncio.wait_for(fake.server.disconnects.get(), timeout=1.0)
    assert seen_at - closed_at < 1.0


# --- listing and health --------------------------------------------------------------------


async def test_list_models_follows_pagination(fake, provider):
    fake.models = [f"claude-test-{i:04d}" for i in range(2345)]
    models = await provider.list_models()
    assert [m.name for m in models] == fake.models
    assert models[0].context_window == 200000
    queries = [r.query for r in fake.requests if r.path == "/v1/models"]
    assert queries == [
        "limit=1000",
        "limit=1000&after_id=claude-test-0999",
        "limit=1000&after_id=claude-test-1999",
    ]


async def test_health_check_is_a_cheap_listing(fake, provider):
    await provider.health_check()
    assert [(r.method, r.path, r.query) for r in fake.requests] == [("GET", "/v1/models", "limit=1")]

    await fake.stop()
    with pytest.raises(errors.UpstreamUnavailable):
        await provider.health_check()
    await fake.start()  # the same port: the provider recovers without a restart
    await provider.health_check()


async def test_health_check_reports_a_bad_key(fake):
    provider = make_provider(fake, api_key="not-the-right-key")
    await provider.start()
    try:
        with pytest.raises(errors.UpstreamAuthFailed):
            await provider.health_check()
    finally:
        await provider.close()


async def test_fake_rejects_what_the_api_rejects(fake):
    # Keeps the fake honest: these are the real API's answers to requests the provider never sends.
    async with HTTP(fake.url) as client:
        good = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        r = await client.post("/v1/messages", json=body, headers=good)
        assert (r.status_code, r.json()["error"]["message"]) == (400, "max_tokens: Field required")
        assert r.headers["request-id"].startswith("req_")
        r = await client.post("/v1/messages", json={**body, "max_tokens": 10}, headers={"x-api-key": KEY})
        assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]
        r = await client.post(
            "/v1/messages", json={**body, "max_tokens": 10, "model": "gpt-4o"}, headers=good
        )
        assert (r.status_code, r.json()["error"]) == (
            404,
            {"type": "not_found_error", "message": "model: gpt-4o"},
        )
        r = await client.post("/v1/messages", json={**body, "max_tokens": 10}, headers=good)
        assert r.status_code == 200 and r.json()["content"] == [{"type": "text", "text": "Hello there!"}]


# --- the real API --------------------------------------------------------------------------


@pytest.mark.real_anthropic
@pytest.mark.skipif(not os.environ.get("ANTHROPIC_API_KEY"), reason="ANTHROPIC_API_KEY is not set")
async def test_real_anthropic_streams_a_short_answer():
    config = ProviderConfig(
        name="anthropic", type="anthropic", api_key=SecretStr(os.environ["ANTHROPIC_API_KEY"])
    )
    provider = AnthropicProvider(config)
    await provider.start()
    try:
        model = os.environ.get("ANTHROPIC_MODEL", "claude-haiku-4-5")
        request = CompletionRequest(
            model=model,
            messages=[user("Reply with the single word: pong")],
            params=GenerationParams(max_tokens=16),
        )
        out = await run(provider, request)
        assert out.error is None, out.error
        assert isinstance(out.events[0], StartEvent)
        assert "pong" in out.text.lower()
        assert out.end.usage.input_tokens > 0 and out.end.usage.output_tokens > 0
        await provider.health_check()
    finally:
        await provider.close()
