"""BedrockProvider against FakeBedrock over real loopback HTTP: every request SigV4-signed and
verified by the fake with botocore, ConverseStream decoded from event-stream bytes that arrive
in random pieces (MB_TEST_SEGMENT), the request mapping, errors and discovery."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import errors
from broker.config import ProviderConfig
from broker.providers import bedrock_wire
from broker.providers.bedrock import BedrockProvider
from broker.types import (
    CacheTTL,
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
from tests.fakes import bedrock_upstream as fb
from tests.fakes.script import Fault, Reply, weather_tool_reply
from tests.fakes.segment import Segmenter
from tests.providers import collect, collect_until_error, started
from tests.replay.server import ReplayServer, recorded_wire

NOVA = "us.amazon.nova-micro-v1:0"
CLAUDE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
RECORDINGS = Path(__file__).parents[1].parent / "shared" / "recordings"
WEATHER = Tool(
    "get_weather", "Weather by city", {"type": "object", "properties": {"city": {"type": "string"}}}
)


def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, token: str | None = None) -> None:
    """Credentials from the environment only: no profile files, no metadata service (which
    would be a call off this machine)."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", fb.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", fb.SECRET_KEY)
    if token is None:
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    else:
        monkeypatch.setenv("AWS_SESSION_TOKEN", token)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    aws_env(monkeypatch, tmp_path, token=fb.SESSION_TOKEN)
    yield


@pytest.fixture
async def fake(env: None) -> AsyncIterator[fb.FakeBedrock]:
    async with fb.FakeBedrock(session_token=fb.SESSION_TOKEN) as f:
        yield f


def make(url: str, **extra: Any) -> BedrockProvider:
    return BedrockProvider(
        ProviderConfig(name="bedrock", type="bedrock", region="us-east-1", base_url=url, **extra)
    )


@pytest.fixture
async def provider(fake: fb.FakeBedrock) -> AsyncIterator[BedrockProvider]:
    async with started(make(fake.url, read_timeout_seconds=5)) as p:
        yield p


def ask(text: str = "Hi", model: str = NOVA, **kw: Any) -> CompletionRequest:
    return CompletionRequest(
        model=model, messages=[Message(Role.USER, [TextPart(text)])], provider_type="bedrock", **kw
    )


def text_of(events: list[CompletionEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDeltaEvent))


async def test_text_stream_signed_and_verified(fake: fb.FakeBedrock, provider: BedrockProvider) -> None:
    fake.reply = Reply(text_chunks=["Hel", "lo", " there"], input_tokens=10, output_tokens=3)
    events = await collect(provider, ask())
    assert isinstance(events[0], StartEvent) and text_of(events) == "Hello there"
    end = events[-1]
    assert isinstance(end, EndEvent) and end.finish_reason is FinishReason.STOP
    assert (end.usage.input_tokens, end.usage.output_tokens) == (10, 3)
    # The fake recomputed the signature with botocore from what arrived, session token included.
    assert fake.verified == 1 and not fake.rejected
    req = fake.requests[-1]
    assert req.path == "/model/us.amazon.nova-micro-v1:0/converse-stream"
    assert req.headers["x-amz-security-token"] == fb.SESSION_TOKEN
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token" in req.headers["authorization"]


