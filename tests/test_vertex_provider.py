"""VertexProvider against FakeVertex and a JWT-verifying fake token endpoint, over loopback.

Gemini on Vertex (the Gemini wire at projects/{p}/locations/{l}/publishers/google) and Claude
on Vertex (the Messages wire at publishers/anthropic, rawPredict's body), each with the OAuth2
token a service account's key got from the fake token endpoint.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker import errors
from broker.config import ConfigError, ProviderConfig, settings_from_dict
from broker.providers import kinds
from broker.providers.vertex import VertexProvider
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    EmbedRequest,
    EndEvent,
    FinishReason,
    GenerationParams,
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
)
from tests.fakes.anthropic_upstream import Thinking
from tests.fakes.google_token import FakeGoogleToken, make_key, service_account_key, write_json
from tests.fakes.script import Fault, Reply, weather_tool_reply
from tests.fakes.vertex_upstream import ANTHROPIC_VERSION, FakeVertex
from tests.providers import collect, collect_until_error, started

WEATHER = Tool(
    "get_weather",
    "Weather by city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CLAUDE = "claude-sonnet-4-5@20250929"
SCOPE = "/projects/my-project/locations/us-central1/publishers"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return make_key()


@pytest.fixture
async def tokens(key: rsa.RSAPrivateKey) -> AsyncIterator[FakeGoogleToken]:
    async with FakeGoogleToken(key.public_key()) as fake:
        yield fake


@pytest.fixture
async def fake(tokens: FakeGoogleToken) -> AsyncIterator[FakeVertex]:
    async with FakeVertex(tokens) as f:
        yield f


@pytest.fixture
def key_file(tmp_path: Path, key: rsa.RSAPrivateKey, tokens: FakeGoogleToken) -> Path:
    return write_json(tmp_path / "key.json", service_account_key(key, tokens.url))


def config(key_file: Path, url: str = "", **kw: Any) -> ProviderConfig:
    raw: dict[str, Any] = {
        "name": "vx",
        "type": "vertex",
        "project": "my-project",
        "location": "us-central1",
        "credentials_file": key_file,
        "read_timeout_seconds": 5.0,
    }
    if url:
        raw["base_url"] = url
    return ProviderConfig(**(raw | kw))


@pytest.fixture
async def provider(fake: FakeVertex, key_file: Path) -> AsyncIterator[VertexProvider]:
    async with started(VertexProvider(config(key_file, fake.url))) as p:
        yield p


def user(text: str) -> Message:
    return Message(Role.USER, [TextPart(text)])


def ask(*messages: Message, model: str = "gemini-2.5-flash", **kw: Any) -> CompletionRequest:
    return CompletionRequest(
        model=model, messages=list(messages) or [user("Hi")], provider_type="vertex", **kw
    )


def end_of(events: list[CompletionEvent]) -> EndEvent:
    assert isinstance(events[-1], EndEvent), events[-1]
    return events[-1]


def text_of(events: list[CompletionEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDeltaEvent))


# --- Gemini on Vertex -------------------------------------------------------------------------------


async def test_gemini_stream_with_the_oauth_token(
    fake: FakeVertex, tokens: FakeGoogleToken, provider: VertexProvider
) -> None:
    fake.reply = Reply(text_chunks=["The", " capital", " is Paris."], input_tokens=13, output_tokens=8)
    events = await collect(
        provider, ask(Message(Role.SYSTEM, [TextPart("Be brief.")]), user("Capital of France?"))
    )
    assert isinstance(events[0], StartEvent) and text_of(events) == "The capital is Paris."
    assert (end_of(events).usage.input_tokens, end_of(events).usage.output_tokens) == (13, 8)
    req = fake.server.requests[-1]
    assert (
        req.path == f"/v1beta1{SCOPE}/google/models/gemini-2.5-flash:streamGenerateContent"
        and req.query == "alt=sse"
    )
    assert req.headers["authorization"] == f"Bearer {tokens.grants[0].token}"
    assert req.json()["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    # The token is cached: more calls, one grant.
    await collect(provider, ask())
    await collect(provider, ask(model="google/gemini-2.5-pro"))
    assert len(tokens.grants) == 1 and fake.server.requests[-1].path.endswith(
        "/google/models/gemini-2.5-pro:streamGenerateContent"
    )


async def test_gemini_thinking_and_tool_call_round_trip(fake: FakeVertex, provider: VertexProvider) -> None:
    model = "gemini-3-pro-preview"
    fake.gemini.thought_chunks = ["**Weather**\n\nCall the tool."]
    fake.reply = weather_tool_reply()
    params = GenerationParams(reasoning=ReasoningConfig(effort=ReasoningEffort.HIGH))
    events = await collect(
        provider, ask(user("Weather in Paris?"), model=model, tools=[WEATHER], params=params)
    )
    thoughts = [e for e in events if isinstance(e, ReasoningDeltaEvent)]
    call = next(e for e in events if isinstance(e, ToolCallDeltaEvent))
    assert thoughts[0].text == "**Weather**\n\nCall the tool." and thoughts[-1].signature
    assert end_of(events).finish_reason is FinishReason.TOOL_CALLS
    history = [
        user("Weather in Paris?"),
        Message(
            Role.ASSISTANT,
            [
                ReasoningPart(thoughts[0].text, provider_type="vertex"),
                ReasoningPart(signature=thoughts[-1].signature, provider_type="vertex"),
            ],
            [ToolCall(call.id, call.name, call.arguments_delta)],
        ),
        Message(Role.TOOL, [TextPart('{"temp_c": 18}')], tool_call_id=call.id),
    ]
    fake.reply = Reply(text_chunks=["18C in Paris."])
    events = await collect(provider, ask(*history, model=model, tools=[WEATHER], params=params))
    assert text_of(events) == "18C in Paris."
    parts = fake.gemini.bodies[-1]["contents"][1]["parts"]
    assert parts[1]["thoughtSignature"] == thoughts[-1].signature


# --- Claude on Vertex -------------------------------------------------------------------------------


async def test_claude_stream_takes_the_raw_predict_body(
    fake: FakeVertex, tokens: FakeGoogleToken, provider: VertexProvider
) -> None:
    fake.reply = Reply(text_chunks=["4200 + 42", " = 4242"], input_tokens=17, output_tokens=15)
    events = await collect(
        provider, ask(user("What is 4200 + 42?"), model=CLAUDE, params=GenerationParams(max_tokens=100))
    )
    assert text_of(events) == "4200 + 42 = 4242" and end_of(events).finish_reason is FinishReason.STOP
    assert (end_of(events).usage.input_tokens, end_of(events).usage.output_tokens) == (17, 15)
    req = fake.server.requests[-1]
    assert req.path == f"/v1{SCOPE}/anthropic/models/{CLAUDE}:streamRawPredict"
    assert (
        req.headers["authorization"] == f"Bearer {tokens.grants[0].token}"
        and "anthropic-version" not in req.headers
    )
    body = fake.claude_bodies[-1]
    assert body["anthropic_version"] == ANTHROPIC_VERSION and "model" not in body and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "What is 4200 + 42?"}]}]


async def test_claude_thinking_and_tool_round_trip(fake: FakeVertex, provider: VertexProvider) -> None:
    fake.claude.reasoning = [Thinking(["I should ", "look it up."])]
    fake.reply = weather_tool_reply()
    params = GenerationParams(reasoning=ReasoningConfig(budget_tokens=2048), max_tokens=4096)
    events = await collect(provider, ask(user("Weather?"), model=CLAUDE, tools=[WEATHER], params=params))
    assert fake.claude_bodies[-1]["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    text = "".join(e.text for e in events if isinstance(e, ReasoningDeltaEvent))
    signature = "".join(e.signature for e in events if isinstance(e, ReasoningDeltaEvent))
    call = next(e for e in events if isinstance(e, ToolCallDeltaEvent))
    assert text == "I should look it up." and signature and call.id == "call_w1"
    args = "".join(e.arguments_delta for e in events if isinstance(e, ToolCallDeltaEvent))
    fake.claude.reasoning = []
    fake.reply = Reply(text_chunks=["Sunny."])
    history = [
        user("Weather?"),
        Message(
            Role.ASSISTANT,
            [ReasoningPart(text, signature, provider_type="vertex")],
            [ToolCall(call.id, call.name, args)],
        ),
        Message(Role.TOOL, [TextPart("sunny")], tool_call_id=call.id),
    ]
    events = await collect(provider, ask(*history, model=CLAUDE, tools=[WEATHER], params=params))
    assert text_of(events) == "Sunny."  # the fake verified the thinking block's signature
    assert fake.claude_bodies[-1]["messages"][1]["content"][0] == {
        "type": "thinking",
        "thinking": text,
        "signature": signature,
    }


async def test_claude_structured_output_is_native_on_haiku_4_5(
    fake: FakeVertex, provider: VertexProvider
) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    fake.reply = Reply(text_chunks=['{"n": 4242}'])
    params = GenerationParams(
        max_tokens=50, response_format=ResponseFormat.JSON_SCHEMA, json_schema=JsonSchemaFormat("sum", schema)
    )
    events = await collect(provider, ask(user("4200+42"), model="claude-haiku-4-5@20251001", params=params))
    assert json.loads(text_of(events)) == {"n": 4242}
    assert fake.claude_bodies[-1]["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


# --- errors -----------------------------------------------------------------------------------------


async def test_google_layer_errors(fake: FakeVertex, provider: VertexProvider) -> None:
    fake.faults.append(Fault("status", status=429, headers={"retry-after": "30"}))
    _, exc = await collect_until_error(provider, ask(model=CLAUDE))
    assert isinstance(exc, errors.UpstreamRateLimited) and exc.retry_after == 30.0
    fake.faults.append(Fault("status", status=503))
    _, exc = await collect_until_error(provider, ask())
    assert isinstance(exc, errors.UpstreamUnavailable)
    _, exc = await collect_until_error(provider, ask(model="gemini-9-ultra"))
    assert isinstance(exc, errors.ModelNotFound) and "gemini-9-ultra" in exc.message


async def test_claude_layer_errors_are_read_as_anthropic_bodies(
    fake: FakeVertex, provider: VertexProvider
) -> None:
    _, exc = await collect_until_error(provider, ask(model="claude-opus-9@20990101"))
    assert (
        isinstance(exc, errors.ModelNotFound)
        and "claude-opus-9" in exc.message
        and "request id" in exc.message
    )
    fake.faults.append(Fault("error_event", after_chunks=1))
    events, exc = await collect_until_error(provider, ask(model=CLAUDE))
    assert text_of(events) and isinstance(exc, errors.UpstreamUnavailable) and "mid-stream" in exc.message


async def test_credentials_refused_and_another_project(
    fake: FakeVertex, tokens: FakeGoogleToken, key_file: Path
) -> None:
    async with started(VertexProvider(config(key_file, fake.url, project="other-project"))) as other:
        _, exc = await collect_until_error(other, ask())
    assert isinstance(exc, errors.UpstreamPermissionDenied) and "aiplatform.endpoints.predict" in exc.message
    tokens.grants.clear()  # the endpoint forgets them: every token it issued is now refused upstream
    async with started(VertexProvider(config(key_file, fake.url))) as p:
        await collect(p, ask())  # a fresh token works
        issued = tokens.grants[0].token
        tokens.grants.clear()
        _, exc = await collect_until_error(p, ask())
    assert isinstance(exc, errors.UpstreamAuthFailed) and exc.upstream_status == 401
    assert issued not in exc.message


async def test_no_embeddings_on_vertex(provider: VertexProvider) -> None:
    with pytest.raises(errors.CapabilityMissing, match="vertex"):
        await provider.embed(EmbedRequest("gemini-embedding-001", ("x",)))


# --- discovery, health, hosts, config ----------------------------------------------------------------


async def test_listing_and_health(fake: FakeVertex, provider: VertexProvider) -> None:
    names = [m.name for m in await provider.list_models()]
    assert names == fake.gemini.models  # Gemini models only: no imagen
    await provider.health_check()
    assert fake.server.requests[-1].query == "pageSize=1"


def test_hosts_follow_the_location(key_file: Path) -> None:
    for location, host in [
        ("us-central1", "https://us-central1-aiplatform.googleapis.com"),
        ("europe-west4", "https://europe-west4-aiplatform.googleapis.com"),
        ("global", "https://aiplatform.googleapis.com"),
        ("eu", "https://aiplatform.eu.rep.googleapis.com"),
    ]:
        url = config(key_file, location=location).resolved_base_url()
        assert url == host
        assert kinds.kind("vertex").is_vendor_host(url.removeprefix("https://"))
    assert config(key_file, location=None).resolved_base_url() == "https://aiplatform.googleapis.com"


def test_config_names_what_is_wrong(tmp_path: Path) -> None:
    cases = [
        ({"type": "vertex"}, "project: required for type vertex"),
        (
            {"type": "vertex", "project": "my-project", "api_key": "AIzaSy-x-123456"},
            "type vertex authenticates with OAuth2",
        ),
        (
            {"type": "vertex", "project": "My Project"},
            "providers[0].project: must be a Google Cloud project id",
        ),
        (
            {"type": "vertex", "project": "my-project", "location": "us-central1.evil.com"},
            "providers[0].location: must be a Vertex AI location",
        ),
        (
            {"type": "gemini", "api_key": "AIzaSy-x-123456", "project": "my-project"},
            "project: only type vertex takes project",
        ),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError) as info:
            settings_from_dict({"providers": [{"name": "p", **raw}]}, env={})
        assert any(message in p for p in info.value.problems), info.value.problems
    missing = settings_from_dict(
        {
            "providers": [
                {
                    "name": "p",
                    "type": "vertex",
                    "project": "my-project",
                    "credentials_file": str(tmp_path / "none.json"),
                }
            ]
        },
        env={},
    )
    with pytest.raises(ConfigError, match="credentials_file: cannot read"):
        VertexProvider(missing.providers[0])
