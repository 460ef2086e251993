"""AnthropicProvider and reasoning (issue 13), against FakeAnthropic over loopback.

Reasoning asked for (budget, effort on adaptive and budget-only models, off) and its rules on
max_tokens, sampling and forced tools; thinking, signatures and redacted blocks out of the
stream and out of whole messages; a two-turn tool loop that sends the signed block back as
the fake sent it; the fallback rule that withholds thinking; refusals and usage; the recorded
thinking streams through the parser. Each test states the neutral request, the events, and
the body the fake received. The rest of the 2026 contract: test_anthropic_2026_prompt.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker import errors
from broker.providers import anthropic_wire as wire
from broker.providers.anthropic import AnthropicProvider
from broker.providers.sse import SSEDecoder
from broker.types import (
    CompletionCall,
    CompletionEvent,
    EndEvent,
    FinishReason,
    Message,
    ReasoningDeltaEvent,
    ReasoningEffort,
    ReasoningPart,
    Refusal,
    Role,
    StartEvent,
    TextDeltaEvent,
    TextPart,
    ToolCall,
    ToolCallDeltaEvent,
    ToolChoice,
    ToolChoiceMode,
)
from tests import recordings
from tests.anthropic_support import (
    KEY,
    OPUS_46,
    OPUS_47,
    SONNET_45,
    THOUGHTS,
    WEATHER,
    ask,
    fake_anthropic,
    provider_for,
    reasoning,
    refused,
    run,
    user,
)
from tests.fakes.anthropic_upstream import FakeAnthropic, RedactedThinking, Thinking
from tests.fakes.script import Reply, ToolCallScript
from tests.httpclient import HTTP


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with fake_anthropic() as f:
        yield f


@pytest.fixture
async def provider(fake: FakeAnthropic) -> AsyncIterator[AnthropicProvider]:
    async with provider_for(fake) as p:
        yield p


# --- reasoning asked for -------------------------------------------------------------------


async def test_a_budget_is_enabled_thinking_with_max_tokens_above_it(fake, provider):
    out = await run(provider, ask(params=reasoning(budget_tokens=2048)))
    assert out.error is None
    assert fake.message_bodies[-1] == {
        "model": SONNET_45,
        "max_tokens": 2048 + 4096,  # the budget plus the usual default output limit
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "stream": True,
        "thinking": {"type": "enabled", "budget_tokens": 2048},
    }


@pytest.mark.parametrize(
    ("max_tokens", "default", "max_output", "sent"),
    [
        (5000, None, None, 5000),  # the caller's own limit, above the budget
        (None, 64000, 64000, 64000),  # budget + default, capped by the model's max output
        (None, 1000, None, 3048),  # a small configured default still leaves it room
        (None, 4096, 2100, 2100),  # capped, still above the budget
        (None, 4096, 1500, 2049),  # a max output below the budget: still always above it
    ],
)
async def test_max_tokens_with_a_budget(fake, provider, max_tokens, default, max_output, sent):
    request = ask(
        params=reasoning(budget_tokens=2048, max_tokens=max_tokens),
        default_max_tokens=default,
        max_output_tokens=max_output,
    )
    await run(provider, request)
    assert fake.message_bodies[-1]["max_tokens"] == sent


async def test_a_budget_below_the_api_minimum_is_refused(fake, provider):
    assert await refused(provider, fake, ask(params=reasoning(budget_tokens=1000))) == [
        "params.reasoning.budget_tokens"
    ]


async def test_a_max_tokens_not_above_the_budget_is_refused_naming_both(fake, provider):
    out = await run(provider, ask(params=reasoning(budget_tokens=4096, max_tokens=4096)))
    assert isinstance(out.error, errors.InvalidRequest)
    assert out.error.violations[0][0] == "params.max_tokens"
    assert "params.reasoning" in out.error.message and "4096" in out.error.message
    assert fake.message_bodies == []


@pytest.mark.parametrize(
    ("effort", "sent"),
    [
        (ReasoningEffort.MINIMAL, "low"),
        (ReasoningEffort.LOW, "low"),
        (ReasoningEffort.MEDIUM, "medium"),
        (ReasoningEffort.HIGH, "high"),
    ],
)
async def test_an_effort_on_an_adaptive_model_is_adaptive_thinking(fake, provider, effort, sent):
    out = await run(provider, ask(model=OPUS_46, params=reasoning(effort=effort)))
    assert out.error is None
    body = fake.message_bodies[-1]
    assert (body["thinking"], body["output_config"], body["max_tokens"]) == (
        {"type": "adaptive"},
        {"effort": sent},
        4096,  # no budget: the usual limit caps thinking and answer together
    )


@pytest.mark.parametrize(
    ("effort", "budget"),
    [
        (ReasoningEffort.MINIMAL, 1024),
        (ReasoningEffort.LOW, 2048),
        (ReasoningEffort.MEDIUM, 8192),
        (ReasoningEffort.HIGH, 16384),
    ],
)
async def test_an_effort_on_a_budget_only_model_is_a_budget_from_the_table(fake, provider, effort, budget):
    out = await run(provider, ask(params=reasoning(effort=effort)))
    assert out.error is None
    body = fake.message_bodies[-1]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert body["max_tokens"] == budget + 4096
    assert "output_config" not in body  # Sonnet 4.5 takes no effort field


async def test_an_effort_budget_shrinks_to_fit_the_callers_limit(fake, provider):
    await run(provider, ask(params=reasoning(effort=ReasoningEffort.HIGH, max_tokens=6000)))
    body = fake.message_bodies[-1]
    assert (body["thinking"], body["max_tokens"]) == ({"type": "enabled", "budget_tokens": 3000}, 6000)
    # A limit that leaves no room for the smallest budget is the caller's to fix.
    fake.requests.clear()
    fields = await refused(provider, fake, ask(params=reasoning(effort=ReasoningEffort.LOW, max_tokens=1024)))
    assert fields == ["params.max_tokens"]


async def test_disabled_sends_no_thinking(fake, provider):
    for model in (SONNET_45, OPUS_46):
        await run(provider, ask(model=model, params=reasoning(disabled=True)))
        body = fake.message_bodies[-1]
        assert "thinking" not in body and "output_config" not in body


async def test_a_budget_on_an_adaptive_only_model_is_refused(fake, provider):
    assert await refused(provider, fake, ask(model=OPUS_47, params=reasoning(budget_tokens=4096))) == [
        "params.reasoning.budget_tokens"
    ]
    # The fake answers that request as the API does, had it been sent.
    async with HTTP(fake.url) as client:
        body = {
            "model": OPUS_47,
            "max_tokens": 8192,
            "messages": [{"role": "user", "content": "Hi"}],
            "thinking": {"type": "enabled", "budget_tokens": 4096},
        }
        r = await client.post("/v1/messages", json=body, headers={"x-api-key": KEY, "anthropic-version": "x"})
        assert (
            r.status_code == 400
            and '"thinking.type.enabled" is not supported' in r.json()["error"]["message"]
        )


@pytest.mark.parametrize(
    ("params", "fields"),
    [
        (reasoning(budget_tokens=2048, temperature=0.7), ["params.temperature"]),
        (reasoning(budget_tokens=2048, top_p=0.9), ["params.top_p"]),
        (
            reasoning(effort=ReasoningEffort.LOW, temperature=0.2, top_p=0.5),
            ["params.temperature", "params.top_p"],
        ),
    ],
)
async def test_sampling_while_thinking_is_refused(fake, provider, params, fields):
    assert await refused(provider, fake, ask(params=params)) == fields


async def test_sampling_the_api_allows_while_thinking_is_sent(fake, provider):
    out = await run(provider, ask(params=reasoning(budget_tokens=2048, temperature=1.0, top_p=0.97)))
    assert out.error is None
    assert (fake.message_bodies[-1]["temperature"], fake.message_bodies[-1]["top_p"]) == (1.0, 0.97)


@pytest.mark.parametrize("mode", [ToolChoiceMode.REQUIRED, ToolChoiceMode.TOOL])
async def test_a_forced_tool_with_a_budget_is_refused_but_adaptive_allows_it(fake, provider, mode):
    choice = ToolChoice(mode, "get_weather" if mode is ToolChoiceMode.TOOL else "")
    request = ask(tools=[WEATHER], tool_choice=choice, params=reasoning(budget_tokens=2048))
    assert await refused(provider, fake, request) == ["tool_choice"]
    request = ask(
        model=OPUS_46, tools=[WEATHER], tool_choice=choice, params=reasoning(effort=ReasoningEffort.HIGH)
    )
    assert (await run(provider, request)).error is None
    assert fake.message_bodies[-1]["thinking"] == {"type": "adaptive"}


# --- reasoning out of the answer -----------------------------------------------------------


async def test_thinking_streams_as_reasoning_deltas_apart_from_the_text(fake, provider):
    fake.reasoning = [Thinking(THOUGHTS)]
    fake.thinking_tokens = 41
    fake.reply = Reply(text_chunks=["Sunny", "."], output_tokens=60)
    out = await run(provider, ask(params=reasoning(budget_tokens=2048)))
    signature = fake.answers[-1][0]["signature"]
    assert out.events[0] == StartEvent(model=SONNET_45)
    assert out.reasoning == [
        ReasoningDeltaEvent(0, text="The user wants"),
        ReasoningDeltaEvent(0, text=" the weather in "),
        ReasoningDeltaEvent(0, text="Zürich"),
        # the empty thinking_delta is progress, not a delta
        ReasoningDeltaEvent(0, text=".\n\nI'll call get_weather 🌦"),
        ReasoningDeltaEvent(0, signature=signature),
    ]
    assert out.text == "Sunny."  # the thoughts never reach the text
    last_reasoning = max(i for i, e in enumerate(out.events) if isinstance(e, ReasoningDeltaEvent))
    first_text = next(i for i, e in enumerate(out.events) if isinstance(e, TextDeltaEvent))
    assert last_reasoning < first_text
    assert (out.end.finish_reason, out.end.usage.output_tokens, out.end.usage.reasoning_tokens) == (
        FinishReason.STOP,
        60,
        41,
    )


async def test_redacted_and_plain_thinking_are_numbered_in_order(fake, provider):
    fake.reasoning = [RedactedThinking(), Thinking(["hmm"]), RedactedThinking()]
    out = await run(provider, ask(params=reasoning(budget_tokens=2048)))
    blocks = fake.answers[-1]
    assert out.reasoning == [
        ReasoningDeltaEvent(0, redacted_data=blocks[0]["data"]),
        ReasoningDeltaEvent(1, text="hmm"),
        ReasoningDeltaEvent(1, signature=blocks[1]["signature"]),
        ReasoningDeltaEvent(2, redacted_data=blocks[2]["data"]),
    ]
    assert out.text == "Hello there!"


async def test_adaptive_text_before_thinking_keeps_its_place(fake, provider):
    # an-adaptive-thinking: index 0 is text "\n\n", 1 thinking, 2 the answer.
    fake.leading_text_chunks = ["\n\n"]
    fake.reasoning = [Thinking(["Brief", " answer"], signature_key_in_start=False)]
    out = await run(provider, ask(model=OPUS_46, params=reasoning(effort=ReasoningEffort.LOW)))
    kinds = [type(e).__name__ for e in out.events if isinstance(e, TextDeltaEvent | ReasoningDeltaEvent)]
    assert kinds[0] == "TextDeltaEvent" and kinds[1] == "ReasoningDeltaEvent"
    assert out.text == "\n\nHello there!"
    assert [p.text for p in out.reasoning_parts()] == ["Brief answer"]


async def test_a_whole_message_maps_like_its_stream(fake, provider):
    fake.reasoning = [Thinking(THOUGHTS), RedactedThinking()]
    fake.thinking_tokens = 30
    fake.cache_creation_input_tokens, fake.cache_creation_1h_input_tokens = 50, 20
    fake.reply = Reply(
        text_chunks=["Let me check."],
        tool_calls=[ToolCallScript("toolu_1", "get_weather", ['{"city": "Zürich"}'])],
        finish="tool_calls",
        input_tokens=200,
        output_tokens=70,
    )
    streamed = await run(provider, ask(tools=[WEATHER], params=reasoning(budget_tokens=2048)))
    body = {**fake.message_bodies[-1], "stream": False}
    async with HTTP(fake.url) as client:
        r = await client.post("/v1/messages", json=body, headers={"x-api-key": KEY, "anthropic-version": "x"})
    doc = r.json()
    whole = wire.message_events(doc, provider="anthropic", model=SONNET_45)
    blocks = doc["content"]
    assert [b["type"] for b in blocks] == ["thinking", "redacted_thinking", "text", "tool_use"]
    assert whole == [
        ReasoningDeltaEvent(0, text="".join(THOUGHTS), signature=blocks[0]["signature"]),
        ReasoningDeltaEvent(1, redacted_data=blocks[1]["data"]),
        TextDeltaEvent("Let me check."),
        ToolCallDeltaEvent(0, id="toolu_1", name="get_weather"),
        ToolCallDeltaEvent(0, arguments_delta='{"city": "Zürich"}'),
        streamed.end,
    ]
    assert (streamed.end.usage.cache_write_input_tokens, streamed.end.usage.cache_write_1h_input_tokens) == (
        50,
        20,
    )
    assert streamed.end.usage.reasoning_tokens == 30
    # The same blocks, streamed, give the same reasoning once accumulated (signed afresh).
    assert [p.text for p in streamed.reasoning_parts()] == ["".join(THOUGHTS), ""]


# --- sending reasoning back ----------------------------------------------------------------


async def test_a_tool_loop_with_thinking_sends_the_signed_block_back_unmodified(fake, provider):
    fake.reasoning = [Thinking(THOUGHTS)]
    fake.reply = Reply(
        text_chunks=[],
        tool_calls=[ToolCallScript("toolu_01RX68", "get_weather", ['{"city":', ' "Zürich"}'])],
        finish="tool_calls",
    )
    question = user("Weather in Zürich?")
    first = await run(provider, ask(question, tools=[WEATHER], params=reasoning(budget_tokens=2048)))
    assert first.end.finish_reason == FinishReason.TOOL_CALLS
    sent_block = fake.answers[-1][0]  # the thinking block as the fake streamed it in turn 1

    # Turn 2: the caller sends back what it got (reasoning parts, then the call) and the result.
    fake.reasoning, fake.reply = [], Reply(text_chunks=["4°C, rain."])
    history = [
        question,
        Message(Role.ASSISTANT, list(first.reasoning_parts()), tool_calls=first.tool_calls()),
        Message(Role.TOOL, [TextPart("4C rain")], tool_call_id="toolu_01RX68"),
    ]
    second = await run(provider, ask(*history, tools=[WEATHER], params=reasoning(budget_tokens=2048)))
    assert second.error is None and second.text == "4°C, rain."  # the fake verified the signature
    body = fake.message_bodies[-1]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [
            sent_block,  # {"type": "thinking", "thinking": ..., "signature": ...} exactly as sent
            {"type": "tool_use", "id": "toolu_01RX68", "name": "get_weather", "input": {"city": "Zürich"}},
        ],
    }
    # On the wire: the block's text and signature byte for byte (compact JSON, UTF-8 unescaped).
    exact = json.dumps(sent_block, ensure_ascii=False, separators=(",", ":")).encode()
    assert exact in fake.message_raw_bodies[-1]
    assert "cache_control" not in json.dumps(body["messages"][1])

    # An edited thought is caught by the fake, as the API would: the test has teeth.
    edited = ReasoningPart(sent_block["thinking"] + " ", sent_block["signature"], provider_type="anthropic")
    history[1] = Message(Role.ASSISTANT, [edited], tool_calls=first.tool_calls())
    bad = await run(provider, ask(*history, tools=[WEATHER], params=reasoning(budget_tokens=2048)))
    assert isinstance(bad.error, errors.UpstreamRejectedRequest)
    assert "cannot be modified" in bad.error.message


async def test_a_redacted_block_goes_back_as_it_came(fake, provider):
    fake.reasoning = [RedactedThinking(), Thinking(["ok"])]
    fake.reply = Reply(
        text_chunks=[],
        tool_calls=[ToolCallScript("toolu_r", "get_weather", ['{"city":"Oslo"}'])],
        finish="tool_calls",
    )
    first = await run(provider, ask(tools=[WEATHER], params=reasoning(effort=ReasoningEffort.LOW)))
    sent = fake.answers[-1]
    fake.reasoning, fake.reply = [], Reply()
    history = [
        user("Hi"),
        Message(Role.ASSISTANT, list(first.reasoning_parts()), tool_calls=first.tool_calls()),
        Message(Role.TOOL, [TextPart("cold")], tool_call_id="toolu_r"),
    ]
    second = await run(provider, ask(*history, tools=[WEATHER], params=reasoning(effort=ReasoningEffort.LOW)))
    assert second.error is None
    assert fake.message_bodies[-1]["messages"][1]["content"] == [
        {"type": "redacted_thinking", "data": sent[0]["data"]},
        {"type": "thinking", "thinking": "ok", "signature": sent[1]["signature"]},
        {"type": "tool_use", "id": "toolu_r", "name": "get_weather", "input": {"city": "Oslo"}},
    ]


async def test_history_keeps_the_order_of_text_and_thinking_before_tool_use(fake, provider):
    signature = fake.signatures.sign("plan")
    history = [
        user("Hi"),
        Message(
            Role.ASSISTANT,
            [
                TextPart("\n\n"),
                ReasoningPart("plan", signature, provider_type="anthropic"),
                TextPart("Checking."),
            ],
            tool_calls=[ToolCall("toolu_1", "get_weather", '{"city": "Paris"}')],
        ),
        Message(Role.TOOL, [TextPart("18C")], tool_call_id="toolu_1"),
    ]
    assert (await run(provider, ask(*history, model=OPUS_46, tools=[WEATHER]))).error is None
    assert [b["type"] for b in fake.message_bodies[-1]["messages"][1]["content"]] == [
        "text",
        "thinking",
        "text",
        "tool_use",
    ]


async def test_a_tool_turn_without_a_signed_block_withholds_thinking(fake, provider):
    # A history from another vendor (after a fallback): the tool turn has no thinking.
    history = [
        user("Weather in Paris?"),
        Message(Role.ASSISTANT, tool_calls=[ToolCall("call_9", "get_weather", '{"city": "Paris"}')]),
        Message(Role.TOOL, [TextPart("18C")], tool_call_id="call_9"),
    ]
    out = await run(
        provider, ask(*history, tools=[WEATHER], params=reasoning(budget_tokens=2048, temperature=0.5))
    )
    assert out.error is None  # no thinking, so neither the 400 nor the temperature rule applies
    body = fake.message_bodies[-1]
    assert "thinking" not in body and body["max_tokens"] == 4096 and body["temperature"] == 0.5
    # What the API says to the same body with thinking on (the fake enforces it too).
    async with HTTP(fake.url) as client:
        with_thinking = {**body, "thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 8192}
        del with_thinking["temperature"]
        r = await client.post(
            "/v1/messages", json=with_thinking, headers={"x-api-key": KEY, "anthropic-version": "x"}
        )
    assert r.status_code == 400 and "must start with a thinking block" in r.json()["error"]["message"]


async def test_foreign_reasoning_never_reaches_the_wire_and_thinking_is_withheld(fake, provider):
    # What the completion service builds for an Anthropic target from a history whose tool
    # turn came from OpenAI: CompletionCall.upstream drops the foreign reasoning part.
    foreign = ReasoningPart("o-series thoughts", "sig-from-openai", provider_type="openai")
    call = CompletionCall(
        model="anthropic/claude-sonnet-4-5",
        messages=[
            user("Weather in Paris?"),
            Message(
                Role.ASSISTANT, [foreign], tool_calls=[ToolCall("call_9", "get_weather", '{"city": "Paris"}')]
            ),
            Message(Role.TOOL, [TextPart("18C")], tool_call_id="call_9"),
        ],
        tools=[WEATHER],
        params=reasoning(effort=ReasoningEffort.HIGH),
    )
    request = call.upstream(
        SONNET_45,
        provider_type="anthropic",
        default_max_tokens=None,
        max_output_tokens=None,
        reasoning_model=None,
        timeout=None,
    )
    assert request.messages[1].content == []
    out = await run(provider, request)
    assert out.error is None
    body = fake.message_bodies[-1]
    assert "thinking" not in body
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {"city": "Paris"}}
    ]
    assert (
        b"sig-from-openai" not in fake.message_raw_bodies[-1]
        and b"o-series" not in fake.message_raw_bodies[-1]
    )


# --- refusal and usage ---------------------------------------------------------------------

REFUSAL_DETAILS = {
    "type": "refusal",
    "category": "reasoning_extraction",
    "explanation": "This request was blocked as it seems to violate Anthropic's Terms of Service.",
}


async def test_a_refusal_ends_with_its_reason_and_explanation(fake, provider):
    # an-refusal: no content, stop_reason refusal, stop_details in message_delta.
    fake.reply = Reply(text_chunks=[], finish="refusal", input_tokens=97, output_tokens=0)
    fake.stop_details = REFUSAL_DETAILS
    fake.thinking_tokens = 0
    out = await run(provider, ask(model=OPUS_46, params=reasoning(effort=ReasoningEffort.HIGH)))
    assert out.end.finish_reason is FinishReason.REFUSAL
    assert out.end.refusal == Refusal(REFUSAL_DETAILS["explanation"], "reasoning_extraction")
    assert (out.end.usage.input_tokens, out.end.usage.output_tokens) == (97, 0)
    # A refusal without details still says so.
    fake.stop_details = None
    out = await run(provider, ask())
    assert (out.end.finish_reason, out.end.refusal) == (FinishReason.REFUSAL, Refusal())


async def test_usage_carries_reasoning_tokens_and_one_hour_cache_writes(fake, provider):
    fake.reply = Reply(input_tokens=1000, cached_input_tokens=600, output_tokens=300)
    fake.cache_creation_input_tokens, fake.cache_creation_1h_input_tokens = 300, 200
    fake.thinking_tokens = 250
    usage = (await run(provider, ask())).end.usage
    assert (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_input_tokens) == (1000, 600, 300)
    assert (usage.cache_write_1h_input_tokens, usage.output_tokens, usage.reasoning_tokens) == (200, 300, 250)


# --- the recordings through the parser -----------------------------------------------------


def recorded(name: str) -> tuple[list[CompletionEvent], list[dict[str, Any]]]:
    """The parser's events for a recorded stream, and the recorded data payloads (read with
    the stdlib, independently of the parser) to compare them with."""
    parser = wire.StreamParser(provider="anthropic", model="m")
    events: list[CompletionEvent] = []
    for event, data in SSEDecoder().feed(recordings.body(name).encode()):
        events += parser.feed(event, data.decode())
    payloads = [json.loads(data) for _, data in recordings.sse_events(recordings.body(name))]
    return events, payloads


def reasoning_of(events: list[CompletionEvent]) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for e in events:
        if isinstance(e, ReasoningDeltaEvent):
            b = out.setdefault(e.index, {"text": "", "signature": "", "redacted_data": ""})
            b["text"] += e.text
            b["signature"] += e.signature
            b["redacted_data"] += e.redacted_data
    return out


def deltas(payloads: list[dict[str, Any]], kind: str, key: str) -> str:
    return "".join(
        p["delta"][key]
        for p in payloads
        if p.get("type") == "content_block_delta" and p["delta"]["type"] == kind
    )


@pytest.mark.parametrize("name", ["an-thinking", "an-adaptive-thinking", "an-thinking-tool-cache"])
def test_recorded_thinking_is_one_reasoning_block_with_its_signature(name):
    events, payloads = recorded(name)
    assert reasoning_of(events) == {
        0: {
            "text": deltas(payloads, "thinking_delta", "thinking"),
            "signature": deltas(payloads, "signature_delta", "signature"),
            "redacted_data": "",
        }
    }
    assert "".join(e.text for e in events if isinstance(e, TextDeltaEvent)) == deltas(
        payloads, "text_delta", "text"
    )


def test_recorded_redacted_thinking_is_two_opaque_blocks():
    events, payloads = recorded("an-redacted-thinking")
    data = [
        p["content_block"]["data"]
        for p in payloads
        if p.get("content_block", {}).get("type") == "redacted_thinking"
    ]
    assert reasoning_of(events) == {
        0: {"text": "", "signature": "", "redacted_data": data[0]},
        1: {"text": "", "signature": "", "redacted_data": data[1]},
    }


def test_recorded_refusal_carries_its_explanation():
    events, payloads = recorded("an-refusal")
    details = next(p["delta"]["stop_details"] for p in payloads if p.get("type") == "message_delta")
    end = events[-1]
    assert isinstance(end, EndEvent)
    assert (end.finish_reason, end.refusal) == (
        FinishReason.REFUSAL,
        Refusal(details["explanation"], "reasoning_extraction"),
    )
    assert (end.usage.input_tokens, end.usage.output_tokens, end.usage.reasoning_tokens) == (97, 0, 0)