async def test_a_wrong_secret_is_refused_by_the_fake(env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    async with fb.FakeBedrock(session_token=fb.SESSION_TOKEN) as fake:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789abcdefghijklmn")
        async with started(make(fake.url)) as provider:
            _, err = await collect_until_error(provider, ask())
    assert isinstance(err, errors.UpstreamAuthFailed), err
    assert fake.verified == 0 and "does not match" in fake.rejected[0]
    assert "not-the-secret" not in err.message


async def test_no_credentials_is_an_actionable_failed_precondition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    aws_env(monkeypatch, tmp_path)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with fb.FakeBedrock() as fake, started(make(fake.url)) as provider:
        _, err = await collect_until_error(provider, ask())
    assert isinstance(err, errors.UpstreamAuthFailed) and err.code.name == "FAILED_PRECONDITION"
    assert "no AWS credentials found" in err.message and "AWS_PROFILE" in err.message
    assert fake.requests == []  # nothing unsigned went out


async def test_profile_credentials_from_the_shared_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    aws_env(monkeypatch, tmp_path)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (tmp_path / "aws-credentials").write_text(
        f"[team]\naws_access_key_id = {fb.ACCESS_KEY}\naws_secret_access_key = {fb.SECRET_KEY}\n"
    )
    monkeypatch.setenv("AWS_PROFILE", "team")
    async with fb.FakeBedrock() as fake, started(make(fake.url)) as provider:
        events = await collect(provider, ask())
        assert provider.credentials is not None and provider.credentials.method == "shared-credentials-file"
    assert text_of(events) == "Hello there!" and fake.verified == 1


async def test_bedrock_api_key_is_a_bearer_token(env: None) -> None:
    async with (
        fb.FakeBedrock() as fake,
        started(make(fake.url, api_key="bedrock-api-key-ABC123xyz")) as provider,
    ):
        _, err = await collect_until_error(provider, ask())
    # The fake only speaks SigV4: it refuses the bearer request, which shows no signing happened.
    assert fake.requests[-1].headers["authorization"] == "Bearer bedrock-api-key-ABC123xyz"
    assert isinstance(err, errors.UpstreamAuthFailed)


async def test_tool_call_round_trip(fake: fb.FakeBedrock, provider: BedrockProvider) -> None:
    fake.reply = weather_tool_reply()
    events = await collect(provider, ask("Weather in Paris?", tools=[WEATHER]))
    calls = [e for e in events if isinstance(e, ToolCallDeltaEvent)]
    assert calls[0].id == "call_w1" and calls[0].name == "get_weather"
    assert json.loads("".join(c.arguments_delta for c in calls)) == {"city": "Paris"}
    assert isinstance(events[-1], EndEvent) and events[-1].finish_reason is FinishReason.TOOL_CALLS
    history = [
        Message(Role.USER, [TextPart("Weather in Paris?")]),
        Message(Role.ASSISTANT, tool_calls=[ToolCall("call_w1", "get_weather", '{"city": "Paris"}')]),
        Message(Role.TOOL, [TextPart("18C")], tool_call_id="call_w1"),
    ]
    fake.reply = Reply(text_chunks=["18C."])
    await collect(
        provider, CompletionRequest(model=NOVA, messages=history, tools=[WEATHER], provider_type="bedrock")
    )
    body = fake.converse_bodies[-1]
    assert body["messages"][1]["content"] == [
        {"toolUse": {"toolUseId": "call_w1", "name": "get_weather", "input": {"city": "Paris"}}}
    ]
    assert body["messages"][2]["content"] == [
        {"toolResult": {"toolUseId": "call_w1", "content": [{"text": "18C"}], "status": "success"}}
    ]
    assert body["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"] == {"json": WEATHER.parameters}


async def test_reasoning_for_claude_streams_and_goes_back(
    fake: fb.FakeBedrock, provider: BedrockProvider
) -> None:
    fake.reasoning = [
        fb.Reasoning(["Let me ", "think."], signature="sig-abc=="),
        fb.Reasoning(redacted="cmVkYWN0ZWQ="),
    ]
    fake.reply = Reply(text_chunks=["42"])
    request = ask("Q?", model=CLAUDE, params=GenerationParams(reasoning=ReasoningConfig(budget_tokens=2048)))
    events = await collect(provider, request)
    thought = [e for e in events if isinstance(e, ReasoningDeltaEvent)]
    assert [(e.index, e.text, e.signature, e.redacted_data) for e in thought] == [
        (0, "Let me ", "", ""), (0, "think.", "", ""), (0, "", "sig-abc==", ""), (1, "", "", "cmVkYWN0ZWQ="),
    ]  # fmt: skip
    assert text_of(events) == "42"
    sent = fake.converse_bodies[-1]
    assert sent["additionalModelRequestFields"] == {"thinking": {"type": "enabled", "budget_tokens": 2048}}
    assert sent["inferenceConfig"]["maxTokens"] > 2048
    # The history goes back byte-exact, before the tool use of its turn.
    history = [
        Message(Role.USER, [TextPart("Q?")]),
        Message(
            Role.ASSISTANT,
            [
                ReasoningPart("Let me think.", "sig-abc==", provider_type="bedrock"),
                ReasoningPart(redacted_data="cmVkYWN0ZWQ=", provider_type="bedrock"),
            ],
            tool_calls=[ToolCall("t1", "get_weather", "{}")],
        ),
        Message(Role.TOOL, [TextPart("ok")], tool_call_id="t1"),
    ]
    await collect(
        provider, CompletionRequest(model=CLAUDE, messages=history, tools=[WEATHER], provider_type="bedrock")
    )
    assert fake.converse_bodies[-1]["messages"][1]["content"] == [
        {"reasoningContent": {"reasoningText": {"text": "Let me think.", "signature": "sig-abc=="}}},
        {"reasoningContent": {"redactedContent": "cmVkYWN0ZWQ="}},
        {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {}}},
    ]


