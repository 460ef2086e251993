"""OllamaProvider against FakeOllama over real loopback HTTP (and a real server when present)."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import aiohttp
import pytest

from broker import errors
from broker.config import ProviderConfig, ollama_host_url
from broker.providers.ollama import OllamaProvider
from broker.types import (
    Capability,
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
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.script import Fault, Reply, ToolCallScript, weather_tool_reply
from tests.httpclient import HTTP
from tests.providers import collect, collect_until_error, started

PNG = b"\x89PNG\r\n\x1a\n fake image bytes"
WEATHER = Tool(
    name="get_weather",
    description="Current weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture
async def fake():
    async with FakeOllama() as f:
        yield f


def make_provider(url: str, *, read_timeout: float = 0.5) -> OllamaProvider:
    cfg = ProviderConfig(
        name="local",
        type="ollama",
        base_url=url,
        read_timeout_seconds=read_timeout,
        connect_timeout_seconds=1.0,
    )
    return OllamaProvider(cfg)


@pytest.fixture
async def provider(fake):
    async with started(make_provider(fake.url)) as p:
        yield p


def ask(text: str = "Hi", model: str = "llama3.2", **kw) -> CompletionRequest:
    return CompletionRequest(model=model, messages=[Message(Role.USER, [TextPart(text)])], **kw)


def text_of(events: list[CompletionEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDeltaEvent))


# --- request mapping ---------------------------------------------------------------------------


async def test_request_body_carries_options_images_tools_and_json_format(fake, provider):
    request = CompletionRequest(
        model="llama3.2",
        messages=[
            Message(Role.SYSTEM, [TextPart("Be brief.")]),
            Message(
                Role.USER,
                [TextPart("What is "), ImagePart(data=PNG, media_type="image/png"), TextPart("this?")],
            ),
        ],
        tools=[WEATHER],
        params=GenerationParams(
            temperature=0.2,
            top_p=0.9,
            max_tokens=64,
            stop=("###",),
            seed=7,
            response_format=ResponseFormat.JSON,
        ),
    )
    await collect(provider, request)

    [body] = fake.chat_bodies
    assert body["model"] == "llama3.2"
    assert body["stream"] is True
    assert body["options"] == {
        "temperature": 0.2,
        "top_p": 0.9,
        "num_predict": 64,
        "stop": ["###"],
        "seed": 7,
    }
    assert body["format"] == "json"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?", "images": [base64.b64encode(PNG).decode()]},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": WEATHER.description,
                "parameters": WEATHER.parameters,
            },
        }
    ]


async def test_defaults_send_no_options_and_no_format(fake, provider):
    await collect(provider, ask())
    [body] = fake.chat_bodies
    assert "options" not in body and "format" not in body and "tools" not in body


async def test_tool_call_and_tool_result_turns(fake, provider):
    request = CompletionRequest(
        model="llama3.2",
        messages=[
            Message(Role.USER, [TextPart("Weather in Paris?")]),
            Message(
                Role.ASSISTANT,
                tool_calls=[ToolCall(id="call_0", name="get_weather", arguments='{"city": "Paris"}')],
            ),
            Message(Role.TOOL, [TextPart("11 degrees")], tool_call_id="call_0"),
        ],
        tools=[WEATHER],
    )
    await collect(provider, request)

    assistant, tool = fake.chat_bodies[0]["messages"][1:]
    assert assistant["role"] == "assistant"
    # Ollama wants the arguments as an object, not the JSON text the neutral type holds.
    assert assistant["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert tool["role"] == "tool" and tool["content"] == "11 degrees" and tool["tool_name"] == "get_weather"


async def test_tool_choice_none_offers_no_tools(fake, provider):
    await collect(provider, ask(tools=[WEATHER], tool_choice=ToolChoice(ToolChoiceMode.NONE)))
    assert "tools" not in fake.chat_bodies[0]


async def test_image_by_url_is_rejected_before_any_request(fake, provider):
    request = CompletionRequest(
        model="llava",
        messages=[
            Message(Role.USER, [TextPart("What is this?"), ImagePart(url="https://example.com/cat.png")])
        ],
    )
    with pytest.raises(errors.InvalidRequest) as info:
        await collect(provider, request)
    [(field, description)] = info.value.violations
    assert field == "messages[0].content[1].image.url"
    assert "inline image bytes" in description
    assert fake.chat_bodies == []


async def test_image_as_data_url_is_sent_inline(fake, provider):
    b64 = base64.b64encode(PNG).decode()
    request = CompletionRequest(
        model="llava", messages=[Message(Role.USER, [ImagePart(url=f"data:image/png;base64,{b64}")])]
    )
    await collect(provider, request)
    assert fake.chat_bodies[0]["messages"][0]["images"] == [b64]


async def test_invalid_tool_call_arguments_name_the_field(fake, provider):
    request = CompletionRequest(
        model="llama3.2",
        messages=[
            Message(Role.ASSISTANT, tool_calls=[ToolCall(id="c1", name="get_weather", arguments="{city:")])
        ],
    )
    with pytest.raises(errors.InvalidRequest) as info:
        await collect(provider, request)
    assert info.value.violations[0][0] == "messages[0].tool_calls[0].arguments"


# --- streamed answer ---------------------------------------------------------------------------


async def test_text_arrives_as_several_deltas_with_usage(fake, provider):
    fake.reply = Reply(text_chunks=["Hé", "llo", " wörld", " ✓"], input_tokens=26, output_tokens=4)
    events = await collect(provider, ask())

    assert events[0] == StartEvent(model="llama3.2")
    assert [e.text for e in events if isinstance(e, TextDeltaEvent)] == ["Hé", "llo", " wörld", " ✓"]
    end = events[-1]
    assert [e for e in events if isinstance(e, EndEvent)] == [end]  # exactly one, and last
    assert isinstance(end, EndEvent) and end.finish_reason == FinishReason.STOP
    assert (end.usage.input_tokens, end.usage.output_tokens) == (26, 4)


async def test_length_done_reason_maps_to_length(fake, provider):
    fake.reply = Reply(finish="length")
    events = await collect(provider, ask(params=GenerationParams(max_tokens=4)))
    assert isinstance(events[-1], EndEvent) and events[-1].finish_reason == FinishReason.LENGTH


async def test_tool_calls_arrive_whole_with_stable_ids(fake, provider):
    # Older Ollama sends no ids: the provider numbers the calls itself.
    fake.reply = Reply(
        text_chunks=[],
        tool_calls=[
            ToolCallScript(id="", name="get_weather", argument_chunks=['{"city": "Paris"}']),
            ToolCallScript(id="", name="get_weather", argument_chunks=['{"city": "Tokyo"}']),
        ],
        finish="tool_calls",
    )
    events = await collect(provider, ask("Weather in Paris and Tokyo?", tools=[WEATHER]))

    calls = [e for e in events if isinstance(e, ToolCallDeltaEvent)]
    assert [(c.index, c.id, c.name) for c in calls] == [
        (0, "call_0", "get_weather"),
        (1, "call_1", "get_weather"),
    ]
    assert [json.loads(c.arguments_delta) for c in calls] == [{"city": "Paris"}, {"city": "Tokyo"}]
    assert isinstance(events[-1], EndEvent) and events[-1].finish_reason == FinishReason.TOOL_CALLS


async def test_tool_call_keeps_the_id_ollama_gives(fake, provider):
    fake.reply = weather_tool_reply()
    events = await collect(provider, ask("Weather in Paris?", tools=[WEATHER]))
    [call] = [e for e in events if isinstance(e, ToolCallDeltaEvent)]
    assert (call.index, call.id, call.name) == (0, "call_w1", "get_weather")
    assert json.loads(call.arguments_delta) == {"city": "Paris"}
    end = events[-1]
    assert isinstance(end, EndEvent) and (end.usage.input_tokens, end.usage.output_tokens) == (40, 9)


async def test_model_not_pulled_says_how_to_pull_it(provider):
    with pytest.raises(errors.ModelNotFound) as info:
        await collect(provider, ask(model="mistral"))
    assert "ollama pull mistral" in info.value.message
    assert info.value.model == "mistral" and info.value.upstream_status == 404


async def test_tools_on_a_model_without_tools_is_a_missing_capability(provider):
    with pytest.raises(errors.CapabilityMissing, match="does not support tools"):
        await collect(provider, ask(model="llava", tools=[WEATHER]))


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault("status", status=500), errors.UpstreamUnavailable),
        (Fault("status", status=503), errors.UpstreamUnavailable),
        (Fault("status", status=400, message="invalid options"), errors.UpstreamRejectedRequest),
        (Fault("reset_before_headers"), errors.UpstreamUnavailable),
        (Fault("stall_before_headers", seconds=5), errors.UpstreamTimeout),
        (Fault("stall_mid_stream", seconds=5), errors.UpstreamTimeout),
        (Fault("disconnect_mid_stream"), errors.UpstreamUnavailable),
        (Fault("malformed"), errors.UpstreamProtocolError),
        (Fault("no_terminator"), errors.UpstreamProtocolError),
        (Fault("error_event"), errors.UpstreamUnavailable),
    ],
    ids=lambda v: v.kind + (f"-{v.status}" if v.kind == "status" else "") if isinstance(v, Fault) else "",
)
async def test_faults_map_to_broker_errors(fake, provider, fault, expected):
    fake.faults.append(fault)
    events, err = await collect_until_error(provider, ask())

    assert type(err) is expected
    assert err.provider == "local" and err.model == "llama3.2"
    if fault.kind in ("stall_mid_stream", "disconnect_mid_stream", "malformed", "error_event"):
        assert text_of(events) == "Hel"  # what came before the failure reached the caller
    assert not any(isinstance(e, EndEvent) for e in events)


async def test_rate_limit_keeps_retry_after(fake, provider):
    fake.faults.append(Fault("status", status=429, headers={"retry-after": "3"}))
    _, err = await collect_until_error(provider, ask())
    assert isinstance(err, errors.UpstreamRateLimited) and err.retry_after == 3.0


async def test_closing_the_stream_early_closes_the_upstream_request(fake, provider):
    fake.reply = Reply(text_chunks=[f"t{i} " for i in range(50)], chunk_delay=0.1)
    stream = provider.stream(ask())
    assert isinstance(await anext(stream), StartEvent)
    assert isinstance(await anext(stream), TextDeltaEvent)
    await stream.aclose()
    await asyncio.wait_for(fake.server.disconnects.get(), 1.0)


async def test_consecutive_streams_reuse_the_pooled_connection(fake, provider):
    for _ in range(3):
        await collect(provider, ask())
    # Each stream read its body to the end, so one keep-alive connection served all three.
    assert len(fake.chat_bodies) == 3 and fake.server.open_connections == 1
    assert fake.server.disconnects.empty()


# --- discovery and health ----------------------------------------------------------------------


async def test_discovery_reads_capabilities_and_context_length(provider):
    models = {m.name: m for m in await provider.list_models()}

    # The embedding-only model cannot chat, so it is not offered for completions.
    assert set(models) == {"llama3.2", "llava"}
    # A format (json or a schema) works with every chat model; no "thinking" listed, no REASONING.
    formats = {Capability.JSON_MODE, Capability.STRUCTURED_OUTPUTS}
    assert models["llama3.2"].capabilities == {Capability.TOOLS, *formats}
    assert models["llama3.2"].context_window == 131072
    assert models["llava"].capabilities == {Capability.VISION, *formats}
    assert models["llava"].context_window == 32768


async def test_a_failing_show_still_lists_the_model(fake, provider):
    fake.broken_show.add("llava")
    models = {m.name: m for m in await provider.list_models()}

    assert models["llava"].capabilities is None and models["llava"].context_window is None
    assert models["llama3.2"].context_window == 131072


async def test_health_check_follows_the_server(fake, provider):
    await provider.health_check()

    fake.version_fault = Fault("status", status=500)
    with pytest.raises(errors.UpstreamUnavailable):
        await provider.health_check()

    fake.version_fault = None
    await fake.stop()
    with pytest.raises(errors.UpstreamUnavailable, match="cannot reach"):
        await provider.health_check()

    await fake.start()  # same port: the provider recovers without a restart
    await provider.health_check()


async def test_base_url_that_is_not_the_ollama_host_is_explained(fake):
    p = make_provider(fake.url + "/v1")
    await p.start()
    try:
        with pytest.raises(errors.UpstreamUnavailable, match="base_url must be the Ollama host"):
            await p.health_check()
    finally:
        await p.close()


# --- a real server -----------------------------------------------------------------------------


def _real_host() -> str:
    return ollama_host_url(os.environ.get("OLLAMA_HOST") or "localhost:11434")


async def _real_ollama_answers(url: str) -> bool:
    try:
        async with HTTP(timeout=0.5) as client:
            resp = await client.get(f"{url}/api/version")
        return resp.status_code == 200 and "version" in resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False


@pytest.mark.real_ollama
async def test_real_ollama_streams_a_short_answer():
    url = _real_host()
    if not await _real_ollama_answers(url):
        pytest.skip(f"no Ollama server answers at {url}")
    p = make_provider(url, read_timeout=120.0)
    await p.start()
    try:
        await p.health_check()
        models = await p.list_models()
        wanted = os.environ.get("OLLAMA_TEST_MODEL") or (models[0].name if models else "")
        if not wanted:
            pytest.skip("the Ollama server has no chat model pulled (set OLLAMA_TEST_MODEL)")
        events = await collect(
            p, ask("Reply with the single word: hi", model=wanted, params=GenerationParams(max_tokens=8))
        )
    finally:
        await p.close()
    assert isinstance(events[0], StartEvent)
    end = events[-1]
    assert isinstance(end, EndEvent) and end.usage.input_tokens > 0 and end.usage.output_tokens > 0
    assert text_of(events).strip()
