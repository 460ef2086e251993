"""The 2026 contract through a real daemon, on every provider's fake upstream (issue 13):
reasoning streamed apart from the text and sent back byte-exact in a tool loop, a fallback
that drops foreign thinking, structured outputs, refusals, and CAPABILITY_MISSING for each
new capability before any upstream call."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import structlog

from modelbroker.client import Turn, event_from_proto
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import broker_settings, required_error_info, stub
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.ollama_upstream import FakeModel, FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply, ToolCallScript
from tests.fakes.vertex_upstream import VertexStack, key_file_for

OPENAI_KEY = "sk-test-contract-openai-5b1c"
ANTHROPIC_KEY = "sk-ant-test-contract-77e2"
GEMINI_KEY = "AIzaSy-test-contract-gemini-3c"
THOUGHTS = ["The user wants", " the weather", " in Paris."]
PDF = b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n%%EOF\n"


@dataclass
class Case:
    name: str
    make_fake: Callable[[], Any]
    config: Callable[[str], dict[str, Any]]
    model: str  # thinks when asked
    think: Callable[[Any], None]  # make the fake stream THOUGHTS before its answer


def _openai_thinks(fake: FakeOpenAI) -> None:
    fake.reasoning_chunks = list(THOUGHTS)
    fake.reasoning_tokens = 7


def _anthropic_thinks(fake: FakeAnthropic) -> None:
    fake.thinking_chunks = list(THOUGHTS)
    fake.thinking_tokens = 7


def _ollama_thinks(fake: FakeOllama) -> None:
    fake.thinking_chunks = list(THOUGHTS)


def _gemini_thinks(fake: FakeGemini | VertexStack) -> None:
    gemini = fake.vertex.gemini if isinstance(fake, VertexStack) else fake
    gemini.thought_chunks = list(THOUGHTS)
    gemini.thoughts_tokens = 7


def _vertex(url: str) -> dict[str, Any]:
    return {"type": "vertex", "base_url": url, "project": "my-project", "location": "us-central1",
            "credentials_file": str(key_file_for(url))}  # fmt: skip


CASES = [
    Case(
        "openai",
        lambda: FakeOpenAI(api_key=OPENAI_KEY, models=["gpt-5-mini", "gpt-4o-mini", "gpt-3.5-turbo"]),
        lambda url: {"type": "openai", "base_url": url, "api_key": OPENAI_KEY},
        "gpt-5-mini",
        _openai_thinks,
    ),
    Case(
        "anthropic",
        lambda: FakeAnthropic(api_key=ANTHROPIC_KEY),
        lambda url: {"type": "anthropic", "base_url": url, "api_key": ANTHROPIC_KEY},
        "claude-sonnet-4-5",
        _anthropic_thinks,
    ),
    Case(
        "ollama",
        lambda: FakeOllama(
            models=[FakeModel("qwen3", ("completion", "tools", "thinking")), FakeModel("llama3.2")]
        ),
        lambda url: {"type": "ollama", "base_url": url},
        "qwen3",
        _ollama_thinks,
    ),
    Case(
        "gemini",
        lambda: FakeGemini(api_key=GEMINI_KEY),
        lambda url: {"type": "gemini", "base_url": url, "api_key": GEMINI_KEY},
        "gemini-2.5-flash",
        _gemini_thinks,
    ),
    Case("vertex", VertexStack, _vertex, "gemini-2.5-flash", _gemini_thinks),
]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
async def env(request, daemon, channel_to) -> AsyncIterator[tuple[Case, Any, Any]]:
    case: Case = request.param
    async with case.make_fake() as fake:
        cfg = {"name": case.name, **case.config(fake.url)}
        _, target = await daemon(broker_settings([cfg]))
        yield case, fake, stub(channel_to(target))


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def chat_bodies(fake: Any) -> list[dict[str, Any]]:
    paths = ("/chat/completions", "/v1/messages", "/api/chat", ":streamGenerateContent")
    return [r.json() for r in fake.requests if r.method == "POST" and r.path.endswith(paths)]


async def test_reasoning_streams_apart_from_the_text_and_the_answer_keeps_it(env) -> None:
    case, fake, s = env
    case.think(fake)
    fake.reply = Reply(text_chunks=["Sunny", ", 24C."], output_tokens=20)
    params = pb.GenerationParams(reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_HIGH))
    req = pb.StreamCompleteRequest(
        model=f"{case.name}/{case.model}", messages=[user("Paris?")], params=params
    )
    msgs = [m async for m in s.StreamComplete(req, timeout=10)]
    kinds = [m.WhichOneof("event") for m in msgs]
    assert kinds[0] == "start" and kinds[-1] == "end"
    first_text = kinds.index("text_delta")
    assert set(kinds[1:first_text]) == {"reasoning_delta"}, kinds
    assert "reasoning_delta" not in kinds[first_text:]
    thought = "".join(m.reasoning_delta.text for m in msgs if m.HasField("reasoning_delta"))
    assert thought == "".join(THOUGHTS)
    assert "".join(m.text_delta.text for m in msgs if m.HasField("text_delta")) == "Sunny, 24C."
    assert msgs[0].start.provider_type == case.name
    if case.name != "ollama":  # Ollama reports no reasoning count
        assert msgs[-1].end.usage.reasoning_tokens == 7
    # Unary: the same answer, reasoning as a part of the message, before the text.
    resp = await s.Complete(
        pb.CompleteRequest(model=req.model, messages=req.messages, params=params), timeout=10
    )
    parts = [(p.WhichOneof("part"), p.reasoning.text or p.text) for p in resp.message.content]
    assert parts == [("reasoning", "".join(THOUGHTS)), ("text", "Sunny, 24C.")]
    assert resp.message.content[0].reasoning.provider_type == case.name
    # What each vendor was asked (PROTOCOLS-2026 §1).
    sent = chat_bodies(fake)[-1]
    if case.name == "openai":
        assert sent["reasoning_effort"] == "high"
    elif case.name == "anthropic":
        assert sent["thinking"] == {"type": "enabled", "budget_tokens": 16384}
        assert sent["max_tokens"] > 16384
    elif case.name in ("gemini", "vertex"):
        thinking = {"thinkingBudget": 24576, "includeThoughts": True}
        assert sent["generationConfig"]["thinkingConfig"] == thinking
    else:
        assert sent["think"] == "high"


async def test_json_schema_answers_on_every_provider(env) -> None:
    case, fake, s = env
    fake.reply = Reply(text_chunks=['{"city": "Paris"}'])
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    js = pb.JsonSchema(name="place", strict=True)
    js.schema.update(schema)
    req = pb.CompleteRequest(
        model=f"{case.name}/{case.model}",
        messages=[user("Where?")],
        params=pb.GenerationParams(json_schema=js),
    )
    resp = await s.Complete(req, timeout=10)
    assert json.loads(resp.message.content[0].text) == {"city": "Paris"}
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    sent = chat_bodies(fake)[-1]
    if case.name == "openai":
        assert sent["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "place", "schema": schema, "strict": True},
        }
    elif case.name == "anthropic":
        assert sent["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    elif case.name in ("gemini", "vertex"):
        config = {"responseMimeType": "application/json", "responseJsonSchema": schema}
        assert sent["generationConfig"] == config
    else:
        assert sent["format"] == schema
    # A schema strict mode would reject never reaches the upstream, and names its path.
    before = len(chat_bodies(fake))
    js.schema.update({"additionalProperties": True})
    bad = pb.CompleteRequest(
        model=req.model, messages=req.messages, params=pb.GenerationParams(json_schema=js)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Complete(bad, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.json_schema.schema.additionalProperties" in (err.value.details() or "")
    assert len(chat_bodies(fake)) == before


async def test_each_new_capability_is_missing_before_any_upstream_call(daemon, channel_to) -> None:
    async with (
        FakeOpenAI(api_key=OPENAI_KEY, models=["gpt-4o-mini", "gpt-4"]) as oai,
        FakeOllama(models=[FakeModel("llama3.2")]) as oll,
    ):
        settings = broker_settings(
            [
                {"name": "openai", "type": "openai", "base_url": oai.url, "api_key": OPENAI_KEY},
                {"name": "ollama", "type": "ollama", "base_url": oll.url},
            ]
        )
        _, target = await daemon(settings)
        s = stub(channel_to(target))
        js = pb.JsonSchema(name="x")
        js.schema.update({"type": "object"})
        doc = pb.Message(
            role=pb.ROLE_USER,
            content=[pb.ContentPart(text="read"), pb.ContentPart(document=pb.Document(data=PDF))],
        )
        cases = [
            # gpt-4o-mini is no reasoning model; gpt-4 has no structured outputs; Ollama takes no documents.
            (
                "openai/gpt-4o-mini",
                [user("hi")],
                pb.GenerationParams(reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_LOW)),
                "reasoning",
            ),
            ("openai/gpt-4", [user("hi")], pb.GenerationParams(json_schema=js), "structured_outputs"),
            ("ollama/llama3.2", [doc], pb.GenerationParams(), "documents"),
        ]
        for model, messages, params, capability in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await s.Complete(
                    pb.CompleteRequest(model=model, messages=messages, params=params), timeout=10
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, model
            info = required_error_info(err.value)
            assert info.reason == "CAPABILITY_MISSING"
            assert info.metadata["capabilities"] == capability
        assert not chat_bodies(oai) and not chat_bodies(oll)
        # Turning reasoning off asks nothing of the model.
        off = pb.GenerationParams(reasoning=pb.Reasoning(disabled=True))
        resp = await s.Complete(
            pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")], params=off), timeout=10
        )
        assert resp.message.content[0].text == "Hello there!"


async def test_anthropic_tool_loop_with_thinking_sends_the_signed_block_back_unmodified(
    daemon, channel_to
) -> None:
    async with FakeAnthropic(api_key=ANTHROPIC_KEY) as ant:
        _, target = await daemon(
            broker_settings(
                [{"name": "anthropic", "type": "anthropic", "base_url": ant.url, "api_key": ANTHROPIC_KEY}]
            )
        )
        s = stub(channel_to(target))
        ant.thinking_chunks = ["I need", " the weather tool."]
        ant.reply = Reply(
            text_chunks=[],
            tool_calls=[
                ToolCallScript(id="toolu_01", name="get_weather", argument_chunks=['{"city": "Paris"}'])
            ],
            finish="tool_calls",
        )
        tool = pb.Tool(name="get_weather", description="Weather by city")
        tool.parameters.update(
            {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        )
        params = pb.GenerationParams(reasoning=pb.Reasoning(budget_tokens=2048), max_tokens=4096)
        history = [user("Weather in Paris?")]
        req = pb.StreamCompleteRequest(
            model="anthropic/claude-sonnet-4-5", messages=history, tools=[tool], params=params
        )
        turn = Turn()
        async for m in s.StreamComplete(req, timeout=10):
            ev = event_from_proto(m)
            turn.add(ev)
        first_answer = ant.answers[-1]
        signed = next(b for b in first_answer if b["type"] == "thinking")
        assert turn.ended is not None and turn.ended.finish_reason == "tool_calls"
        history += [
            turn.message(),
            pb.Message(
                role=pb.ROLE_TOOL, tool_call_id="toolu_01", content=[pb.ContentPart(text="24C, sunny")]
            ),
        ]
        ant.thinking_chunks = []
        ant.reply = Reply(text_chunks=["It is 24C and sunny."])
        req2 = pb.StreamCompleteRequest(model=req.model, messages=history, tools=[tool], params=params)
        text = "".join(
            [m.text_delta.text async for m in s.StreamComplete(req2, timeout=10) if m.HasField("text_delta")]
        )
        assert text == "It is 24C and sunny."
        # On the wire, as the fake received it: the block exactly as the fake sent it, first.
        sent = ant.message_bodies[-1]
        assistant = sent["messages"][1]
        assert assistant["content"][0] == {
            "type": "thinking",
            "thinking": signed["thinking"],
            "signature": signed["signature"],
        }
        assert assistant["content"][1]["type"] == "tool_use" and assistant["content"][1]["id"] == "toolu_01"
        assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}


async def test_a_fallback_from_anthropic_to_openai_drops_the_foreign_thinking(daemon, channel_to) -> None:
    async with FakeAnthropic(api_key=ANTHROPIC_KEY) as ant, FakeOpenAI(api_key=OPENAI_KEY) as oai:
        _, target = await daemon(
            broker_settings(
                [
                    {"name": "anthropic", "type": "anthropic", "base_url": ant.url, "api_key": ANTHROPIC_KEY},
                    {"name": "openai", "type": "openai", "base_url": oai.url, "api_key": OPENAI_KEY},
                ]
            )
        )
        s = stub(channel_to(target))
        thought = pb.ReasoningPart(
            text="Paris is in France.", signature="EqQBCkYIBxgCKkD0", provider_type="anthropic"
        )
        history = [
            user("Capital of France?"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                content=[pb.ContentPart(reasoning=thought), pb.ContentPart(text="Paris.")],
            ),
            user("And of Italy?"),
        ]
        ant.faults = [Fault("status", status=529)] * 10  # overloaded, every try
        req = pb.CompleteRequest(
            model="anthropic/claude-sonnet-4-5", messages=history, fallback_models=["openai/gpt-4o-mini"]
        )
        resp = await s.Complete(req, timeout=15)
        assert resp.provider == "openai"
        # Anthropic was asked with its own block; OpenAI never saw it.
        assert chat_bodies(ant)[0]["messages"][1]["content"][0]["signature"] == "EqQBCkYIBxgCKkD0"
        to_openai = chat_bodies(oai)[-1]["messages"]
        assert to_openai[1] == {"role": "assistant", "content": "Paris."}
        assert "EqQBCkYIBxgCKkD0" not in json.dumps(to_openai) and "Paris is in France" not in json.dumps(
            to_openai
        )


async def test_refusal_reaches_the_caller_with_its_explanation(daemon, channel_to) -> None:
    async with FakeAnthropic(api_key=ANTHROPIC_KEY) as ant, FakeOpenAI(api_key=OPENAI_KEY) as oai:
        _, target = await daemon(
            broker_settings(
                [
                    {"name": "anthropic", "type": "anthropic", "base_url": ant.url, "api_key": ANTHROPIC_KEY},
                    {"name": "openai", "type": "openai", "base_url": oai.url, "api_key": OPENAI_KEY},
                ]
            )
        )
        s = stub(channel_to(target))
        ant.reply = Reply(text_chunks=[], finish="content_filter")
        ant.stop_details = {"type": "refusal", "category": "cyber", "explanation": "Blocked: cyber harm."}
        msgs = [
            m
            async for m in s.StreamComplete(
                pb.StreamCompleteRequest(model="anthropic/claude-sonnet-4-5", messages=[user("x")]),
                timeout=10,
            )
        ]
        end = msgs[-1].end
        assert end.finish_reason == pb.FINISH_REASON_REFUSAL
        assert (end.refusal.explanation, end.refusal.category) == ("Blocked: cyber harm.", "cyber")
        oai.reply = Reply(text_chunks=[])
        oai.refusal_chunks = ["I can't", " help with that."]
        resp = await s.Complete(
            pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("x")]), timeout=10
        )
        assert resp.finish_reason == pb.FINISH_REASON_REFUSAL
        assert resp.refusal.explanation == "I can't help with that." and not resp.message.content


async def test_python_client_reasoning_schema_metadata_and_options(daemon, channel_to) -> None:
    from modelbroker.client import AsyncBrokerClient, ReasoningDelta, json_schema, reasoning

    async with FakeOpenAI(api_key=OPENAI_KEY, models=["gpt-5-mini"]) as oai:
        _, target = await daemon(
            broker_settings(
                [{"name": "openai", "type": "openai", "base_url": oai.url, "api_key": OPENAI_KEY}]
            )
        )
        oai.reasoning_chunks = ["Count ", "the letters."]
        oai.reply = Reply(text_chunks=['{"n": 3}'], output_tokens=9)
        schema = {
            "type": "object",
            "properties": {"n": {"type": "integer"}},
            "required": ["n"],
            "additionalProperties": False,
        }
        async with AsyncBrokerClient(target, timeout=10) as client:
            kw: dict[str, Any] = {
                "reasoning": reasoning("low"),
                "json_schema": json_schema("count", schema),
                "end_user_id": "u_5c1e",
                "tags": {"team": "search"},
                "provider_options": {"openai": {"service_tier": "flex"}},
            }
            events = [ev async for ev in client.stream("openai/gpt-5-mini", "How many r in 'arr'?", **kw)]
            assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Count the letters."
            with structlog.testing.capture_logs() as logs:
                answer = await client.complete("openai/gpt-5-mini", "How many r in 'arr'?", **kw)
        line = next(e for e in logs if e["event"] == "request")
        assert line["end_user"] == "u_5c1e" and line["tags"] == {"team": "search"}
        assert line["provider_options"] == {"openai": ["service_tier"]}  # keys only, never values
        assert "flex" not in json.dumps(line, default=str)
        assert json.loads(answer.text) == {"n": 3} and answer.reasoning == "Count the letters."
        sent = chat_bodies(oai)[-1]
        assert sent["reasoning_effort"] == "low" and sent["user"] == "u_5c1e"  # not api.openai.com: `user`
        assert sent["service_tier"] == "flex"
        assert sent["response_format"]["json_schema"]["name"] == "count"
        assert "tags" not in sent and "search" not in json.dumps(sent)  # tags stay in the broker
