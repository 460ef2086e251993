"""GeminiProvider against FakeGemini and the recorded Gemini traffic, over real loopback HTTP.

Every answer reaches the provider cut into random pieces (tests/fakes/segment.py), one test
in pieces of at most 3 bytes; the recordings' own bytes are served verbatim too.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import SecretStr

from broker import errors
from broker.config import ProviderConfig, settings_from_env
from broker.providers.gemini import GeminiProvider
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    DocumentPart,
    EmbedRequest,
    EndEvent,
    FinishReason,
    GenerationParams,
    ImagePart,
    JsonSchemaFormat,
    Message,
    ReasoningConfig,
    ReasoningDeltaEvent,
    ReasoningEffort,
    ReasoningPart,
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
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import broker_settings, required_error_info, stub
from tests.fakes.gemini_upstream import SKIP_SIGNATURE, FakeGemini
from tests.fakes.http import FakeHTTPServer, Request, Response
from tests.fakes.script import Fault, Reply, weather_tool_reply
from tests.fakes.segment import Segmenter
from tests.providers import collect, collect_until_error, started

KEY = "AIzaSy-test-gemini-4b7c91d2"
RECORDINGS = Path(__file__).parents[1].parent / "shared" / "recordings"
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")
WEATHER = Tool(
    "get_weather",
    "Weather by city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    async with FakeGemini(api_key=KEY) as f:
        yield f


def make(url: str, *, key: str | None = KEY) -> GeminiProvider:
    return GeminiProvider(
        ProviderConfig(
            name="gm",
            type="gemini",
            base_url=url,
            api_key=SecretStr(key) if key is not None else None,
            read_timeout_seconds=5.0,
            connect_timeout_seconds=2.0,
        )
    )


@pytest.fixture
async def provider(fake: FakeGemini) -> AsyncIterator[GeminiProvider]:
    async with started(make(fake.url)) as p:
        yield p


def user(*parts: str | ImagePart | DocumentPart) -> Message:
    return Message(Role.USER, [TextPart(p) if isinstance(p, str) else p for p in parts])


def ask(*messages: Message, model: str = "gemini-2.5-flash", **kw: Any) -> CompletionRequest:
    return CompletionRequest(
        model=model, messages=list(messages) or [user("Hi")], provider_type="gemini", **kw
    )


def end_of(events: list[CompletionEvent]) -> EndEvent:
    assert isinstance(events[-1], EndEvent), events[-1]
    return events[-1]


def text_of(events: list[CompletionEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDeltaEvent))


# --- text, sampling, the request --------------------------------------------------------------


async def test_text_stream_and_the_request_it_sent(fake: FakeGemini, provider: GeminiProvider) -> None:
    fake.reply = Reply(text_chunks=["The", " capital", " is", " Paris."], input_tokens=13, output_tokens=8)
    system = Message(Role.SYSTEM, [TextPart("You are terse.")])
    events = await collect(
        provider,
        ask(
            system,
            user("Capital of France?"),
            params=GenerationParams(temperature=0.2, top_p=0.9, max_tokens=64, stop=("END",), seed=7),
        ),
    )
    assert isinstance(events[0], StartEvent)
    assert [e.text for e in events if isinstance(e, TextDeltaEvent)] == ["The", " capital", " is", " Paris."]
    end = end_of(events)
    assert end.finish_reason is FinishReason.STOP and (end.usage.input_tokens, end.usage.output_tokens) == (
        13,
        8,
    )
    req = fake.server.requests[-1]
    assert req.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent" and req.query == "alt=sse"
    assert req.headers["x-goog-api-key"] == KEY and "key=" not in req.query
    assert req.json() == {
        "contents": [{"role": "user", "parts": [{"text": "Capital of France?"}]}],
        "systemInstruction": {"parts": [{"text": "You are terse."}]},
        "generationConfig": {
            "temperature": 0.2,
            "topP": 0.9,
            "maxOutputTokens": 64,
            "stopSequences": ["END"],
            "seed": 7,
        },
    }


async def test_three_byte_pieces_change_nothing(fake: FakeGemini, provider: GeminiProvider) -> None:
    fake.server.segmenter = Segmenter("random", seed=15, max_piece=3)
    fake.reply = Reply(text_chunks=["Un", "é", " 😀 ", "fin"], input_tokens=3, output_tokens=4)
    events = await collect(provider, ask())
    assert text_of(events) == "Uné 😀 fin" and end_of(events).usage.output_tokens == 4


async def test_bad_requests_fail_before_the_upstream(fake: FakeGemini, provider: GeminiProvider) -> None:
    cases = [
        (ask(params=GenerationParams(temperature=2.5)), "params.temperature"),
        (ask(params=GenerationParams(stop=("a", "b", "c", "d", "e", "f"))), "params.stop"),
        (
            ask(user("x"), Message(Role.TOOL, [TextPart("1")], tool_call_id="nope")),
            "messages[1].tool_call_id",
        ),
        (
            ask(model="gemini-2.5-pro", params=GenerationParams(reasoning=ReasoningConfig(budget_tokens=64))),
            "params.reasoning.budget_tokens",
        ),
        (
            ask(
                model="gemini-2.0-flash",
                params=GenerationParams(reasoning=ReasoningConfig(effort=ReasoningEffort.LOW)),
            ),
            "params.reasoning",
        ),
        (ask(tool_choice=ToolChoice(ToolChoiceMode.REQUIRED)), "tool_choice"),
        (ask(user(ImagePart(url="https://example.com/picture"))), "messages[0].content[0].media_type"),
    ]
    for request, field in cases:
        with pytest.raises(errors.InvalidRequest) as info:
            await collect(provider, request)
        assert info.value.violations[0][0] == field, info.value.violations
    assert fake.server.requests == []


async def test_provider_options_merge_and_cannot_override(fake: FakeGemini, provider: GeminiProvider) -> None:
    options = {
        "generationConfig": {"topK": 40},
        "safetySettings": [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_ONLY_HIGH"}],
    }
    await collect(provider, ask(params=GenerationParams(max_tokens=10), provider_options=options))
    body = fake.bodies[-1]
    assert (
        body["generationConfig"] == {"maxOutputTokens": 10, "topK": 40}
        and body["safetySettings"][0]["threshold"] == "BLOCK_ONLY_HIGH"
    )
    with pytest.raises(errors.InvalidRequest) as info:
        await collect(provider, ask(provider_options={"contents": []}))
    assert info.value.violations[0][0] == "provider_options[gemini].contents"


# --- images, documents, structured outputs ------------------------------------------------------


async def test_images_and_documents_go_inline(fake: FakeGemini, provider: GeminiProvider) -> None:
    pdf = b"%PDF-1.4 tiny"
    await collect(
        provider,
        ask(
            user(
                "Look",
                ImagePart(data=PNG, media_type="image/png"),
                DocumentPart(data=pdf, title="Terms"),
                ImagePart(url="gs://bucket/cat.jpg"),
            )
        ),
    )
    parts = fake.bodies[-1]["contents"][0]["parts"]
    assert parts == [
        {"text": "Look"},
        {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PNG).decode()}},
        {"text": "Terms"},
        {"inlineData": {"mimeType": "application/pdf", "data": base64.b64encode(pdf).decode()}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "gs://bucket/cat.jpg"}},
    ]


async def test_json_schema_answers_by_model_generation(fake: FakeGemini, provider: GeminiProvider) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": ["string", "null"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    params = GenerationParams(
        response_format=ResponseFormat.JSON_SCHEMA,
        json_schema=JsonSchemaFormat("answer", schema, strict=True),
    )
    fake.reply = Reply(text_chunks=['{"city": "Paris"}'])
    events = await collect(provider, ask(params=params))
    assert json.loads(text_of(events)) == {"city": "Paris"}
    assert fake.bodies[-1]["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseJsonSchema": schema,
    }
    await collect(provider, ask(model="gemini-2.0-flash", params=params))
    assert fake.bodies[-1]["generationConfig"]["responseSchema"] == {
        "type": "OBJECT",
        "properties": {"city": {"type": "STRING", "nullable": True}},
        "required": ["city"],
    }


# --- tools --------------------------------------------------------------------------------------


async def test_tool_call_round_trip(fake: FakeGemini, provider: GeminiProvider) -> None:
    fake.reply = weather_tool_reply()
    events = await collect(
        provider, ask(user("Weather in Paris?"), tools=[WEATHER], tool_choice=ToolChoice(ToolChoiceMode.AUTO))
    )
    calls = [e for e in events if isinstance(e, ToolCallDeltaEvent)]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id.startswith("call_")
    assert json.loads(calls[0].arguments_delta) == {"city": "Paris"}
    assert end_of(events).finish_reason is FinishReason.TOOL_CALLS
    body = fake.bodies[-1]
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather by city",
                    "parametersJsonSchema": WEATHER.parameters,
                }
            ]
        }
    ]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}

    fake.reply = Reply(text_chunks=["18C."])
    history = [
        user("Weather in Paris?"),
        Message(Role.ASSISTANT, [], [ToolCall(calls[0].id, "get_weather", calls[0].arguments_delta)]),
        Message(Role.TOOL, [TextPart('{"temp_c": 18}')], tool_call_id=calls[0].id),
        Message(Role.TOOL, [TextPart("not json")], tool_call_id=calls[0].id),
    ]
    fake.reply = Reply(text_chunks=["18C."])
    with pytest.raises(errors.UpstreamRejectedRequest, match="number of function response parts"):
        await collect(provider, ask(*history, tools=[WEATHER]))  # two answers to one call: the API's 400
    events = await collect(
        provider,
        ask(*history[:3], tools=[WEATHER], tool_choice=ToolChoice(ToolChoiceMode.TOOL, "get_weather")),
    )
    assert text_of(events) == "18C."
    body = fake.bodies[-1]
    assert body["contents"][1] == {
        "role": "model",
        "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": calls[0].id}}],
    }
    assert body["contents"][2] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"temp_c": 18}, "id": calls[0].id}}
        ],
    }
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }


async def test_gemini_3_signatures_go_back_on_their_parts(fake: FakeGemini, provider: GeminiProvider) -> None:
    model = "gemini-3-pro-preview"
    fake.thought_chunks = ["**Planning**\n\nI should call the tool.", " Then answer."]
    fake.thoughts_tokens = 5  # of the reply's 9 output tokens
    fake.reply = weather_tool_reply()
    reasoning = GenerationParams(reasoning=ReasoningConfig(effort=ReasoningEffort.MEDIUM))
    events = await collect(provider, ask(user("Weather?"), model=model, tools=[WEATHER], params=reasoning))
    assert fake.bodies[-1]["generationConfig"]["thinkingConfig"] == {
        "thinkingLevel": "HIGH",
        "includeThoughts": True,
    }
    thoughts = [e for e in events if isinstance(e, ReasoningDeltaEvent)]
    assert [(t.index, t.text, bool(t.signature)) for t in thoughts] == [
        (0, "**Planning**\n\nI should call the tool.", False),
        (0, " Then answer.", False),
        (1, "", True),  # the call's signature: a block of its own, just before the call
    ]
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("ToolCallDeltaEvent") == kinds.index("ReasoningDeltaEvent") + 3
    end = end_of(events)
    assert end.usage.reasoning_tokens == 5 and end.usage.output_tokens == 9
    call = next(e for e in events if isinstance(e, ToolCallDeltaEvent))
    signature = thoughts[2].signature
    assistant = Message(
        Role.ASSISTANT,
        [
            ReasoningPart("**Planning**\n\nI should call the tool. Then answer.", provider_type="gemini"),
            ReasoningPart(signature=signature, provider_type="gemini"),
        ],
        [ToolCall(call.id, call.name, call.arguments_delta)],
    )
    fake.reply = Reply(text_chunks=["Sunny."])
    history = [user("Weather?"), assistant, Message(Role.TOOL, [TextPart("sunny")], tool_call_id=call.id)]
    events = await collect(provider, ask(*history, model=model, tools=[WEATHER], params=reasoning))
    assert text_of(events) == "Sunny."
    parts = fake.bodies[-1]["contents"][1]["parts"]
    assert parts[0] == {"text": "**Planning**\n\nI should call the tool. Then answer.", "thought": True}
    assert parts[1]["thoughtSignature"] == signature and parts[1]["functionCall"]["name"] == "get_weather"

    # A call from another model's history has no signature: the documented bypass goes instead.
    foreign = Message(Role.ASSISTANT, [], [ToolCall("call_x", "get_weather", '{"city": "Oslo"}')])
    history = [user("Weather?"), foreign, Message(Role.TOOL, [TextPart("cold")], tool_call_id="call_x")]
    await collect(provider, ask(*history, model=model, tools=[WEATHER]))
    assert fake.bodies[-1]["contents"][1]["parts"][0]["thoughtSignature"] == SKIP_SIGNATURE
    # A signature the model never issued is the API's 400.
    forged = Message(
        Role.ASSISTANT, [ReasoningPart(signature="Zm9yZ2Vk", provider_type="gemini")], foreign.tool_calls
    )
    with pytest.raises(errors.UpstreamRejectedRequest, match="Corrupted thought signature"):
        await collect(provider, ask(user("Weather?"), forged, history[2], model=model, tools=[WEATHER]))


async def test_thinking_config_per_generation(fake: FakeGemini, provider: GeminiProvider) -> None:
    def sent(model: str, r: ReasoningConfig) -> Any:
        return fake.bodies[-1]["generationConfig"].get("thinkingConfig")

    cases = [
        (
            "gemini-2.5-flash",
            ReasoningConfig(budget_tokens=1024),
            {"thinkingBudget": 1024, "includeThoughts": True},
        ),
        (
            "gemini-2.5-flash",
            ReasoningConfig(effort=ReasoningEffort.HIGH),
            {"thinkingBudget": 24576, "includeThoughts": True},
        ),
        ("gemini-2.5-flash", ReasoningConfig(disabled=True), {"thinkingBudget": 0}),
        (
            "gemini-2.5-pro",
            ReasoningConfig(disabled=True),
            {"thinkingBudget": 128},
        ),  # Pro cannot stop thinking
        (
            "gemini-2.5-flash-lite",
            ReasoningConfig(effort=ReasoningEffort.MINIMAL),
            {"thinkingBudget": 512, "includeThoughts": True},
        ),
        (
            "gemini-3-pro-preview",
            ReasoningConfig(effort=ReasoningEffort.LOW),
            {"thinkingLevel": "LOW", "includeThoughts": True},
        ),
    ]
    for model, r, want in cases:
        await collect(provider, ask(model=model, params=GenerationParams(reasoning=r)))
        assert sent(model, r) == want, (model, r)


# --- finish reasons, blocks, errors ---------------------------------------------------------------


async def test_safety_stop_is_a_content_filter_with_its_category(
    fake: FakeGemini, provider: GeminiProvider
) -> None:
    fake.reply = Reply(text_chunks=[], finish="content_filter", input_tokens=14, output_tokens=0)
    end = end_of(await collect(provider, ask()))
    assert end.finish_reason is FinishReason.CONTENT_FILTER
    assert end.refusal is not None and end.refusal.category == "HARM_CATEGORY_HATE_SPEECH"
    assert "SAFETY" in end.refusal.explanation


async def test_blocked_prompt_is_content_filtered(fake: FakeGemini, provider: GeminiProvider) -> None:
    fake.block_reason = "PROHIBITED_CONTENT"
    events, exc = await collect_until_error(provider, ask())
    assert isinstance(exc, errors.ContentFiltered) and "PROHIBITED_CONTENT" in exc.message
    assert exc.metadata["block_reason"] == "PROHIBITED_CONTENT"
    assert not [e for e in events if isinstance(e, TextDeltaEvent)]


@pytest.mark.parametrize(
    ("status", "kind", "retry"),
    [
        (429, errors.UpstreamRateLimited, 7.0),
        (400, errors.UpstreamRejectedRequest, None),
        (404, errors.ModelNotFound, None),
        (500, errors.UpstreamUnavailable, None),
        (503, errors.UpstreamUnavailable, None),
        (504, errors.UpstreamTimeout, None),
    ],
)
async def test_error_statuses(
    fake: FakeGemini, provider: GeminiProvider, status: int, kind: type, retry: float | None
) -> None:
    fake.faults.append(Fault("status", status=status, headers={"retry-after": "7"}))
    _, exc = await collect_until_error(provider, ask())
    assert type(exc) is kind and exc.upstream_status == status
    assert exc.retry_after == retry
    assert "returned HTTP" in exc.message


async def test_credential_errors_are_the_operators(fake: FakeGemini) -> None:
    async with started(make(fake.url, key="AIzaSy-wrong-key-0000000")) as wrong:
        _, exc = await collect_until_error(wrong, ask())
    assert isinstance(exc, errors.UpstreamAuthFailed) and exc.metadata["upstream_reason"] == "API_KEY_INVALID"
    assert "AIzaSy-wrong" not in exc.message
    async with started(make(fake.url, key=None)) as keyless:
        _, exc = await collect_until_error(keyless, ask())
    assert isinstance(exc, errors.UpstreamPermissionDenied) and "unregistered callers" in exc.message


@pytest.mark.parametrize("fault", ["error_event", "disconnect_mid_stream", "malformed", "no_terminator"])
async def test_failures_after_content(fake: FakeGemini, provider: GeminiProvider, fault: str) -> None:
    fake.faults.append(Fault(fault, after_chunks=2))  # type: ignore[arg-type]
    events, exc = await collect_until_error(provider, ask())
    # The two chunks before the failure; without the finishReason chunk, all of them.
    assert text_of(events) == ("Hello there!" if fault == "no_terminator" else "Hello")
    expected = {
        "error_event": errors.UpstreamUnavailable,
        "disconnect_mid_stream": errors.UpstreamUnavailable,
    }
    assert isinstance(exc, expected.get(fault, errors.UpstreamProtocolError)), exc
    if fault == "error_event":
        assert "error mid-stream" in exc.message and "overloaded" in exc.message


# --- discovery, health, embeddings, auto-config -----------------------------------------------------


async def test_listing_pages_and_health(fake: FakeGemini, provider: GeminiProvider) -> None:
    fake.models = [f"gemini-test-{i}" for i in range(1200)]
    models = await provider.list_models()
    names = [m.name for m in models]
    assert len(names) == 1201 and names[0] == "gemini-test-0" and "gemini-embedding-001" in names
    assert "imagen-4.0-generate-001" not in names  # not a chat or embedding model
    assert models[0].context_window == 1048576 and models[0].max_output_tokens == 65536
    assert sum(r.path == "/v1beta/models" for r in fake.server.requests) == 2
    await provider.health_check()
    assert fake.server.requests[-1].query == "pageSize=1"


async def test_embeddings_in_batches_of_100(fake: FakeGemini, provider: GeminiProvider) -> None:
    inputs = tuple(f"text {i}" for i in range(150))
    result = await provider.embed(EmbedRequest("gemini-embedding-001", inputs, dimensions=4))
    assert (
        len(result.vectors) == 150 and all(len(v) == 4 for v in result.vectors) and not result.usage_reported
    )
    posts = [r for r in fake.server.requests if r.path.endswith(":batchEmbedContents")]
    assert sorted(len(r.json()["requests"]) for r in posts) == [50, 100]
    assert posts[0].json()["requests"][0] == {
        "model": "models/gemini-embedding-001",
        "content": {"parts": [{"text": "text 0"}]},
        "outputDimensionality": 4,
    }
    with pytest.raises(errors.ModelNotFound):
        await provider.embed(EmbedRequest("gemini-2.5-flash", ("x",)))


def test_auto_config_from_the_sdk_key_variables() -> None:
    only_gemini = settings_from_env({"GEMINI_API_KEY": "AIzaSy-from-gemini-var-1"})
    (p,) = only_gemini.providers
    assert (p.type, p.resolved_base_url(), p.resolved_api_key()) == (
        "gemini",
        "https://generativelanguage.googleapis.com",
        "AIzaSy-from-gemini-var-1",
    )
    both = settings_from_env(
        {"GEMINI_API_KEY": "AIzaSy-from-gemini-var-1", "GOOGLE_API_KEY": "AIzaSy-from-google-var-2"}
    )
    assert both.providers[0].resolved_api_key() == "AIzaSy-from-google-var-2"  # python-genai's precedence


# --- the recorded bytes, served verbatim --------------------------------------------------------------


def recording(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((RECORDINGS / f"{name}.json").read_text())
    return doc


async def serve_recording(name: str, request: CompletionRequest) -> list[CompletionEvent]:
    rec = recording(name)["response"]
    ctype = next(v for k, v in rec["headers"] if k.lower() == "content-type")

    async def handler(req: Request, resp: Response) -> None:
        await resp.start_stream(rec["status"], content_type=ctype)
        await resp.write(rec["body"])
        await resp.end()

    async with FakeHTTPServer(handler) as server, started(make(server.url)) as p:
        return await collect(p, request)


@pytest.mark.parametrize(
    ("name", "text", "calls", "usage", "reasoning"),
    [
        ("gm-text-stream", "The capital of France is Paris.\n", 0, (13, 8), 0),
        ("gm-thinking-stream", None, 0, (34, 469 + 787), 787),
        ("gm-tool-call-stream", "", 1, (29, 212), 202),
        ("gm-tool-json-array", "", 1, (60, 48), 32),
        ("gm-text", "Hello! How can I help you today?", 0, (9, 43), 34),
    ],
)
async def test_recorded_answers(
    name: str, text: str | None, calls: int, usage: tuple[int, int], reasoning: int
) -> None:
    events = await serve_recording(name, ask())
    if text is not None:
        assert text_of(events) == text
    assert len([e for e in events if isinstance(e, ToolCallDeltaEvent)]) == calls
    end = end_of(events)
    assert (end.usage.input_tokens, end.usage.output_tokens, end.usage.reasoning_tokens) == (
        *usage,
        reasoning,
    )
    if name == "gm-thinking-stream":
        thought = "".join(e.text for e in events if isinstance(e, ReasoningDeltaEvent))
        assert thought.startswith("**Clarifying User Goals**") and "**Clarifying" not in text_of(events)
    if calls:
        sig = next(e for e in events if isinstance(e, ReasoningDeltaEvent)).signature
        assert sig.startswith("Ep") or sig.startswith("Et")


async def test_recorded_embeddings() -> None:
    rec = recording("gm-embed")

    async def handler(req: Request, resp: Response) -> None:
        await resp.send(200, rec["response"]["body"], content_type="application/json; charset=UTF-8")

    async with FakeHTTPServer(handler) as server, started(make(server.url)) as p:
        result = await p.embed(EmbedRequest("gemini-embedding-2-preview", ("Hello, world!",), dimensions=768))
    assert len(result.vectors) == 1 and len(result.vectors[0]) == 768
    assert result.vectors[0][:2] == (-0.039718185, 0.0070917504)
    sent = server.requests[0]
    assert sent.path == "/v1beta/models/gemini-embedding-2-preview:batchEmbedContents"
    recorded = rec["request"]["body"]["requests"][0]
    assert sent.json()["requests"][0] == {k: v for k, v in recorded.items() if k != "taskType"}


# --- through the daemon: capabilities from the catalogue, checked before the upstream -------------


async def test_capabilities_missing_before_any_upstream_call(
    fake: FakeGemini, daemon: Any, channel_to: Any
) -> None:
    settings = broker_settings([{"name": "gm", "type": "gemini", "base_url": fake.url, "api_key": KEY}])
    _, target = await daemon(settings)
    s = stub(channel_to(target))
    pdf = pb.Message(
        role=pb.ROLE_USER,
        content=[pb.ContentPart(text="read"), pb.ContentPart(document=pb.Document(data=b"%PDF-1.4"))],
    )
    think = pb.GenerationParams(reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_LOW))
    hi = pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])
    # gemini-2.0-flash: no thinking, no PDF input (the catalogue's flags, from the source).
    for messages, params, capability in [
        ([hi], think, "reasoning"),
        ([pdf], pb.GenerationParams(), "documents"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.Complete(
                pb.CompleteRequest(model="gm/gemini-2.0-flash", messages=messages, params=params), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = required_error_info(err.value)
        assert (info.reason, info.metadata["capabilities"]) == ("CAPABILITY_MISSING", capability)
    assert fake.bodies == []
    # The same asks of gemini-2.5-flash reach it.
    resp = await s.Complete(
        pb.CompleteRequest(model="gm/gemini-2.5-flash", messages=[pdf], params=think), timeout=10
    )
    assert resp.message.content[-1].text == "Hello there!" and resp.usage.input_tokens == 12
    assert fake.bodies[-1]["contents"][0]["parts"][1]["inlineData"]["mimeType"] == "application/pdf"
