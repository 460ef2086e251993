"""The wire mappings against the vendors' recorded bytes (../shared/recordings, read at run
time): each test is a defect the recordings or a real model server showed (issue 10, item 4).

Daemon-level versions of the same cases are in tests/reliability/test_recorded_upstreams.py.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from broker import convert, errors
from broker.catalog import Catalog
from broker.config import ProviderConfig
from broker.providers import anthropic_wire, ollama_wire, openai_wire
from broker.providers.sse import SSEDecoder
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    DiscoveredModel,
    EndEvent,
    FinishReason,
    GenerationParams,
    Message,
    ProgressEvent,
    ReasoningDeltaEvent,
    Refusal,
    Role,
    TextDeltaEvent,
    TextPart,
    ToolCallDeltaEvent,
    Usage,
)
from modelbroker.v1 import broker_pb2 as pb
from tests.recordings import body, recording, sse_events


def openai_events(name: str) -> tuple[list[CompletionEvent], dict[str, Any] | None]:
    """Feed a recorded OpenAI-compatible stream to ChunkParser as the provider does; the
    in-stream error payload (if the stream ends in one) comes back instead of being raised."""
    parser = openai_wire.ChunkParser(provider="p", model="m")
    events: list[CompletionEvent] = []
    for event, data in sse_events(body(name)):
        if data == "[DONE]":
            events.append(parser.end())
            break
        payload = json.loads(data)
        if event == "error" or payload.get("error") is not None:
            return events, payload.get("error", payload)
        events += parser.feed(payload)
    return events, None


def text_of(events: list[CompletionEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDeltaEvent))


# --- 1. an in-stream invalid request is the caller's error -------------------------------------


def test_groq_tool_use_failed_mid_stream_is_invalid_argument_and_not_retryable() -> None:
    events, err = openai_events("oa-groq-midstream-error")
    assert err is not None and err["code"] == "tool_use_failed" and err["status_code"] == 400
    assert text_of(events) == ""  # only reasoning came before the error
    exc = openai_wire.error_from_payload(err, provider="groq", model="openai/gpt-oss-120b")
    assert isinstance(exc, errors.UpstreamRejectedRequest)
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT and not exc.retryable
    assert exc.upstream_status == 400
    assert "Tool call validation failed" in exc.message
    # The same without status_code: the type word (invalid_request_error) decides, not the code.
    del err["status_code"]
    exc = openai_wire.error_from_payload(err, provider="groq", model="m")
    assert isinstance(exc, errors.UpstreamRejectedRequest) and exc.upstream_status == 400


def test_openrouter_in_stream_error_with_an_integer_code_keeps_its_message() -> None:
    events, err = openai_events("oa-openrouter-stream-error")
    assert err == {"code": 400, "message": "Token limit reached"}
    exc = openai_wire.error_from_payload(err, provider="openrouter", model="minimax/minimax-m2:free")
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT and not exc.retryable
    assert "Token limit reached" in exc.message
    assert text_of(events) == ""  # only reasoning came before the error


def test_a_server_error_mid_stream_stays_transient() -> None:
    _, err = openai_events("oa-midstream-server-error")
    exc = openai_wire.error_from_payload(err, provider="openai", model="gpt-4.1")
    assert isinstance(exc, errors.UpstreamUnavailable) and exc.retryable


def test_anthropic_error_events_are_classified_by_their_type() -> None:
    parser = anthropic_wire.StreamParser(provider="anthropic", model="claude-sonnet-4-20250514")
    with pytest.raises(errors.UpstreamUnavailable):  # api_error "Overloaded": transient
        for name, raw in SSEDecoder().feed(body("an-midstream-error").encode()):
            parser.feed(name, raw.decode())
    _, data = sse_events(body("an-midstream-error"))[-1]
    payload = json.loads(data)
    payload["error"] = {"type": "invalid_request_error", "message": "tools.0: bad schema"}
    exc = anthropic_wire.stream_error(payload, provider="anthropic", model="m")
    assert isinstance(exc, errors.UpstreamRejectedRequest) and not exc.retryable


def test_ollama_error_line_that_states_its_status() -> None:
    parser = ollama_wire.ChatStreamParser(provider="ollama", model="m")
    with pytest.raises(errors.UpstreamRejectedRequest):
        parser.feed(json.dumps({"error": "invalid tool call arguments", "status_code": 400}))
    # The recorded shape (no status): Ollama's wording decides, a model failure is transient.
    lines = body("ol-midstream-error").splitlines()
    parser = ollama_wire.ChatStreamParser(provider="ollama", model="gemma3:1b")
    with pytest.raises(errors.UpstreamUnavailable):
        for line in lines:
            parser.feed(line)


# --- 2. max_completion_tokens vs max_tokens by the model, not the host ----------------------------


def _limited(model: str, reasoning: bool | None) -> CompletionRequest:
    return CompletionRequest(
        model=model,
        messages=[Message(Role.USER, [TextPart("Hi")])],
        params=GenerationParams(max_tokens=100),
        reasoning_model=reasoning,
    )


@pytest.mark.parametrize(
    ("model", "reasoning", "field"),
    [
        ("gpt-5", True, "max_completion_tokens"),  # the catalogue's flag, wherever it is served
        ("gpt-5-nano", True, "max_completion_tokens"),
        ("o1-mini", True, "max_completion_tokens"),
        ("gpt-4o-mini", False, "max_tokens"),
        # Not in the catalogue: the id's family decides.
        ("openai/gpt-5", None, "max_completion_tokens"),  # a gateway's id
        ("gpt-5-2099-01-01", None, "max_completion_tokens"),
        ("o3-pro", None, "max_completion_tokens"),
        ("o4-mini-deep-research", None, "max_completion_tokens"),
        ("openai/gpt-oss-120b", None, "max_tokens"),
        ("llama3.2", None, "max_tokens"),
        ("orca-mini", None, "max_tokens"),
        ("gpt-4.1", None, "max_tokens"),
    ],
)
def test_the_output_limit_field_follows_the_model(model: str, reasoning: bool | None, field: str) -> None:
    sent = openai_wire.build_body(_limited(model, reasoning))
    assert sent[field] == 100
    assert ({"max_tokens", "max_completion_tokens"} - {field}).isdisjoint(sent)


def test_the_provider_setting_overrides_the_model_rule() -> None:
    # An Azure deployment called "prod-chat" that is gpt-5 underneath: nothing in the id says so.
    assert openai_wire.build_body(_limited("prod-chat", None))["max_tokens"] == 100
    forced = openai_wire.build_body(_limited("prod-chat", None), max_tokens_field="max_completion_tokens")
    assert forced["max_completion_tokens"] == 100 and "max_tokens" not in forced
    # A server that knows only max_tokens, serving a model with an o-series name.
    plain = openai_wire.build_body(_limited("o3-mini", True), max_tokens_field="max_tokens")
    assert plain["max_tokens"] == 100
    assert ProviderConfig(name="az", type="openai").max_tokens_field == "auto"
    with pytest.raises(ValueError):
        ProviderConfig(name="az", type="openai", max_tokens_field="max_output_tokens")  # type: ignore[arg-type]


def test_the_catalogue_flags_reasoning_models_for_any_openai_endpoint() -> None:
    catalog = Catalog.load()
    # An Azure or gateway endpoint is not the vendor's: no prices, but the model's facts.
    spec = catalog.spec_for("azure", "openai", "gpt-5", vendor_endpoint=False)
    assert spec.reasoning is True and spec.pricing is None
    assert catalog.spec_for("oai", "openai", "gpt-4o").reasoning is False
    assert catalog.spec_for("oai", "openai", "o1-mini").reasoning is True  # the source lacks the flag
    assert catalog.spec_for("vllm", "openai", "my-finetune").reasoning is None


def test_the_recorded_gpt5_answer_parses() -> None:
    events, err = openai_events("oa-gpt5-stream")
    assert err is None and text_of(events) == "Paris."
    assert events[-1] == EndEvent(FinishReason.STOP, Usage(13, 11, 0), usage_reported=True)


# --- 3. an empty assistant turn is passed on ---------------------------------------------------


def _history_with_an_empty_assistant_turn() -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="m",
        messages=[
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="Say nothing.")]),
            pb.Message(role=pb.ROLE_ASSISTANT),
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="Now say hi.")]),
        ],
    )


def test_an_empty_assistant_turn_is_accepted_and_passed_on() -> None:
    call = convert.completion_from_proto(_history_with_an_empty_assistant_turn(), max_message_bytes=1 << 20)
    request = CompletionRequest(model="m", messages=call.messages)
    assert openai_wire.build_body(request)["messages"][1] == {"role": "assistant", "content": ""}
    assert ollama_wire.build_body(request)["messages"][1] == {"role": "assistant", "content": ""}
    # Anthropic rejects empty content: the turn is left out and the user turns around it merge.
    assert anthropic_wire.build_body(request)["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Say nothing."}, {"type": "text", "text": "Now say hi."}],
        }
    ]


def test_an_empty_user_turn_is_still_refused() -> None:
    req = _history_with_an_empty_assistant_turn()
    req.messages[0].ClearField("content")
    with pytest.raises(errors.InvalidRequest) as info:
        convert.completion_from_proto(req, max_message_bytes=1 << 20)
    assert info.value.violations == [("messages[0].content", "must not be empty")]


# --- 4. an OpenAI refusal is not answer text ---------------------------------------------------


def test_a_refusal_is_not_relayed_as_text_and_ends_as_refusal() -> None:
    # No recording carries a non-null refusal; this is the recorded gpt-5 stream's first chunk
    # with its `"refusal": null` filled in, as the API streams a refusal.
    chunks = [json.loads(d) for _, d in sse_events(body("oa-gpt5-stream")) if d != "[DONE]"]
    first = chunks[0]
    parser = openai_wire.ChunkParser(provider="openai", model="gpt-5")
    events = parser.feed(first)  # refusal: null is nothing
    for piece in ("I'm sorry, ", "I can't help with that."):
        chunk = json.loads(json.dumps(first))
        chunk["choices"][0]["delta"] = {"refusal": piece}
        events += parser.feed(chunk)
    events += parser.feed(chunks[3])  # finish_reason "stop"
    events += parser.feed(chunks[4])  # usage
    end = parser.end()
    assert not [e for e in events if isinstance(e, TextDeltaEvent)]
    assert all(isinstance(e, ProgressEvent) for e in events)  # timers only, never forwarded
    assert end.finish_reason == FinishReason.REFUSAL and end.usage_reported
    assert end.refusal == Refusal(explanation="I'm sorry, I can't help with that.")


# --- 5. Anthropic: the listing's max_tokens, and the default limit -------------------------------


def test_the_anthropic_listing_s_max_tokens_is_the_model_s_max_output() -> None:
    listing = recording("an-models-docs")["listing"]["/v1/models"]
    models, after = anthropic_wire.models_page(listing, provider="anthropic")
    assert after is None
    assert models == [
        DiscoveredModel(
            name="claude-opus-4-6",
            capabilities=models[0].capabilities,
            context_window=1_000_000,
            max_output_tokens=128_000,
        )
    ]
    spec = Catalog.load().spec_for("anthropic", "anthropic", "claude-opus-4-6", models[0])
    assert (spec.max_output_tokens, spec.context_window, spec.source) == (128_000, 1_000_000, "discovered")
    # A discovered maximum beats the catalogue's, as the discovered context window does.
    known = DiscoveredModel(name="claude-sonnet-4-5", max_output_tokens=32_000)
    assert (
        Catalog.load().spec_for("anthropic", "anthropic", "claude-sonnet-4-5", known).max_output_tokens
        == 32_000
    )


@pytest.mark.parametrize(
    ("caller", "configured", "model_max", "sent"),
    [
        (None, None, 64_000, 4096),  # not the model's maximum: the documented default
        (None, None, 1024, 1024),  # the default capped by the model's max output
        (None, None, None, 4096),
        (None, 2000, 64_000, 2000),  # the provider's default_max_tokens
        (None, 100_000, 64_000, 64_000),
        (50_000, 2000, 64_000, 50_000),  # the caller's own limit is never replaced
    ],
)
def test_anthropic_max_tokens_default(
    caller: int | None, configured: int | None, model_max: int | None, sent: int
) -> None:
    request = CompletionRequest(
        model="claude-sonnet-4-5",
        messages=[Message(Role.USER, [TextPart("Hi")])],
        params=GenerationParams(max_tokens=caller),
        default_max_tokens=configured,
        max_output_tokens=model_max,
    )
    assert anthropic_wire.build_body(request)["max_tokens"] == sent


def test_a_configured_default_also_limits_openai_and_ollama() -> None:
    request = CompletionRequest(
        model="llama3.2", messages=[Message(Role.USER, [TextPart("Hi")])], default_max_tokens=300
    )
    assert openai_wire.build_body(request)["max_tokens"] == 300
    assert ollama_wire.build_body(request)["options"] == {"num_predict": 300}
    request.default_max_tokens = None  # unset: no limit at all (the server's own default)
    assert "max_tokens" not in openai_wire.build_body(request)
    assert "options" not in ollama_wire.build_body(request)


# --- 6. upstream error detail is kept ------------------------------------------------------------


def test_openrouter_s_raw_upstream_error_is_in_the_message() -> None:
    rec = recording("oa-openrouter-429")["response"]
    info = openai_wire.parse_error(rec["status"], rec["body"].encode())
    assert info.message.startswith("Provider returned error: Google said: ")
    assert "google/gemini-2.0-flash-exp:free is temporarily rate-limited upstream" in info.message


def test_the_raw_detail_is_bounded() -> None:
    doc = {"error": {"code": 502, "message": "Provider returned error", "metadata": {"raw": "x" * 5000}}}
    info = openai_wire.parse_error(502, json.dumps(doc).encode())
    assert len(info.message) < 600 and info.message.endswith("...")
    # A raw that is itself a JSON document (the provider's own error body).
    doc["error"]["metadata"] = {"raw": {"error": {"message": "quota"}}, "provider_name": "X"}
    assert openai_wire.parse_error(502, json.dumps(doc).encode()).message.endswith(
        'X said: {"error": {"message": "quota"}}'
    )


# --- 7. thinking, reasoning and pings are progress ----------------------------------------------


def test_anthropic_thinking_is_reasoning_apart_from_the_text_and_pings_are_progress() -> None:
    parser = anthropic_wire.StreamParser(provider="anthropic", model="claude-sonnet-4-5")
    events: list[CompletionEvent] = []
    for name, data in SSEDecoder().feed(body("an-thinking").encode()):
        events += parser.feed(name, data.decode())
    assert text_of(events) == "- Captain\n- Scoop"  # the answer only, never the thoughts
    thinking = [e for e in events if isinstance(e, ReasoningDeltaEvent)]
    assert {e.index for e in thinking} == {0}
    assert "".join(e.text for e in thinking).startswith("The user wants two names for a pet pelican")
    signatures = [e.signature for e in thinking if e.signature]
    assert len(signatures) == 1 and len(signatures[0]) == 512 and thinking[-1].signature  # last, before stop
    # Pings stay progress: they re-arm the timers and reach no caller.
    assert any(isinstance(e, ProgressEvent) for e in events)
    # All thinking comes before the first text, as the recording streams it.
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDeltaEvent))
    assert all(not isinstance(e, ReasoningDeltaEvent) for e in events[first_text:])
    assert events[-1] == EndEvent(FinishReason.STOP, Usage(46, 84), usage_reported=True)


@pytest.mark.parametrize(
    ("name", "answer", "reasoning", "usage"),
    [
        (
            "oa-groq-reasoning",
            "The tool returned the expected result for the valid call.",
            "The user wants to test error handling by calling tool with non-existent parameters first "
            "(we did) and then second try with valid args. We have succeeded. Now respond concisely.",
            Usage(339, 58, reasoning_tokens=38),
        ),
        (
            "oa-openrouter-reasoning",
            "2 + 2 = 4",
            "This is a simple arithmetic question. 2+2 equals 4.",
            Usage(43, 36, reasoning_tokens=13),
        ),
    ],
)
def test_openai_compatible_reasoning_is_a_reasoning_delta_not_text(
    name: str, answer: str, reasoning: str, usage: Usage
) -> None:
    events, err = openai_events(name)
    assert err is None
    assert text_of(events) == answer  # the reasoning is not in it
    thoughts = [e for e in events if isinstance(e, ReasoningDeltaEvent)]
    assert "".join(e.text for e in thoughts) == reasoning and {e.index for e in thoughts} == {0}
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDeltaEvent))
    assert first_text >= 3 and all(isinstance(e, ReasoningDeltaEvent) for e in events[:first_text])
    assert events[-1] == EndEvent(FinishReason.STOP, usage)


def test_reasoning_content_is_a_reasoning_delta_too() -> None:
    parser = openai_wire.ChunkParser(provider="vllm", model="deepseek-r1")
    events = parser.feed({"choices": [{"index": 0, "delta": {"reasoning_content": "Let me think"}}]})
    assert events == [ReasoningDeltaEvent(0, text="Let me think")]


def test_ollama_thinking_is_a_reasoning_delta_not_text() -> None:
    parser = ollama_wire.ChatStreamParser(provider="ollama", model="qwen3:1.7b")
    events = parser.feed(body("ol-thinking-toolcall").strip())
    assert isinstance(events[0], ReasoningDeltaEvent) and events[0].index == 0
    assert events[0].text.startswith("Okay, the user is asking about the weather in New York.")
    assert len(events[0].text) > 500
    assert isinstance(events[1], ToolCallDeltaEvent) and json.loads(events[1].arguments_delta) == {
        "location": "New York"
    }
    assert events[-1] == EndEvent(FinishReason.TOOL_CALLS, Usage(150, 181), usage_reported=True)


# --- 8. a clean end without usage or finish reason ---------------------------------------------


def test_a_clean_end_without_usage_or_finish_reason() -> None:
    # llama-cpp-python's server (a real one, serving Gemma 3 270M): content chunks, no
    # finish_reason, no usage chunk despite include_usage, then [DONE].
    parser = openai_wire.ChunkParser(provider="llama", model="gemma-3-270m")
    for text in ("Hello", " there"):
        parser.feed({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
    end = parser.end()
    assert end == EndEvent(FinishReason.STOP, Usage(), usage_reported=False)
    # Nothing at all before [DONE]: nothing to call an answer.
    assert openai_wire.ChunkParser(provider="p", model="m").end().finish_reason == FinishReason.OTHER


def test_ollama_done_line_without_counts_is_not_reported_usage() -> None:
    parser = ollama_wire.ChatStreamParser(provider="ollama", model="m")
    events = parser.feed('{"message":{"role":"assistant","content":"hi"},"done":true,"done_reason":"stop"}')
    assert events[-1] == EndEvent(FinishReason.STOP, Usage(), usage_reported=False)


def test_estimated_usage_reaches_the_proto() -> None:
    assert convert.usage_to_proto(Usage(3, 4, estimated=True)).estimated is True
    assert convert.usage_to_proto(Usage(3, 4)).estimated is False


# --- and one more the replay showed: a tool call without arguments -------------------------------


def test_a_streamed_tool_call_with_empty_arguments_gets_an_empty_object() -> None:
    # The call is index 1 and streams `"arguments": ""` only; a caller assembling the stream
    # must still get valid JSON (the unary path always did).
    events, err = openai_events("oa-tool-index1-cached")
    assert err is None
    calls = [e for e in events if isinstance(e, ToolCallDeltaEvent)]
    assert calls[0].index == 1 and calls[0].name == "bmcp_coder_coder_list_workspaces"
    assert "".join(c.arguments_delta for c in calls) == "{}"
    assert isinstance(events[-1], EndEvent) and events[-1].finish_reason == FinishReason.TOOL_CALLS