async def test_reasoning_on_a_model_that_is_not_claude_is_refused_before_the_call(
    fake: fb.FakeBedrock, provider: BedrockProvider
) -> None:
    request = ask(params=GenerationParams(reasoning=ReasoningConfig(effort=None, budget_tokens=2048)))
    _, err = await collect_until_error(provider, request)
    assert isinstance(err, errors.InvalidRequest) and err.violations[0][0] == "params.reasoning"
    assert fake.requests == []


async def test_cache_points_images_documents_and_usage(
    fake: fb.FakeBedrock, provider: BedrockProvider
) -> None:
    fake.reply = Reply(text_chunks=["ok"], input_tokens=1400, output_tokens=2)
    fake.cache_read, fake.cache_write = 1300, 90
    png = bytes.fromhex("89504e470d0a1a0a")
    messages = [
        Message(Role.SYSTEM, [TextPart("Be terse.", cache=CacheTTL.ONE_HOUR)]),
        Message(
            Role.USER,
            [
                TextPart("Look"),
                ImagePart(data=png, media_type="image/png"),
                DocumentPart(data=b"%PDF-1.4", title="Q3 report: final!", cache=CacheTTL.DEFAULT),
                DocumentPart(data=b"plain words", media_type="text/plain"),
            ],
        ),
    ]
    tools = [Tool("t", "", {}, cache=CacheTTL.FIVE_MINUTES)]
    events = await collect(
        provider, CompletionRequest(model=CLAUDE, messages=messages, tools=tools, provider_type="bedrock")
    )
    end = events[-1]
    assert isinstance(end, EndEvent)
    assert (end.usage.input_tokens, end.usage.cached_input_tokens, end.usage.cache_write_input_tokens) == (
        1400,
        1300,
        90,
    )
    body = fake.converse_bodies[-1]
    assert body["system"] == [{"text": "Be terse."}, {"cachePoint": {"type": "default", "ttl": "1h"}}]
    assert body["messages"][0]["content"] == [
        {"text": "Look"},
        {"image": {"format": "png", "source": {"bytes": base64.b64encode(png).decode()}}},
        {
            "document": {
                "format": "pdf",
                "name": "Q3 report final",
                "source": {"bytes": base64.b64encode(b"%PDF-1.4").decode()},
            }
        },
        {"cachePoint": {"type": "default"}},
        {
            "document": {
                "format": "txt",
                "name": "Document",
                "source": {"bytes": base64.b64encode(b"plain words").decode()},
            }
        },
    ]
    assert body["toolConfig"]["tools"][1] == {"cachePoint": {"type": "default", "ttl": "5m"}}


