"""Request limits, bounded errors and upstream value checks as units (issue 11 items 1-4);
tests/fuzz drives the same through a live daemon."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from broker import convert, errors, guard
from broker.completion import MAX_DELTA_CHARS, Held, split_text, split_tool_call
from broker.providers import anthropic_wire, checks, ollama_wire, openai_wire
from broker.types import EndEvent, FinishReason, TextDeltaEvent, ToolCallDeltaEvent, Usage
from modelbroker.v1 import broker_pb2 as pb


def request(**fields: Any) -> pb.CompleteRequest:
    req = pb.CompleteRequest(model="openai/gpt-4o-mini", **fields)
    if not req.messages:
        req.messages.add(role=pb.ROLE_USER).content.add(text="hi")
    return req


def violations(req: pb.CompleteRequest, max_message_bytes: int = 1 << 20) -> list[tuple[str, str]]:
    with pytest.raises(errors.InvalidRequest) as info:
        convert.completion_from_proto(req, max_message_bytes=max_message_bytes)
    return info.value.violations


def fields(req: pb.CompleteRequest) -> list[str]:
    return [f for f, _ in violations(req)]


def nested(levels: int) -> dict[str, Any]:
    inner: dict[str, Any] = {"type": "object"}
    for _ in range(levels - 1):
        inner = {"x": inner}
    return inner


# --- item 1: every field bounded and checked ---------------------------------------------------


@pytest.mark.parametrize("name", ["f\n", "", "a" * 65, "a b", "ünï", "f\r", "x\x00"])
def test_tool_names_are_fullmatched(name: str) -> None:
    req = request()
    req.tools.add(name=name)
    assert fields(req) == ["tools[0].name"]


def test_a_schema_32_levels_deep_is_accepted_33_is_not() -> None:
    ok = request()
    ok.tools.add(name="t").parameters.update(nested(32))
    call = convert.completion_from_proto(ok, max_message_bytes=1 << 20)
    depth, node = 1, call.tools[0].parameters
    while "x" in node:
        node, depth = node["x"], depth + 1
    assert depth == 32
    deep = request()
    deep.tools.add(name="t").parameters.update(nested(33))
    found = violations(deep)
    assert len(found) == 1 and found[0][0].startswith("tools[0].parameters.x.x")
    assert "deeper than 32" in found[0][1]


def test_non_finite_numbers_in_a_schema_are_named() -> None:
    req = request()
    t = req.tools.add(name="t")
    t.parameters.update(
        {
            "type": "object",
            "properties": {"n": {"minimum": math.nan, "enum": [1, math.inf]}, "odd key": -math.inf},
        }
    )
    assert sorted(fields(req)) == [
        "tools[0].parameters.properties.n.enum[1]",
        "tools[0].parameters.properties.n.minimum",
        'tools[0].parameters.properties["odd key"]',
    ]


def test_schema_values_convert_like_json_format() -> None:
    req = request()
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 1, "enum": [1, "b", None, True]}},
    }
    req.tools.add(name="t").parameters.update(schema)
    call = convert.completion_from_proto(req, max_message_bytes=1 << 20)
    assert call.tools[0].parameters == {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 1.0, "enum": [1.0, "b", None, True]}},
    }


def test_a_huge_schema_is_refused() -> None:
    req = request()
    req.tools.add(name="t").parameters.update({"type": "object", "description": "d" * 70_000})
    assert fields(req) == ["tools[0].parameters"]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r, "model", "m" * 257), "model"),
        (lambda r: setattr(r, "model", "openai/x\n"), "model"),  # stripped: the newline goes
        (lambda r: setattr(r, "model", "openai/\x00x"), "model"),
        (lambda r: r.params.__setattr__("temperature", math.nan), "params.temperature"),
        (lambda r: r.params.__setattr__("top_p", math.inf), "params.top_p"),
        (lambda r: r.params.__setattr__("max_tokens", 2**31 - 1), "params.max_tokens"),
        (lambda r: r.params.stop.append("s" * 1025), "params.stop[0]"),
        (lambda r: r.params.__setattr__("response_format", 5), "params.response_format"),
        (lambda r: r.tool_choice.__setattr__("mode", 8), "tool_choice.mode"),
        (lambda r: r.messages[0].__setattr__("role", 12), "messages[0].role"),
        (lambda r: r.fallback_models.extend(["x"] * 9), "fallback_models"),
        (lambda r: r.fallback_models.append("y" * 300), "fallback_models[0]"),
        (
            lambda r: r.requirements.__setattr__("min_context_window", 2**60),
            "requirements.min_context_window",
        ),
        (lambda r: r.requirements.allow_providers.append("p" * 129), "requirements.allow_providers[0]"),
        (lambda r: r.requirements.capabilities.append(77), "requirements.capabilities[0]"),
        (lambda r: r.tools.add(name="t", description="d" * 20_000), "tools[0].description"),
        (lambda r: [r.tools.add(name=f"t{i}") for i in range(129)], "tools"),
        (lambda r: r.messages[0].content.extend([pb.ContentPart(text="x")] * 256), "messages[0].content"),
        (lambda r: r.messages[0].__setattr__("tool_call_id", "i" * 257), "messages[0].tool_call_id"),
        (
            lambda r: r.messages[0].content.add(image=pb.Image(url="https://x/" + "p" * 9000)),
            "messages[0].content[1].image.url",
        ),
    ],
)
def test_each_limit_names_its_field(mutate: Any, field: str) -> None:
    req = request()
    mutate(req)
    if field == "model" and req.model.strip() == "openai/x":
        convert.completion_from_proto(req, max_message_bytes=1 << 20)  # only trailing space: fine
        return
    assert field in fields(req)


def test_assistant_tool_calls_are_bounded() -> None:
    req = request()
    m = req.messages.add(role=pb.ROLE_ASSISTANT)
    m.tool_calls.add(id="c" * 300, name="n" * 300, arguments="{}")
    assert fields(req) == ["messages[1].tool_calls[0].id", "messages[1].tool_calls[0].name"]


def test_too_many_messages() -> None:
    req = request()
    for _ in range(convert.MAX_MESSAGES):
        req.messages.add(role=pb.ROLE_USER).content.add(text="x")
    assert fields(req) == ["messages"]


def test_get_model_ref_is_validated() -> None:
    assert convert.model_ref_from_proto("  openai/x ") == "openai/x"
    for bad in ("", "  ", "x" * 300, "a\x01b"):
        with pytest.raises(errors.InvalidRequest) as info:
            convert.model_ref_from_proto(bad)
        assert [f for f, _ in info.value.violations] == ["model"]


# --- item 2: bounded errors --------------------------------------------------------------------


def _decoded(st: grpc.Status) -> tuple[status_pb2.Status, error_details_pb2.ErrorInfo, list[str]]:
    raw = dict(st.trailing_metadata)["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    bad_fields: list[str] = []
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            d.Unpack(info)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
            bad_fields = [v.field for v in bad.field_violations]
    return status, info, bad_fields


def test_bound_marks_the_cut() -> None:
    assert errors.bound("abc", 5) == "abc"
    assert errors.bound("a" * 300, 256) == "a" * 256 + "…(44 more)"
    cut = errors.bound_utf8("é" * 1000, 100)
    assert len(cut.encode()) <= 100 and cut.endswith("more)")


def test_300_violations_and_a_64_kib_model_fit_in_the_trailers() -> None:
    err = errors.InvalidRequest(
        [(f"messages[{i}].content", "must not be empty") for i in range(300)], model="m" * 65536
    )
    st = errors.to_grpc_status(err)
    status, info, bad_fields = _decoded(st)
    assert len(bad_fields) == errors.MAX_FIELD_VIOLATIONS
    assert info.metadata[errors.OMITTED_VIOLATIONS_KEY] == "280"
    model = info.metadata["model"]
    assert len(model.encode()) <= errors.MAX_METADATA_VALUE_CHARS and model.endswith(" more)")
    assert status.ByteSize() <= errors.MAX_STATUS_BYTES
    assert "and 297 more" in st.details and len(st.details.encode()) <= errors.MAX_MESSAGE_BYTES


@pytest.mark.parametrize("char", ["x", "é", "\U0001f600"])
def test_any_status_stays_small(char: str) -> None:
    long = char * 100_000
    err = errors.InvalidRequest(
        [(long, long)] * 50, provider=long, model=long, metadata={long: long, "k": long}
    )
    st = errors.to_grpc_status(err)
    status, _, bad_fields = _decoded(st)
    assert status.ByteSize() <= errors.MAX_STATUS_BYTES and bad_fields
    assert len(st.details.encode()) <= errors.MAX_MESSAGE_BYTES
    err2 = errors.UpstreamUnavailable(long, provider="p", retry_after=1e300)
    st2 = errors.to_grpc_status(err2)
    assert _decoded(st2)[0].ByteSize() <= errors.MAX_STATUS_BYTES


def test_a_lone_surrogate_cannot_break_a_status() -> None:
    st = errors.to_grpc_status(errors.UpstreamProtocolError("bad \ud800 text", metadata={"x": "\udfff"}))
    assert "\ufffd" in st.details


def test_internal_status_has_a_stable_reason_and_the_request_id() -> None:
    st = errors.internal_status("internal error in the broker; see its logs", request_id="r-1")
    status, info, _ = _decoded(st)
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    assert info.reason == "INTERNAL" and info.metadata["request_id"] == "r-1"


def test_log_lines_are_bounded() -> None:
    event = {
        "event": "request",
        "requested_model": "m" * 3_000_000,
        "attempts": 3,
        "items": list(range(1000)),
        "nested": {"a": ["x" * 5000]},
        "exception": "T" * 100_000,
    }
    out = errors.bound_log_processor(None, "info", dict(event))
    assert len(out["requested_model"]) < errors.MAX_LOG_VALUE_CHARS + 40
    assert out["attempts"] == 3 and len(out["items"]) == errors.MAX_LOG_ITEMS + 1
    assert len(out["nested"]["a"][0]) < errors.MAX_LOG_VALUE_CHARS + 40
    assert len(out["exception"]) < errors.MAX_LOG_EXCEPTION_CHARS + 40


def test_bound_redacted_redacts_across_the_cut() -> None:
    from broker import redact

    secret = "zq-" + "k" * 40
    redact.register_secret(secret)
    try:
        text = "a" * 250 + secret + "b" * 10_000
        out = errors.bound_redacted(text, 256)
        assert secret[:6] not in out.replace("a", "") and out.endswith("more)")
    finally:
        redact._reset_for_tests()


# --- the guard: undecodable bytes -> a field path -------------------------------------------------


def test_undecodable_bytes_name_the_field() -> None:
    req = pb.CompleteRequest(model="m")
    for text in ("a", "b", "MARK"):
        req.messages.add(role=pb.ROLE_USER).content.add(text=text)
    data = req.SerializeToString().replace(b"MARK", b"M\xffRK")
    decoded = guard.deserializer(pb.CompleteRequest)(data)
    assert isinstance(decoded, guard.Undecodable)
    assert decoded.error.violations == [
        ("messages[2].content[0].text", "not valid UTF-8 (byte 1 of the string)")
    ]
    assert guard.deserializer(pb.CompleteRequest)(req.SerializeToString()) == req


def test_a_schema_past_protobufs_depth_names_the_tool() -> None:
    req = pb.CompleteRequest(model="m")
    req.tools.add(name="a")
    req.tools.add(name="b").parameters.update({"type": "object", "properties": {"p": nested(60)}})
    decoded = guard.deserializer(pb.CompleteRequest)(req.SerializeToString())
    assert isinstance(decoded, guard.Undecodable)
    path, problem = decoded.error.violations[0]
    assert path.startswith("tools[1].parameters.properties.p.x.x") and "deeper than 32" in problem


# --- item 3: upstream values ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [2**63, 2**53 + 1, -1, 12.5, "12", True, [1]])
def test_counts_must_be_counts(value: Any) -> None:
    with pytest.raises(errors.UpstreamProtocolError):
        checks.count(value, field="f", provider="p", model="m")


def test_counts_in_range_pass() -> None:
    assert checks.count(None, field="f", provider="p", model="m") == 0
    assert checks.count(2**53, field="f", provider="p", model="m") == 2**53


def test_openai_usage_and_index() -> None:
    parser = openai_wire.ChunkParser(provider="p", model="m")
    with pytest.raises(errors.UpstreamProtocolError):
        parser.feed({"choices": [], "usage": {"prompt_tokens": 2**63}})
    parser = openai_wire.ChunkParser(provider="p", model="m")
    with pytest.raises(errors.UpstreamProtocolError):
        parser.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1e300, "id": "c"}]}}]})
    parser = openai_wire.ChunkParser(provider="p", model="m")
    ev = parser.feed(
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"id": "c", "function": {"name": "f"}}]}}]}
    )
    assert ev == [ToolCallDeltaEvent(index=0, id="c", name="f")]


def test_anthropic_index_and_usage() -> None:
    p = anthropic_wire.StreamParser(provider="p", model="m")
    p.feed("message_start", '{"type":"message_start","message":{"usage":{"input_tokens":3}}}')
    with pytest.raises(errors.UpstreamProtocolError):
        p.feed(
            "content_block_start",
            '{"type":"content_block_start","index":1e999,"content_block":{"type":"text"}}',
        )
    p = anthropic_wire.StreamParser(provider="p", model="m")
    with pytest.raises(errors.UpstreamProtocolError):
        p.feed(
            "message_start",
            '{"type":"message_start","message":{"usage":{"input_tokens":9223372036854775808}}}',
        )
    p = anthropic_wire.StreamParser(provider="p", model="m")
    p.feed(
        "message_start", '{"type":"message_start","message":{"usage":{"input_tokens":3,"service_tier":"x"}}}'
    )
    p.feed(
        "message_delta",
        '{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":2}}',
    )
    (end,) = p.feed("message_stop", '{"type":"message_stop"}')
    assert end == EndEvent(FinishReason.STOP, Usage(input_tokens=3, output_tokens=2))


def test_ollama_counts_and_text() -> None:
    p = ollama_wire.ChatStreamParser(provider="p", model="m")
    with pytest.raises(errors.UpstreamProtocolError):
        p.feed('{"done":true,"eval_count":-1}')
    p = ollama_wire.ChatStreamParser(provider="p", model="m")
    with pytest.raises(errors.UpstreamProtocolError):
        p.feed('{"message":{"content":"\\ud800"},"done":false}')
    p = ollama_wire.ChatStreamParser(provider="p", model="m")
    assert p.feed('{"message":{"content":"ok","tool_calls":"nope"},"done":false}') == [TextDeltaEvent("ok")]


def test_listings_skip_what_could_never_be_served() -> None:
    models = openai_wire.parse_models(
        {"data": [{"id": "a" * 300}, {"id": "ok", "max_model_len": 2**63}, {"id": "\ud800"}]}, provider="p"
    )
    assert [(m.name, m.context_window) for m in models] == [("ok", None)]


def test_caller_tool_arguments_are_parsed_strictly() -> None:
    for bad in ('{"a": NaN}', '{"a": 1e999}', "[" * 100_000):
        with pytest.raises(ValueError):
            checks.strict_json(bad)
    assert checks.strict_json('{"n": 123456789012345678901234567890}') == {
        "n": 123456789012345678901234567890
    }


# --- item 4: bounded memory and messages -----------------------------------------------------------


def test_oversize_deltas_split_in_order() -> None:
    text = "a" * (MAX_DELTA_CHARS * 2 + 5)
    pieces = split_text(TextDeltaEvent(text))
    assert [len(p.text) for p in pieces] == [MAX_DELTA_CHARS, MAX_DELTA_CHARS, 5]
    calls = split_tool_call(ToolCallDeltaEvent(index=2, id="c", name="f", arguments_delta=text))
    assert (calls[0].id, calls[0].name) == ("c", "f") and all(c.index == 2 and not c.id for c in calls[1:])
    assert "".join(c.arguments_delta for c in calls) == text


def test_held_merges_and_stops_at_the_limit() -> None:
    held = Held(1100)
    for _ in range(500):
        held.add(TextDeltaEvent("ab"))
    held.add(ToolCallDeltaEvent(index=0, id="c", name="f"))
    assert held.outputs() == [TextDeltaEvent("ab" * 500), ToolCallDeltaEvent(index=0, id="c", name="f")]
    held = Held(1000)
    with pytest.raises(errors.ResponseTooLarge) as info:
        for _ in range(2000):
            held.add(TextDeltaEvent("é"))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not info.value.retryable


def test_list_models_page_tokens() -> None:
    from broker.types import ModelSpec

    specs = [ModelSpec(provider="p", name=f"m{i}") for i in range(25)]
    q = convert.list_models_query(pb.ListModelsRequest(page_size=10), {"p"})
    page = convert.list_models_page(specs, q)
    assert [m.name for m in page.models] == [f"m{i}" for i in range(10)] and page.next_page_token
    q2 = convert.list_models_query(pb.ListModelsRequest(page_size=10, page_token=page.next_page_token), {"p"})
    last = convert.list_models_page(
        specs,
        convert.list_models_query(
            pb.ListModelsRequest(
                page_size=10, page_token=convert.list_models_page(specs, q2).next_page_token
            ),
            {"p"},
        ),
    )
    assert [m.name for m in last.models] == [f"m{i}" for i in range(20, 25)] and not last.next_page_token
    with pytest.raises(errors.InvalidRequest):
        convert.list_models_query(pb.ListModelsRequest(provider="p", page_token=page.next_page_token), {"p"})


def test_select_model_answer_is_bounded() -> None:
    from broker.types import ModelSpec

    specs = [ModelSpec(provider="p", name=f"m{i}") for i in range(1000)]
    out = convert.select_model_response(specs[0], specs[1:], [(s.id, "too expensive") for s in specs])
    assert len(out.alternatives) == len(out.excluded) == convert.MAX_SELECT_LISTED
    assert (out.omitted_alternatives, out.omitted_excluded) == (899, 900)


async def test_coalesce_reads_ahead_a_bounded_amount_of_text() -> None:
    import asyncio

    from broker import coalesce

    produced = 0

    async def source() -> Any:
        nonlocal produced
        for _ in range(50):
            produced += 1
            yield TextDeltaEvent("z" * (1 << 20))

    out = coalesce.coalesced(source())
    first = await anext(out)
    assert len(first.text) == 1 << 20
    await asyncio.sleep(0.05)  # the reader runs ahead while we do not read
    assert produced <= coalesce.MAX_QUEUED_CHARS // (1 << 20) + 3, produced
    rest = [ev async for ev in out]
    assert sum(len(e.text) for e in rest) == 49 << 20
