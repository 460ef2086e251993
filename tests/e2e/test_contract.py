"""One neutral contract: the same request through the daemon to each provider's fake upstream
yields the same proto stream shape (start, deltas, end with finish reason, usage and cost),
and tool calls, images, capability checks and errors behave alike."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import broker_settings, required_error_info, stub
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.azure_upstream import API_KEY as AZURE_KEY
from tests.fakes.azure_upstream import FakeAzureOpenAI
from tests.fakes.bedrock_upstream import ACCESS_KEY, SECRET_KEY, FakeBedrock
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.ollama_upstream import FakeModel, FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply, weather_tool_reply
from tests.fakes.vertex_upstream import VertexStack, key_file_for

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")
OPENAI_KEY = "sk-test-contract-openai-5b1c"
ANTHROPIC_KEY = "sk-ant-test-contract-77e2"
GEMINI_KEY = "AIzaSy-test-contract-gemini-3c"


@dataclass
class Case:
    name: str
    make_fake: Callable[[], Any]
    config: Callable[[str], dict[str, Any]]
    model: str  # text, tools and vision
    no_vision_model: str | None
    # micro-USD for 1,000 input + 200 output tokens at the model's price
    expected_cost: int
    # The daemon's environment for this type (Bedrock: AWS credentials for the chain).
    env: dict[str, str] = field(default_factory=dict)


# Bedrock signs with credentials from the environment only (no profile files, no metadata service).
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


CASES = [
    Case(
        "openai",
        lambda: FakeOpenAI(api_key=OPENAI_KEY, models=["gpt-4o-mini", "gpt-3.5-turbo"]),
        lambda url: {"type": "openai", "base_url": url, "api_key": OPENAI_KEY, "catalog_prices": True},
        "gpt-4o-mini",
        "gpt-3.5-turbo",
        150 + 120,  # $0.15 and $0.60 per Mtok
    ),
    Case(
        "anthropic",
        lambda: FakeAnthropic(api_key=ANTHROPIC_KEY),
        lambda url: {"type": "anthropic", "base_url": url, "api_key": ANTHROPIC_KEY, "catalog_prices": True},
        "claude-sonnet-4-5",
        None,  # every Claude model takes images
        3_000 + 3_000,  # $3 and $15 per Mtok
    ),
    Case(
        "ollama",
        lambda: FakeOllama(
            models=[FakeModel("llava", ("completion", "vision", "tools"), 32768), FakeModel("llama3.2")]
        ),
        lambda url: {"type": "ollama", "base_url": url},
        "llava",
        "llama3.2",
        0,  # local
    ),
    Case(
        "bedrock",
        FakeBedrock,
        lambda url: {"type": "bedrock", "base_url": url, "region": "us-east-1", "catalog_prices": True},
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        "us.amazon.nova-micro-v1:0",  # Nova Micro reads text only
        3_300 + 3_300,  # $3.30 and $16.50 per Mtok (the us. profile's price)
        env=AWS_ENV,
    ),
    Case(
        "azure_openai",
        lambda: FakeAzureOpenAI(deployments={"gpt-4o-prod": "gpt-4o", "legacy": "gpt-3.5-turbo"}),
        lambda url: {
            "type": "azure_openai",
            "base_url": url,
            "api_key": AZURE_KEY,
            "api_version": "2024-10-21",
            "deployments": {"gpt-4o-prod": "gpt-4o", "legacy": "gpt-3.5-turbo"},
            "catalog_prices": True,
        },
        "gpt-4o-prod",
        "legacy",  # gpt-3.5-turbo: no vision
        2_500 + 2_000,  # gpt-4o at OpenAI's $2.50 and $10 per Mtok
    ),
    Case(
        "gemini",
        lambda: FakeGemini(api_key=GEMINI_KEY),
        lambda url: {"type": "gemini", "base_url": url, "api_key": GEMINI_KEY, "catalog_prices": True},
        "gemini-2.5-flash",
        None,  # every Gemini model in the catalogue takes images
        300 + 500,  # $0.30 and $2.50 per Mtok
    ),
    Case("vertex", VertexStack, lambda url: _vertex(url), "gemini-2.5-flash", None, 300 + 500),
    # Claude on Vertex: the Messages wire on streamRawPredict, at Anthropic's prices.
    Case("vertex-claude", VertexStack, lambda url: _vertex(url), "claude-sonnet-4-5@20250929", None, 6_000),
]
# The chat requests' paths, per wire (last_body).
CHAT_PATHS = (
    "/chat/completions",
    "/messages",
    "/api/chat",
    "/converse-stream",
    ":streamGenerateContent",
    ":streamRawPredict",
)
GEMINI_WIRE = ("gemini", "vertex")
ANTHROPIC_WIRE = ("anthropic", "vertex-claude")


def _vertex(url: str) -> dict[str, Any]:
    """A vertex provider on the stack at `url`, with the service account key it wrote."""
    return {
        "type": "vertex",
        "base_url": url,
        "project": "my-project",
        "location": "us-central1",
        "credentials_file": str(key_file_for(url)),
        "catalog_prices": True,
    }


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
async def setup(request, daemon, channel_to, monkeypatch) -> AsyncIterator[tuple[Case, Any, Any]]:
    case: Case = request.param
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    async with case.make_fake() as fake:
        # A slow health loop: the Anthropic fake hands a queued fault to any endpoint.
        settings = broker_settings(
            [{"name": case.name, **case.config(fake.url)}],
            health={"interval_seconds": 30, "timeout_seconds": 1},
        )
        _, target = await daemon(settings)
        yield case, fake, stub(channel_to(target))


def user(text: str, image: bytes | None = None) -> pb.Message:
    m = pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])
    if image is not None:
        m.content.add(image=pb.Image(data=image, media_type="image/png"))
    return m


def weather_tool() -> pb.Tool:
    t = pb.Tool(name="get_weather", description="Weather by city")
    t.parameters.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    return t


async def stream(s: Any, req: pb.StreamCompleteRequest) -> list[pb.StreamCompleteResponse]:
    return [m async for m in s.StreamComplete(req, timeout=10)]


def shape(msgs: list[pb.StreamCompleteResponse]) -> list[str]:
    return [str(m.WhichOneof("event")) for m in msgs]


def reason_of(err: grpc.aio.AioRpcError) -> str:
    return str(required_error_info(err).reason)


def last_body(fake: Any) -> dict[str, Any]:
    posts = [r for r in fake.server.requests if r.method == "POST" and r.path.endswith(CHAT_PATHS)]
    return dict(posts[-1].json())


async def test_text_stream_has_one_shape(setup) -> None:
    case, fake, s = setup
    fake.reply = Reply(text_chunks=["One", " two", " three", "."], input_tokens=1_000, output_tokens=200)
    msgs = await stream(
        s, pb.StreamCompleteRequest(model=f"{case.name}/{case.model}", messages=[user("Count")])
    )
    assert shape(msgs) == ["start", "text_delta", "text_delta", "text_delta", "text_delta", "end"]
    assert (msgs[0].start.provider, msgs[0].start.model) == (case.name, case.model)
    assert "".join(m.text_delta.text for m in msgs[1:-1]) == "One two three."
    end = msgs[-1].end
    assert end.finish_reason == pb.FINISH_REASON_STOP
    assert (end.usage.input_tokens, end.usage.output_tokens) == (1_000, 200)
    assert end.cost.known and end.cost.total_micro_usd == case.expected_cost


async def test_tool_call_round_trip(setup) -> None:
    case, fake, s = setup
    fake.reply = weather_tool_reply()
    ask = user("Weather in Paris?")
    req = pb.StreamCompleteRequest(model=f"{case.name}/{case.model}", messages=[ask], tools=[weather_tool()])
    msgs = await stream(s, req)
    assert shape(msgs)[0] == "start" and shape(msgs)[-1] == "end"
    deltas = [m.tool_call_delta for m in msgs if m.HasField("tool_call_delta")]
    assert deltas and deltas[0].id and deltas[0].name == "get_weather"
    assert {d.index for d in deltas} == {0} and all(d.id in ("", deltas[0].id) for d in deltas)
    assert json.loads("".join(d.arguments_delta for d in deltas)) == {"city": "Paris"}
    assert msgs[-1].end.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    call_id = deltas[0].id

    # Send the call and its result back; the upstream must see them in its own wire format.
    fake.reply = Reply(text_chunks=["It is ", "18C."])
    history = [
        ask,
        pb.Message(
            role=pb.ROLE_ASSISTANT,
            tool_calls=[pb.ToolCall(id=call_id, name="get_weather", arguments='{"city": "Paris"}')],
        ),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id=call_id, content=[pb.ContentPart(text="18C sunny")]),
    ]
    msgs = await stream(
        s,
        pb.StreamCompleteRequest(model=f"{case.name}/{case.model}", messages=history, tools=[weather_tool()]),
    )
    assert "".join(m.text_delta.text for m in msgs if m.HasField("text_delta")) == "It is 18C."
    body = last_body(fake)
    if case.name in ("openai", "azure_openai"):
        assert body["messages"][1]["tool_calls"][0]["id"] == call_id
        assert body["messages"][2] == {"role": "tool", "tool_call_id": call_id, "content": "18C sunny"}
    elif case.name in GEMINI_WIRE:
        call = {"name": "get_weather", "args": {"city": "Paris"}, "id": call_id}
        assert body["contents"][1] == {"role": "model", "parts": [{"functionCall": call}]}
        response = {"name": "get_weather", "response": {"output": "18C sunny"}, "id": call_id}
        assert body["contents"][2] == {"role": "user", "parts": [{"functionResponse": response}]}
    elif case.name in ANTHROPIC_WIRE:
        assert body["messages"][1]["content"][0] == {
            "type": "tool_use",
            "id": call_id,
            "name": "get_weather",
            "input": {"city": "Paris"},
        }
        assert body["messages"][2]["content"][0]["type"] == "tool_result"
        assert body["messages"][2]["content"][0]["tool_use_id"] == call_id
    elif case.name == "bedrock":
        assert body["messages"][1]["content"][0] == {
            "toolUse": {"toolUseId": call_id, "name": "get_weather", "input": {"city": "Paris"}}
        }
        assert body["messages"][2]["content"][0] == {
            "toolResult": {"toolUseId": call_id, "content": [{"text": "18C sunny"}], "status": "success"}
        }
    else:
        assert body["messages"][1]["tool_calls"][0]["function"] == {
            "name": "get_weather",
            "arguments": {"city": "Paris"},
        }
        assert body["messages"][2]["role"] == "tool" and body["messages"][2]["content"] == "18C sunny"


async def test_image_reaches_upstream_in_its_format(setup) -> None:
    case, fake, s = setup
    await stream(
        s, pb.StreamCompleteRequest(model=f"{case.name}/{case.model}", messages=[user("What is this?", PNG)])
    )
    body = last_body(fake)
    import base64

    b64 = base64.b64encode(PNG).decode()
    if case.name in ("openai", "azure_openai"):
        assert body["messages"][0]["content"][1] == {
            "type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{b64}"},
        }
    elif case.name in GEMINI_WIRE:
        assert body["contents"][0]["parts"][1] == {"inlineData": {"mimeType": "image/png", "data": b64}}
    elif case.name in ANTHROPIC_WIRE:
        assert body["messages"][0]["content"][1] == {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": b64},
        }
    elif case.name == "bedrock":
        assert body["messages"][0]["content"][1] == {"image": {"format": "png", "source": {"bytes": b64}}}
    else:
        assert body["messages"][0]["images"] == [b64]


async def test_image_to_a_model_without_vision_fails_before_the_upstream(setup) -> None:
    case, fake, s = setup
    if case.no_vision_model is None:
        pytest.skip(f"every {case.name} model in the catalogue has vision")
    before = len(fake.server.requests)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.Complete(
            pb.CompleteRequest(
                model=f"{case.name}/{case.no_vision_model}", messages=[user("What is this?", PNG)]
            ),
            timeout=10,
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(e.value) == "CAPABILITY_MISSING" and "vision" in e.value.details()
    assert len(fake.server.requests) == before


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED"),
        (500, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        (400, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_INVALID_REQUEST"),
    ],
)
async def test_upstream_errors_map_alike(setup, status, code, reason) -> None:
    case, fake, s = setup
    # Enough failures to outlast the broker's own retries of 429 and 5xx.
    fake.faults.extend(Fault("status", status=status, headers={"retry-after": "0"}) for _ in range(10))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.Complete(
            pb.CompleteRequest(model=f"{case.name}/{case.model}", messages=[user("x")]), timeout=20
        )
    assert e.value.code() == code, e.value.details()
    assert reason_of(e.value) == reason


async def test_mid_stream_error_event_interrupts(setup) -> None:
    case, fake, s = setup
    fake.faults.append(Fault("error_event", after_chunks=2))
    got: list[pb.StreamCompleteResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for m in s.StreamComplete(
            pb.StreamCompleteRequest(model=f"{case.name}/{case.model}", messages=[user("x")]), timeout=10
        ):
            got.append(m)
    assert shape(got)[0] == "start" and "text_delta" in shape(got)
    assert reason_of(e.value) == "STREAM_INTERRUPTED"


async def test_prompt_over_the_context_window_is_refused_before_the_upstream(daemon, channel_to) -> None:
    async with FakeOllama(models=[FakeModel("tiny", ("completion",), 1_000)]) as fake:
        _, target = await daemon(broker_settings([{"name": "local", "type": "ollama", "base_url": fake.url}]))
        s = stub(channel_to(target))
        before = len(fake.server.requests)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.Complete(
                pb.CompleteRequest(model="local/tiny", messages=[user("word " * 3_000)]), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            reason_of(e.value) == "CONTEXT_LENGTH_EXCEEDED"
            and "1000-token context window" in e.value.details()
        )
        assert len(fake.server.requests) == before


async def test_catalogue_override_and_unknown_discovered_model(daemon, channel_to) -> None:
    async with FakeOpenAI(models=["gpt-4o-mini", "mystery-model"]) as fake:
        settings = broker_settings(
            [{"name": "gw", "type": "openai", "base_url": fake.url}],
            models=[
                {"id": "gw/gpt-4o-mini", "input_usd_per_mtok": 0.2, "output_usd_per_mtok": 0.8},
                {
                    "id": "gw/house-model",
                    "context_window": 32000,
                    "tools": True,
                    "input_usd_per_mtok": 1,
                    "output_usd_per_mtok": 2,
                },
            ],
        )
        _, target = await daemon(settings)
        s = stub(channel_to(target))
        models = {m.id: m for m in (await s.ListModels(pb.ListModelsRequest(), timeout=5)).models}
        mini = models["gw/gpt-4o-mini"]
        assert mini.pricing.known and mini.pricing.input_micro_usd_per_mtok == 200_000  # overridden
        assert mini.context_window == 128_000 and pb.CAPABILITY_VISION in mini.capabilities  # catalogue facts
        mystery = models["gw/mystery-model"]
        assert mystery.discovered and not mystery.capabilities_known and not mystery.pricing.known
        house = models["gw/house-model"]
        assert house.source == "config" and house.context_window == 32_000
        assert list(house.capabilities) == [pb.CAPABILITY_TOOLS]
        only_vision = await s.ListModels(pb.ListModelsRequest(capabilities=[pb.CAPABILITY_VISION]), timeout=5)
        assert [m.id for m in only_vision.models] == ["gw/gpt-4o-mini"]