async def test_structured_output_and_provider_options(
    fake: fb.FakeBedrock, provider: BedrockProvider
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    params = GenerationParams(
        response_format=ResponseFormat.JSON_SCHEMA,
        json_schema=JsonSchemaFormat("Answer", schema),
        max_tokens=50,
    )
    options = {"additionalModelRequestFields": {"top_k": 5}, "performanceConfig": {"latency": "optimized"}}
    await collect(provider, ask(params=params, provider_options=options))
    body = fake.converse_bodies[-1]
    fmt = body["outputConfig"]["textFormat"]
    assert fmt["type"] == "json_schema" and json.loads(fmt["structure"]["jsonSchema"]["schema"]) == schema
    assert body["additionalModelRequestFields"] == {"top_k": 5} and body["inferenceConfig"] == {
        "maxTokens": 50
    }
    _, err = await collect_until_error(provider, ask(provider_options={"messages": []}))
    assert isinstance(err, errors.InvalidRequest)


@pytest.mark.parametrize(
    ("status", "kind", "error", "code"),
    [
        (429, "ThrottlingException", errors.UpstreamRateLimited, "RESOURCE_EXHAUSTED"),
        (400, "ValidationException", errors.UpstreamRejectedRequest, "INVALID_ARGUMENT"),
        (429, "ModelNotReadyException", errors.UpstreamUnavailable, "UNAVAILABLE"),
        (503, "ServiceUnavailableException", errors.UpstreamUnavailable, "UNAVAILABLE"),
        (403, "AccessDeniedException", errors.UpstreamPermissionDenied, "FAILED_PRECONDITION"),
        (424, "ModelErrorException", errors.UpstreamUnavailable, "UNAVAILABLE"),
    ],
)
async def test_exceptions_map(
    fake: fb.FakeBedrock,
    provider: BedrockProvider,
    status: int,
    kind: str,
    error: type[errors.BrokerError],
    code: str,
) -> None:
    fake.faults.append(Fault("status", status=status, error_type=kind, message=f"{kind} said so"))
    _, err = await collect_until_error(provider, ask())
    assert type(err) is error and err.code.name == code, err
    assert f"{kind} said so" in err.message and kind in err.message
    assert err.retryable == (code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"))


async def test_in_stream_exception_after_content(fake: fb.FakeBedrock, provider: BedrockProvider) -> None:
    fake.faults.append(
        Fault("error_event", after_chunks=2, error_type="throttlingException", message="Too many tokens")
    )
    events, err = await collect_until_error(provider, ask())
    assert text_of(events) == "Hello"  # two deltas reached the caller first
    assert isinstance(err, errors.UpstreamRateLimited) and "Too many tokens" in err.message


@pytest.mark.parametrize("where", ["prelude", "message"])
async def test_a_bad_crc_is_a_protocol_error(
    fake: fb.FakeBedrock, provider: BedrockProvider, where: str
) -> None:
    fake.corrupt = where
    events, err = await collect_until_error(provider, ask())
    assert isinstance(err, errors.UpstreamProtocolError) and f"{where} CRC mismatch" in err.message
    assert not text_of(events)


async def test_a_stream_cut_before_metadata(fake: fb.FakeBedrock, provider: BedrockProvider) -> None:
    fake.faults.append(Fault("no_terminator", after_chunks=3))
    _, err = await collect_until_error(provider, ask())
    assert isinstance(err, errors.UpstreamProtocolError) and "before its metadata event" in err.message


async def test_guardrail_intervention_is_a_content_filter_with_detail(
    fake: fb.FakeBedrock, provider: BedrockProvider
) -> None:
    fake.reply = Reply(text_chunks=["Sorry, I can't help with that."])
    fake.stop_reason = "guardrail_intervened"
    fake.trace = {
        "guardrail": {
            "inputAssessment": {
                "gr-1": {
                    "contentPolicy": {
                        "filters": [{"type": "VIOLENCE", "confidence": "HIGH", "action": "BLOCKED"}]
                    },
                    "sensitiveInformationPolicy": {
                        "piiEntities": [{"type": "EMAIL", "match": "a@b.c", "action": "BLOCKED"}]
                    },
                }
            }
        }
    }
    end = (await collect(provider, ask()))[-1]
    assert isinstance(end, EndEvent) and end.finish_reason is FinishReason.CONTENT_FILTER
    assert end.refusal is not None and end.refusal.explanation == "Bedrock Guardrails intervened"
    assert end.refusal.category == "contentPolicy:VIOLENCE, sensitiveInformationPolicy:EMAIL"
    assert "a@b.c" not in end.refusal.category  # the matched text (PII) is never echoed


async def test_discovery_lists_models_and_inference_profiles(
    fake: fb.FakeBedrock, provider: BedrockProvider
) -> None:
    fake.models.append("eu.amazon.nova-micro-v1:0")
    names = [m.name for m in await provider.list_models()]
    assert names == [
        "amazon.nova-micro-v1:0", "anthropic.claude-3-haiku-20240307-v1:0", "amazon.titan-embed-text-v2:0",
        "us.amazon.nova-micro-v1:0", "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "eu.amazon.nova-micro-v1:0",
    ]  # fmt: skip
    # The second profiles page was asked for with a token holding '/', '+' and '=': signed right.
    assert any("nextToken=" in r.query for r in fake.requests) and not fake.rejected
    await provider.health_check()


async def test_titan_embeddings_one_text_per_call(fake: fb.FakeBedrock, provider: BedrockProvider) -> None:
    result = await provider.embed(
        EmbedRequest(model="amazon.titan-embed-text-v2:0", inputs=("a b", "c"), dimensions=256)
    )
    assert result.vectors == (tuple(fb.titan_vector("a b", 256)), tuple(fb.titan_vector("c", 256)))
    assert result.input_tokens == 3 and fake.verified == 2


async def test_recorded_titan_embedding(env: None) -> None:
    """bd-embed-titan replayed byte for byte through the provider (the replay suite runs chat only)."""
    rec = json.loads((RECORDINGS / "bd-embed-titan.json").read_text())
    async with ReplayServer(lambda _req: recorded_wire(rec)) as server, started(make(server.url)) as provider:
        body = rec["request"]["body"]
        result = await provider.embed(
            EmbedRequest(model="amazon.titan-embed-text-v2:0", inputs=(body["inputText"],), dimensions=256)
        )
    sent = server.requests[-1]
    assert sent.path == "/model/amazon.titan-embed-text-v2:0/invoke" and sent.json() == body
    expected = json.loads(rec["response"]["body"])
    assert result.vectors == (tuple(expected["embedding"]),) and result.input_tokens == 4


_USER = Message(Role.USER, [TextPart("Hi")])
_CALL = Message(Role.ASSISTANT, tool_calls=[ToolCall("t1", "get_weather", "{}")])
_RESULT = Message(Role.TOOL, [TextPart("ok")], tool_call_id="t1")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ask(tools=[WEATHER], tool_choice=ToolChoice(ToolChoiceMode.NONE)), "tool_choice"),
        (CompletionRequest(model=NOVA, messages=[_USER, _CALL, _RESULT]), "tools"),
        (
            CompletionRequest(model=NOVA, messages=[Message(Role.USER, [ImagePart(url="https://x/y.png")])]),
            "messages[0].content[0].url",
        ),
        (
            CompletionRequest(
                model=NOVA, messages=[Message(Role.USER, [DocumentPart(url="https://x/y.pdf")])]
            ),
            "messages[0].content[0].url",
        ),
        (
            CompletionRequest(
                model=NOVA, messages=[Message(Role.USER, [DocumentPart(b"x", media_type="text/csv")])]
            ),
            "messages[0].content[0].media_type",
        ),
        (
            CompletionRequest(
                model=NOVA, messages=[Message(Role.USER, [ReasoningPart("t", "s", provider_type="bedrock")])]
            ),
            "messages[0].content[0]",
        ),
        (
            ask(
                model=CLAUDE,
                params=GenerationParams(temperature=0.5, reasoning=ReasoningConfig(budget_tokens=2048)),
            ),
            "params.temperature",
        ),
        (
            ask(model=CLAUDE, params=GenerationParams(reasoning=ReasoningConfig(budget_tokens=100))),
            "params.reasoning.budget_tokens",
        ),
        (
            CompletionRequest(
                model=NOVA,
                messages=[
                    _USER,
                    Message(Role.ASSISTANT, tool_calls=[ToolCall("t1", "get_weather", "{nope")]),
                    _RESULT,
                ],
                tools=[WEATHER],
            ),
            "messages[1].tool_calls[0].arguments",
        ),
    ],
)
def test_requests_converse_cannot_take_are_refused_naming_the_field(
    request_: CompletionRequest, field: str
) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        bedrock_wire.build_body(request_)
    assert info.value.violations[0][0] == field, info.value.violations


