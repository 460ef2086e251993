"""Through a real daemon: the defects the recorded vendor traffic and a real model server showed
(issue 10, item 4). Recorded bytes come from ../shared/recordings at run time (tests/recordings.py);
where no recording exists the fakes act out the vendor's behaviour.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply
from tests.recordings import RecordedUpstream
from tests.reliability.conftest import FAST_ROUTING, openai_provider, stream, stub, unary, user

ANTHROPIC_KEY = "sk-ant-fake-0123456789"


def anthropic_provider(name: str, url: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "type": "anthropic", "base_url": url, "api_key": ANTHROPIC_KEY, **kw}


async def broker_for(daemon: Any, channel_to: Any, *providers: dict[str, Any]) -> Any:
    _, target = await daemon(broker_settings(list(providers), routing=FAST_ROUTING))
    return stub(channel_to(target))


def ask(model: str, *messages: pb.Message, **kw: Any) -> pb.StreamCompleteRequest:
    return pb.StreamCompleteRequest(model=model, messages=list(messages) or [user("hi")], **kw)


def unary_of(req: pb.StreamCompleteRequest) -> pb.CompleteRequest:
    return pb.CompleteRequest(model=req.model, messages=req.messages, fallback_models=req.fallback_models)


# --- 1. an in-stream invalid request: INVALID_ARGUMENT, one upstream attempt ----------------------


async def test_groq_tool_use_failed_mid_stream_is_invalid_argument_and_not_retried(
    daemon, channel_to
) -> None:
    async with RecordedUpstream("oa-groq-midstream-error") as groq:
        broker = await broker_for(daemon, channel_to, openai_provider("groq", f"{groq.url}/v1"))
        req = ask("groq/openai/gpt-oss-120b")
        out = await stream(broker, req)
        # The caller saw the reasoning, so the in-stream error ends the stream as an
        # interruption that names its cause (never a retry that would splice two answers).
        assert out.status == "UNAVAILABLE STREAM_INTERRUPTED", out
        assert out.metadata["cause"] == "UPSTREAM_INVALID_REQUEST"
        assert int(out.metadata["delivered_reasoning_chars"]) > 0
        assert len(groq.posts()) == 1, "the caller's error is not retried"
        assert not [m for m in out.messages if m.HasField("text_delta")], "reasoning is not answer text"
        assert [m for m in out.messages if m.HasField("reasoning_delta")]
        # Unary holds everything until the end: the upstream's verdict, as it was.
        alone = await unary(broker, unary_of(req))
        assert alone.status == "INVALID_ARGUMENT UPSTREAM_INVALID_REQUEST"
        assert len(groq.posts()) == 2


async def test_groq_error_message_reaches_the_caller(daemon, channel_to) -> None:
    async with RecordedUpstream("oa-groq-midstream-error") as groq:
        broker = await broker_for(daemon, channel_to, openai_provider("groq", f"{groq.url}/v1"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await broker.Complete(unary_of(ask("groq/openai/gpt-oss-120b")), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameters for tool get_something_by_name did not match schema" in (
            info.value.details() or ""
        )


# --- 2. gpt-5 behind a gateway gets max_completion_tokens ----------------------------------------


async def test_the_output_limit_field_is_chosen_by_the_model_at_any_host(daemon, channel_to) -> None:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY, models=["gpt-5", "gpt-4o-mini", "openai/o3-mini"]) as gw:
        broker = await broker_for(daemon, channel_to, openai_provider("gateway", gw.url))
        params = pb.GenerationParams(max_tokens=64)
        for model in ("gpt-5", "openai/o3-mini", "gpt-4o-mini"):
            out = await stream(
                broker,
                pb.StreamCompleteRequest(model=f"gateway/{model}", messages=[user("hi")], params=params),
            )
            assert out.status == "OK"
        gpt5, o3, mini = gw.chat_bodies
        assert gpt5["max_completion_tokens"] == 64 and "max_tokens" not in gpt5  # the catalogue's flag
        assert o3["max_completion_tokens"] == 64 and "max_tokens" not in o3  # the id's family
        assert mini["max_tokens"] == 64 and "max_completion_tokens" not in mini


# --- 3. an empty assistant turn is passed on ---------------------------------------------------


async def test_an_empty_assistant_turn_in_history_is_passed_on(daemon, channel_to) -> None:
    history = [user("Say nothing."), pb.Message(role=pb.ROLE_ASSISTANT), user("Now say hi.")]
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as oai, FakeAnthropic(api_key=ANTHROPIC_KEY) as ant:
        broker = await broker_for(
            daemon, channel_to, openai_provider("oai", oai.url), anthropic_provider("ant", ant.url)
        )
        assert (await stream(broker, ask("oai/gpt-4o-mini", *history))).status == "OK"
        assert oai.chat_bodies[-1]["messages"][1] == {"role": "assistant", "content": ""}
        # The fake refuses empty content as the Messages API does; the turn is left out.
        out = await unary(broker, unary_of(ask("ant/claude-sonnet-4-5", *history)))
        assert out.status == "OK"
        assert [m["role"] for m in ant.message_bodies[-1]["messages"]] == ["user"]


# --- 5. Anthropic: discovered max output, and the default limit ----------------------------------


async def test_the_anthropic_listing_s_max_tokens_is_the_model_s_max_output(daemon, channel_to) -> None:
    async with RecordedUpstream("an-models-docs") as api:
        broker = await broker_for(daemon, channel_to, anthropic_provider("anthropic", api.url))
        info = (
            await broker.GetModel(pb.GetModelRequest(model="anthropic/claude-opus-4-6"), timeout=10)
        ).model
        assert (info.max_output_tokens, info.context_window) == (128_000, 1_000_000)


async def test_a_request_without_max_tokens_gets_the_default_not_the_model_s_maximum(
    daemon, channel_to
) -> None:
    async with FakeAnthropic(api_key=ANTHROPIC_KEY) as ant:
        broker = await broker_for(
            daemon,
            channel_to,
            anthropic_provider("ant", ant.url),
            anthropic_provider("small", ant.url, default_max_tokens=1000),
        )
        assert (await stream(broker, ask("ant/claude-sonnet-4-5"))).status == "OK"
        assert ant.message_bodies[-1]["max_tokens"] == 4096  # not 64,000
        assert (await stream(broker, ask("small/claude-sonnet-4-5"))).status == "OK"
        assert ant.message_bodies[-1]["max_tokens"] == 1000
        # The caller's own limit is sent as it is, whatever the provider's default.
        params = pb.GenerationParams(max_tokens=2048)
        out = await stream(
            broker,
            pb.StreamCompleteRequest(model="ant/claude-sonnet-4-5", messages=[user("hi")], params=params),
        )
        assert out.status == "OK" and ant.message_bodies[-1]["max_tokens"] == 2048


# --- 6. upstream error detail is kept ------------------------------------------------------------


async def test_openrouter_s_raw_upstream_error_reaches_the_caller(daemon, channel_to) -> None:
    async with RecordedUpstream("oa-openrouter-429") as router:
        broker = await broker_for(daemon, channel_to, openai_provider("openrouter", f"{router.url}/api/v1"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await broker.Complete(unary_of(ask("openrouter/google/gemini-2.0-flash-exp:free")), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "temporarily rate-limited upstream" in (info.value.details() or "")


# --- 7. thinking, reasoning and pings are progress for the timers --------------------------------


async def test_a_recorded_thinking_stream_paced_slower_than_the_ttft_limit_completes(
    daemon, channel_to
) -> None:
    # an-thinking: ~35 events of thinking (ping, thinking deltas, signature) before the first
    # text; at 0.05 s an event that is ~1.8 s, over the 0.5 s TTFT limit, never 0.5 s silent.
    async with RecordedUpstream("an-thinking", pace=0.05) as api:
        broker = await broker_for(
            daemon,
            channel_to,
            anthropic_provider("anthropic", api.url, ttft_timeout_seconds=0.5, stall_timeout_seconds=0.5),
        )
        out = await stream(broker, ask("anthropic/claude-sonnet-4-5"))
        assert out.status == "OK", out.status
        assert out.text == "- Captain\n- Scoop"
        assert out.messages[0].HasField("start")
        assert out.messages[-1].end.usage.output_tokens == 84


async def test_a_thinking_stream_from_the_fake_completes_unary_and_streamed(daemon, channel_to) -> None:
    async with FakeAnthropic(api_key=ANTHROPIC_KEY) as ant:
        ant.thinking_chunks = [f"thought {i}. " for i in range(12)]
        ant.thinking_delay = 0.1  # 1.2 s of thinking, a thought every 0.1 s
        broker = await broker_for(
            daemon,
            channel_to,
            anthropic_provider("ant", ant.url, ttft_timeout_seconds=0.4, stall_timeout_seconds=0.4),
        )
        out = await stream(broker, ask("ant/claude-sonnet-4-5"))
        assert (out.status, out.text) == ("OK", "Hello there!")
        alone = await unary(broker, unary_of(ask("ant/claude-sonnet-4-5")))
        assert (alone.status, alone.text) == ("OK", "Hello there!")


async def test_openai_compatible_reasoning_keeps_the_ttft_timer_alive(daemon, channel_to) -> None:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as vllm:
        vllm.reasoning_chunks = [f"step {i} " for i in range(10)]
        vllm.reasoning_field = "reasoning_content"
        vllm.reasoning_delay = 0.1
        broker = await broker_for(
            daemon,
            channel_to,
            openai_provider("vllm", vllm.url, ttft_timeout_seconds=0.4, stall_timeout_seconds=0.4),
        )
        out = await stream(broker, ask("vllm/gpt-4o-mini"))
        assert (out.status, out.text) == ("OK", "Hello there!")


async def test_reasoning_is_content_a_thinker_that_stalls_is_interrupted_unary_falls_back(
    daemon, channel_to
) -> None:
    async with FakeAnthropic(api_key=ANTHROPIC_KEY) as ant, FakeOpenAI(api_key=OPENAI_TEST_KEY) as oai:
        ant.thinking_chunks = ["hmm", " let me see"]
        broker = await broker_for(
            daemon,
            channel_to,
            anthropic_provider("ant", ant.url, ttft_timeout_seconds=0.3, stall_timeout_seconds=0.3),
            openai_provider("oai", oai.url),
        )
        # Thinks (streamed to the caller), then goes silent before its first text.
        ant.faults = [Fault("stall_mid_stream", after_chunks=0, seconds=5.0)] * 2
        out = await stream(broker, ask("ant/claude-sonnet-4-5", fallback_models=["oai/gpt-4o-mini"]))
        assert out.status == "UNAVAILABLE STREAM_INTERRUPTED", out
        assert out.metadata["cause"] == "UPSTREAM_TIMEOUT"
        assert [m.start.provider for m in out.messages if m.HasField("start")] == ["ant"]
        thought = "".join(m.reasoning_delta.text for m in out.messages if m.HasField("reasoning_delta"))
        assert thought == "hmm let me see" and not out.text, "no answer from another model spliced on"
        chats = [r for r in oai.requests if r.path.endswith("/chat/completions")]
        assert not chats, "no fallback after the caller saw this model's reasoning"
        # Unary: nothing reached the caller, so the fallback answers.
        ant.faults = [Fault("stall_mid_stream", after_chunks=0, seconds=5.0)] * 2
        req = ask("ant/claude-sonnet-4-5", fallback_models=["oai/gpt-4o-mini"])
        resp = await broker.Complete(unary_of(req), timeout=10)
        assert (resp.provider, resp.message.content[0].text) == ("oai", "Hello there!")


# --- 8. a clean end without usage: estimated, marked so -----------------------------------------


async def test_a_stream_without_usage_reports_an_estimate_marked_estimated(daemon, channel_to) -> None:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as llama:
        # llama-cpp-python's server: no usage chunk despite include_usage, no finish_reason.
        llama.send_usage = False
        llama.send_finish_reason = False
        llama.reply = Reply(
            text_chunks=["Hello", " there, how can I help?"], input_tokens=30, output_tokens=9
        )
        broker = await broker_for(daemon, channel_to, openai_provider("llama", llama.url))
        req = ask("llama/gpt-4o-mini", user("Say hello to the nice people reading this test."))
        out = await stream(broker, req)
        assert out.status == "OK"
        end = out.messages[-1].end
        assert end.finish_reason == pb.FINISH_REASON_STOP  # [DONE] after content: a complete answer
        assert end.usage.estimated is True
        assert end.usage.input_tokens == 12 and end.usage.output_tokens == 7  # ~4 characters a token
        resp = await broker.Complete(unary_of(req), timeout=10)
        assert resp.usage.estimated is True and resp.usage.output_tokens == 7
        assert resp.finish_reason == pb.FINISH_REASON_STOP
        # A server that reports usage: the counts, not estimated.
        llama.send_usage = llama.send_finish_reason = True
        resp = await broker.Complete(unary_of(req), timeout=10)
        assert (resp.usage.estimated, resp.usage.input_tokens, resp.usage.output_tokens) == (False, 30, 9)
