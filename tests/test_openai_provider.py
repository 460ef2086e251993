"""OpenAIProvider against FakeOpenAI over real loopback HTTP, plus the pure wire mapping."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from pydantic import SecretStr

from broker import errors
from broker.config import ProviderConfig
from broker.providers.openai import OpenAIProvider
from broker.providers.openai_wire import (
    ChunkParser,
    build_body,
    error_from_payload,
    parse_error,
    parse_models,
)
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    EndEvent,
    FinishReason,
    GenerationParams,
    ImagePart,
    Message,
    ReasoningDeltaEvent,
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
    Usage,
)
from tests.fakes.http import FakeHTTPServer, Request, Response
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply, ToolCallScript, weather_tool_reply
from tests.httpclient import HTTP
from tests.providers import collect, collect_until_error, started

KEY = "sk-test-0123456789abcdef"
MODEL = "gpt-4o-mini"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def make_provider(url: str, *, api_key: str | None = KEY, read_timeout: float = 5.0) -> OpenAIProvider:
    cfg = ProviderConfig(
        name="oai",
        type="openai",
        base_url=url,
        api_key=SecretStr(api_key) if api_key else None,
        read_timeout_seconds=read_timeout,
        connect_timeout_seconds=2.0,
    )
    return OpenAIProvider(cfg)


def hello(model: str = MODEL) -> CompletionRequest:
    return CompletionRequest(model=model, messages=[Message(Role.USER, [TextPart("Hi")])])


def texts(events: list[CompletionEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, TextDeltaEvent)]


@pytest.fixture
async def fake():
    async with FakeOpenAI(api_key=KEY) as f:
        yield f


@pytest.fixture
async def provider(fake: FakeOpenAI):
    async with started(make_provider(fake.url)) as p:
        yield p


# --- request mapping ---------------------------------------------------------------------------


async def test_request_body_is_openai_chat_completions(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    request = CompletionRequest(
        model=MODEL,
        messages=[
            Message(Role.SYSTEM, [TextPart("Be terse.")]),
            Message(
                Role.USER,
                [
                    TextPart("Weather here?"),
                    ImagePart(data=b"\x89PNG\r\n\x1a\n", media_type="image/png"),
                    ImagePart(url="https://example.com/sky.jpg"),
                ],
            ),
            Message(Role.ASSISTANT, tool_calls=[ToolCall("call_1", "get_weather", '{"city":"Paris"}')]),
            Message(Role.TOOL, [TextPart("18C sunny")], tool_call_id="call_1"),
        ],
        tools=[Tool("get_weather", "Weather by city", WEATHER)],
        tool_choice=ToolChoice(ToolChoiceMode.TOOL, "get_weather"),
        params=GenerationParams(
            temperature=0.2,
            top_p=0.9,
            max_tokens=64,
            stop=("END",),
            seed=7,
            response_format=ResponseFormat.JSON,
        ),
    )
    await collect(provider, request)

    assert fake.chat_bodies == [
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "Be terse."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Weather here?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/sky.jpg"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18C sunny"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "description": "Weather by city",
                        "parameters": WEATHER,
                    },
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "temperature": 0.2,
            "top_p": 0.9,
            "max_tokens": 64,  # a local server, not api.openai.com
            "stop": ["END"],
            "seed": 7,
            "response_format": {"type": "json_object"},
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ]
    chat = next(r for r in fake.requests if r.path == "/v1/chat/completions")
    assert chat.method == "POST"
    assert chat.headers["authorization"] == f"Bearer {KEY}"
    assert chat.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("mode", "wire"),
    [(ToolChoiceMode.AUTO, "auto"), (ToolChoiceMode.NONE, "none"), (ToolChoiceMode.REQUIRED, "required")],
)
def test_tool_choice_modes(mode: ToolChoiceMode, wire: str) -> None:
    request = hello()
    request.tools = [Tool("f")]
    request.tool_choice = ToolChoice(mode)
    body = build_body(request)
    assert body["tool_choice"] == wire
    assert body["tools"] == [{"type": "function", "function": {"name": "f"}}]


def test_defaults_send_no_optional_fields() -> None:
    assert build_body(hello()) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_output_limit_field_is_not_decided_by_the_host() -> None:
    # The host rule is gone: whatever base_url, the field is decided per request model.
    for url in (
        "https://api.openai.com/v1",
        "https://x.openai.azure.com/openai/v1",
        "http://localhost:11434/v1",
    ):
        assert (
            OpenAIProvider(ProviderConfig(name="o", type="openai", base_url=url)).max_tokens_field == "auto"
        )
    assert OpenAIProvider(ProviderConfig(name="o", type="openai")).max_tokens_field == "auto"
    request = hello()
    request.params = GenerationParams(max_tokens=10)
    assert build_body(request, max_tokens_field="max_completion_tokens")["max_completion_tokens"] == 10
    assert build_body(request)["max_tokens"] == 10  # gpt-4o-mini: not a reasoning model


def test_image_outside_user_message_is_rejected() -> None:
    request = CompletionRequest(
        model=MODEL, messages=[Message(Role.ASSISTANT, [ImagePart(url="https://example.com/a.png")])]
    )
    with pytest.raises(errors.InvalidRequest) as info:
        build_body(request)
    assert info.value.violations[0][0] == "messages[0].content"


async def test_no_authorization_header_without_a_key() -> None:
    async with FakeOpenAI() as fake:  # local compatible servers run without keys
        p = make_provider(fake.url, api_key=None)
        await p.start()
        try:
            await collect(p, hello())
        finally:
            await p.close()
        assert "authorization" not in fake.requests[0].headers


# --- streaming -----------------------------------------------------------------------------------


async def test_text_arrives_as_ordered_deltas_with_usage(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.reply = Reply(
        text_chunks=["Hel", "lo", " there", "!"],
        input_tokens=12,
        output_tokens=5,
        cached_input_tokens=3,
        chunk_delay=0.15,
    )
    loop = asyncio.get_running_loop()
    stamped = [(loop.time(), ev) async for ev in provider.stream(hello())]
    events = [ev for _, ev in stamped]

    assert events[0] == StartEvent(model=MODEL)
    assert texts(events) == ["Hel", "lo", " there", "!"]
    assert events[-1] == EndEvent(
        FinishReason.STOP, Usage(input_tokens=12, output_tokens=5, cached_input_tokens=3)
    )
    assert sum(isinstance(e, EndEvent) for e in events) == 1
    # Streamed, not buffered: the first delta came long before the end.
    first_text = next(t for t, e in stamped if isinstance(e, TextDeltaEvent))
    assert stamped[-1][0] - first_text >= 0.4


async def test_tool_call_deltas_accumulate(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    reply = weather_tool_reply()
    reply.tool_calls.append(ToolCallScript("call_t2", "get_time", ['{"tz"', ': "CET"', "}"]))
    fake.reply = reply
    events = await collect(provider, hello())

    calls: dict[int, dict[str, str]] = {}
    for ev in events:
        if isinstance(ev, ToolCallDeltaEvent):
            if ev.index not in calls:
                assert ev.id and ev.name, "the first delta of a call names it"
                calls[ev.index] = {"id": ev.id, "name": ev.name, "args": ""}
            else:
                assert ev.id == "" and ev.name == ""
            calls[ev.index]["args"] += ev.arguments_delta
    assert {i: (c["id"], c["name"], json.loads(c["args"])) for i, c in calls.items()} == {
        0: ("call_w1", "get_weather", {"city": "Paris"}),
        1: ("call_t2", "get_time", {"tz": "CET"}),
    }
    assert texts(events) == []
    assert events[-1] == EndEvent(FinishReason.TOOL_CALLS, Usage(input_tokens=40, output_tokens=9))


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("stop", FinishReason.STOP),
        ("length", FinishReason.LENGTH),
        ("content_filter", FinishReason.CONTENT_FILTER),
    ],
)
async def test_finish_reasons(
    fake: FakeOpenAI, provider: OpenAIProvider, finish: str, expected: FinishReason
) -> None:
    fake.reply = Reply(finish=finish)
    events = await collect(provider, hello())
    assert isinstance(events[-1], EndEvent) and events[-1].finish_reason == expected


async def test_reported_model_name_does_not_replace_the_requested_one(
    fake: FakeOpenAI, provider: OpenAIProvider
) -> None:
    fake.reply = Reply(model="gpt-4o-mini-2024-07-18")
    events = await collect(provider, hello())
    assert events[0] == StartEvent(model=MODEL)


def test_parser_whole_tool_calls_and_compat_quirks() -> None:
    # Ollama /v1 sends whole calls at once and may say "stop" after them; reasoning is not text
    # but a reasoning delta of its own.
    parser = ChunkParser(provider="ollama", model="qwen3")
    events = parser.feed(
        {"choices": [{"index": 0, "delta": {"reasoning": "hmm", "content": ""}}], "obfuscation": "x"}
    )
    events += parser.feed(
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_a",
                                "type": "function",
                                "function": {"name": "f", "arguments": '{"x":1}'},
                            },
                            {
                                "index": 1,
                                "id": "call_b",
                                "type": "function",
                                "function": {"name": "g", "arguments": "{}"},
                            },
                        ]
                    },
                    "finish_reason": None,
                }
            ]
        }
    )
    events += parser.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    assert events == [
        ReasoningDeltaEvent(0, text="hmm"),  # the reasoning: relayed apart, never as text
        ToolCallDeltaEvent(0, "call_a", "f", '{"x":1}'),
        ToolCallDeltaEvent(1, "call_b", "g", "{}"),
    ]
    assert parser.end().finish_reason == FinishReason.TOOL_CALLS


@pytest.mark.parametrize(
    ("wire", "expected"), [("function_call", FinishReason.TOOL_CALLS), ("abort", FinishReason.OTHER)]
)
def test_parser_finish_mapping(wire: str, expected: FinishReason) -> None:
    parser = ChunkParser(provider="p", model="m")
    parser.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": wire}], "usage": None})
    assert parser.end() == EndEvent(expected, Usage(), usage_reported=False)


def test_mid_stream_error_payload_shapes() -> None:
    server = error_from_payload(
        {"message": "boom", "type": "server_error", "param": None, "code": None}, provider="p", model="m"
    )
    assert isinstance(server, errors.UpstreamUnavailable) and server.retryable
    ctx = error_from_payload(
        {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"},
        provider="p",
        model="m",
    )
    assert isinstance(ctx, errors.ContextLengthExceeded)
    vllm = error_from_payload(
        {"message": "slow down", "type": "RateLimitError", "code": 429}, provider="p", model="m"
    )
    assert isinstance(vllm, errors.UpstreamRateLimited)
    assert (vllm.provider, vllm.model, vllm.upstream_status) == ("p", "m", 429)


# --- errors ----------------------------------------------------------------------------------------


FAULTS: list[tuple[Fault, type[errors.BrokerError], bool]] = [
    (Fault("status", status=400), errors.UpstreamRejectedRequest, False),
    (Fault("status", status=400, error_type="context_length_exceeded"), errors.ContextLengthExceeded, False),
    (Fault("status", status=401), errors.UpstreamAuthFailed, False),
    (Fault("status", status=403), errors.UpstreamPermissionDenied, False),
    (Fault("status", status=404), errors.ModelNotFound, False),
    (Fault("status", status=409), errors.UpstreamConflict, True),
    (Fault("status", status=429), errors.UpstreamRateLimited, True),
    (Fault("status", status=429, error_type="insufficient_quota"), errors.UpstreamQuotaExceeded, False),
    (Fault("status", status=500), errors.UpstreamUnavailable, True),
    (Fault("status", status=502), errors.UpstreamUnavailable, True),
    (Fault("status", status=503), errors.UpstreamUnavailable, True),
    (Fault("status", status=504), errors.UpstreamTimeout, True),
    (Fault("reset_before_headers"), errors.UpstreamUnavailable, True),
    (Fault("stall_before_headers", seconds=3), errors.UpstreamTimeout, True),
    (Fault("stall_mid_stream", after_chunks=2, seconds=3), errors.UpstreamTimeout, True),
    (Fault("disconnect_mid_stream", after_chunks=2), errors.UpstreamUnavailable, True),
    (Fault("malformed", after_chunks=2), errors.UpstreamProtocolError, True),
    (Fault("no_terminator"), errors.UpstreamProtocolError, True),
    (Fault("error_event", after_chunks=2), errors.UpstreamUnavailable, True),
    (Fault("error_event", status=429, after_chunks=2), errors.UpstreamRateLimited, True),
]


@pytest.mark.parametrize(("fault", "expected", "retryable"), FAULTS, ids=lambda v: getattr(v, "kind", None))
async def test_fault_maps_to_broker_error(
    fake: FakeOpenAI, fault: Fault, expected: type[errors.BrokerError], retryable: bool
) -> None:
    fake.faults.append(fault)
    p = make_provider(fake.url, read_timeout=0.3)
    await p.start()
    try:
        events, err = await collect_until_error(p, hello())
    finally:
        await p.close()

    assert type(err) is expected, err
    assert err.retryable is retryable
    assert (err.provider, err.model) == ("oai", MODEL)
    if fault.kind in ("status", "reset_before_headers", "stall_before_headers"):
        assert events == [], "nothing may reach the caller before the upstream accepted"
    if fault.kind in ("stall_mid_stream", "disconnect_mid_stream", "malformed", "error_event"):
        assert events[0] == StartEvent(MODEL)
        assert texts(events) == ["Hel", "lo"]
    if fault.kind == "no_terminator":
        assert "[DONE]" in err.message and texts(events) == ["Hel", "lo", " there", "!"]
    if fault.kind == "status":
        assert err.upstream_status == fault.status


async def test_bad_request_keeps_upstream_message_and_param(
    fake: FakeOpenAI, provider: OpenAIProvider
) -> None:
    fake.faults.append(Fault("status", status=400))
    _, err = await collect_until_error(provider, hello())
    assert "Invalid value for 'temperature'" in err.message
    assert err.metadata == {"param": "temperature"}


async def test_gateway_html_error_keeps_a_short_snippet(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.faults.append(Fault("status", status=502))
    _, err = await collect_until_error(provider, hello())
    assert "502 Bad Gateway" in err.message and len(err.message) < 300


async def test_unknown_model_is_not_found(provider: OpenAIProvider) -> None:
    _, err = await collect_until_error(provider, hello("gpt-5-nope"))
    assert isinstance(err, errors.ModelNotFound)
    assert "gpt-5-nope" in err.message and err.model == "gpt-5-nope"


async def test_key_echoed_in_401_is_redacted() -> None:
    wrong = "sk-wrong-key-abcdef123456"
    async with FakeOpenAI(api_key=KEY, echo_full_key=True) as fake:
        p = make_provider(fake.url, api_key=wrong)
        await p.start()
        try:
            _, err = await collect_until_error(p, hello())
        finally:
            await p.close()
    assert isinstance(err, errors.UpstreamAuthFailed)
    assert "Incorrect API key provided" in err.message
    assert wrong not in err.message and wrong not in str(err) and "abcdef123456" not in err.message


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "7", "x-ratelimit-reset-requests": "20s"}, 7.0),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    ],
)
async def test_rate_limit_carries_retry_after(
    fake: FakeOpenAI, provider: OpenAIProvider, headers: dict[str, str], seconds: float
) -> None:
    fake.faults.append(Fault("status", status=429, headers={"x-ratelimit-limit-requests": "3", **headers}))
    _, err = await collect_until_error(provider, hello())
    assert isinstance(err, errors.UpstreamRateLimited)
    assert err.retry_after == seconds


async def test_non_event_stream_200_is_a_protocol_error() -> None:
    async def portal(req: Request, resp: Response) -> None:
        await resp.send(
            200, "<html><body>Please log in to the guest Wi-Fi</body></html>", content_type="text/html"
        )

    async with FakeHTTPServer(portal) as server:
        p = make_provider(server.url + "/v1")
        await p.start()
        try:
            events, err = await collect_until_error(p, hello())
        finally:
            await p.close()
    assert isinstance(err, errors.UpstreamProtocolError) and events == []
    assert "text/html" in err.message and "guest Wi-Fi" in err.message


async def test_closing_the_stream_early_disconnects_upstream(
    fake: FakeOpenAI, provider: OpenAIProvider
) -> None:
    fake.reply = Reply(text_chunks=["tok"] * 50, chunk_delay=0.1)
    stream = provider.stream(hello())
    async for ev in stream:
        if isinstance(ev, TextDeltaEvent):
            break
    loop = asyncio.get_running_loop()
    closed_at = loop.time()
    await stream.aclose()
    seen_at = await asyncio.wait_for(fake.server.disconnects.get(), 1.0)
    assert seen_at - closed_at < 1.0


async def test_connection_is_reused_even_when_the_consumer_stops_at_the_end(
    fake: FakeOpenAI, provider: OpenAIProvider
) -> None:
    for _ in range(3):
        stream = provider.stream(hello())
        async for ev in stream:
            if isinstance(ev, EndEvent):
                break
        await stream.aclose()
    await collect(provider, hello())
    assert fake.connections == 1


# --- models and health ----------------------------------------------------------------------------------


async def test_list_models(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.models = ["gpt-4o-mini", "gpt-4o", "o3-mini"]
    assert [m.name for m in await provider.list_models()] == ["gpt-4o-mini", "gpt-4o", "o3-mini"]


def test_parse_models_reads_vllm_context_and_rejects_garbage() -> None:
    doc = {"object": "list", "data": [{"id": "meta-llama/Llama-3.1-8B", "max_model_len": 32768}, {"id": ""}]}
    models = parse_models(doc, provider="vllm")
    assert [(m.name, m.context_window) for m in models] == [("meta-llama/Llama-3.1-8B", 32768)]
    with pytest.raises(errors.UpstreamProtocolError):
        parse_models({"models": []}, provider="vllm")


async def test_health_follows_the_upstream(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    await provider.health_check()
    await fake.stop()
    with pytest.raises(errors.UpstreamUnavailable) as info:
        await provider.health_check()
    assert info.value.provider == "oai" and info.value.retryable
    await fake.start()  # same port again
    await provider.health_check()


async def test_health_fails_on_a_wrong_key(fake: FakeOpenAI) -> None:
    p = make_provider(fake.url, api_key="sk-not-the-right-one-000")
    await p.start()
    try:
        with pytest.raises(errors.UpstreamAuthFailed) as info:
            await p.health_check()
    finally:
        await p.close()
    assert not info.value.retryable and "not-the-right-one" not in info.value.message


# --- error bodies -------------------------------------------------------------------------------------------


def test_parse_error_shapes() -> None:
    openai = parse_error(
        429,
        json.dumps(
            {
                "error": {
                    "message": "You exceeded your current quota",
                    "type": "insufficient_quota",
                    "param": None,
                    "code": "insufficient_quota",
                }
            }
        ).encode(),
    )
    assert (openai.message, openai.kind, openai.param) == (
        "You exceeded your current quota",
        "insufficient_quota",
        "",
    )
    old_vllm = parse_error(
        400, b'{"object":"error","message":"bad temp","type":"BadRequestError","param":null,"code":400}'
    )
    assert (old_vllm.message, old_vllm.kind) == ("bad temp", "BadRequestError")
    llama = parse_error(503, b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}')
    assert (llama.message, llama.kind) == ("Loading model", "unavailable_error")
    text = parse_error(500, b"upstream connect error " * 40)
    assert text.message.startswith("upstream connect error") and len(text.message) <= 203
    assert parse_error(500, b"").message == ""


# --- the fake itself (other suites rely on it) ----------------------------------------------------


async def test_fake_answers_non_streaming_and_masks_wrong_keys(fake: FakeOpenAI) -> None:
    fake.reply = weather_tool_reply()
    async with HTTP(fake.url + "/") as client:
        ok = await client.post(
            "chat/completions",
            json={"model": MODEL, "messages": []},
            headers={"authorization": f"Bearer {KEY}"},
        )
        bad = await client.get("models", headers={"authorization": "Bearer sk-wrong-key"})
    body = ok.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert ok.headers["x-request-id"].startswith("req_")
    assert bad.status_code == 401
    assert bad.json()["error"]["message"].startswith("Incorrect API key provided: sk-wro*****key.")


# --- the real thing -------------------------------------------------------------------------------


@pytest.mark.real_openai
@pytest.mark.skipif(not os.environ.get("OPENAI_API_KEY"), reason="OPENAI_API_KEY is not set")
async def test_real_openai_streams_a_tiny_completion() -> None:
    p = OpenAIProvider(
        ProviderConfig(name="openai", type="openai", api_key=SecretStr(os.environ["OPENAI_API_KEY"]))
    )
    await p.start()
    try:
        request = hello()
        request.messages = [Message(Role.USER, [TextPart("Reply with the single word: pong")])]
        request.params = GenerationParams(max_tokens=16, temperature=0)
        events = await collect(p, request)
    finally:
        await p.close()
    assert events[0] == StartEvent(MODEL)
    assert "pong" in "".join(texts(events)).lower()
    end = events[-1]
    assert isinstance(end, EndEvent) and end.finish_reason == FinishReason.STOP
    assert end.usage.input_tokens > 0 and end.usage.output_tokens > 0