def test_alternating_turns_and_tool_results_first() -> None:
    history = [
        _USER,
        Message(Role.USER, [TextPart("more")]),
        _CALL,
        _RESULT,
        Message(Role.USER, [TextPart("and?")]),
    ]
    body = bedrock_wire.build_body(CompletionRequest(model=NOVA, messages=history, tools=[WEATHER]))
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0]["content"] == [{"text": "Hi"}, {"text": "more"}]
    assert body["messages"][2]["content"] == [
        {"toolResult": {"toolUseId": "t1", "content": [{"text": "ok"}], "status": "success"}},
        {"text": "and?"},
    ]


def test_the_recorded_cache_usage_maps_reads_into_the_input() -> None:
    """bd-cache-point's usage (a unary answer the replay cannot stream): inputTokens excludes
    the 1322 tokens read from the cache; the neutral input count includes them."""
    rec = json.loads((RECORDINGS / "bd-cache-point.json").read_text())
    usage = bedrock_wire.usage_from(json.loads(rec["response"]["body"])["usage"])
    assert (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.cache_write_input_tokens) == (
        2 + 1322, 5, 1322, 0,
    )  # fmt: skip


async def test_a_recorded_stream_byte_by_byte(env: None) -> None:
    """bd-tool-stream's verbatim bytes delivered one byte per socket write (chunk-size lines,
    CRLFs and every frame's prelude cut everywhere): the same answer as the recording holds."""
    rec = json.loads((RECORDINGS / "bd-tool-stream.json").read_text())
    wire = recorded_wire(rec)
    wire.segmenter = lambda: Segmenter.at(list(range(1, len(wire.data))))
    async with ReplayServer(lambda _req: wire) as server, started(make(server.url)) as provider:
        events = await collect(
            provider, ask("What is the temperature of the capital of France?", tools=[WEATHER])
        )
    calls = [e for e in events if isinstance(e, ToolCallDeltaEvent)]
    assert text_of(events).startswith("<thinking> To find the temperature") and text_of(events).endswith(
        "</thinking>\n"
    )
    assert (calls[0].id, calls[0].name) == ("tooluse_lAG_zP8QRHmSYOwZzzaCqA", "get_temperature")
    assert json.loads("".join(c.arguments_delta for c in calls)) == {"city": "Paris"}
    end = events[-1]
    assert isinstance(end, EndEvent) and end.finish_reason is FinishReason.TOOL_CALLS
    assert (end.usage.input_tokens, end.usage.output_tokens) == (471, 91)
