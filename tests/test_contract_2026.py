"""The 2026 contract (issue 13) at the API edge: what convert accepts and refuses (with the
field path a caller fixes), how reasoning is accumulated and filtered per provider type,
what a caller's request needs of a model, and what cache writes cost."""

from __future__ import annotations

from typing import Any

import pytest

from broker import convert, errors, schema_rules
from broker.catalog import compute_cost
from broker.completion import Accumulated, Held
from broker.types import (
    CacheTTL,
    Capability,
    CompletionCall,
    Cost,
    DocumentPart,
    Finished,
    FinishReason,
    Message,
    Pricing,
    ReasoningDeltaEvent,
    ReasoningEffort,
    ReasoningPart,
    Refusal,
    Role,
    Started,
    TextDeltaEvent,
    TextPart,
    Usage,
)
from modelbroker.v1 import broker_pb2 as pb

PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"


def request(**fields: Any) -> pb.CompleteRequest:
    req = pb.CompleteRequest(model="openai/gpt-4o-mini", **fields)
    if not req.messages:
        req.messages.add(role=pb.ROLE_USER).content.add(text="hi")
    return req


def ok(req: pb.CompleteRequest) -> CompletionCall:
    return convert.completion_from_proto(req, max_message_bytes=1 << 22)


def violations(req: pb.CompleteRequest) -> dict[str, str]:
    with pytest.raises(errors.InvalidRequest) as info:
        ok(req)
    return dict(info.value.violations)


CLOSED = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": ["integer", "null"]}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


# --- strict-mode schema rules -----------------------------------------------------------------


def test_a_closed_all_required_schema_passes_both_profiles() -> None:
    assert schema_rules.strict_problems(CLOSED, "s") == []
    assert schema_rules.strict_problems(CLOSED, "s", "openai") == []


def test_strict_problems_name_the_path_inside_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "where": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]},
            "tags": {"type": "array", "items": {"not": {"type": "null"}}},
        },
        "required": ["where", "tags"],
        "additionalProperties": False,
    }
    assert schema_rules.strict_problems(schema, "params.json_schema.schema") == [
        (
            "params.json_schema.schema.properties.where.additionalProperties",
            "must be false on every object in strict mode",
        ),
        ("params.json_schema.schema.properties.tags.items.not", "'not' is not supported in strict mode"),
    ]


def test_openai_profile_wants_every_property_required_and_no_allof() -> None:
    schema = dict(CLOSED, required=["city"], allOf=[{"type": "object"}])
    problems = dict(schema_rules.strict_problems(schema, "s", "openai"))
    assert "missing 'days'" in problems["s.required"]
    assert "s.allOf" in problems
    # Anthropic-style optional fields are fine under the common profile.
    assert schema_rules.strict_problems(dict(CLOSED, required=["city"]), "s") == []


def test_strict_rules_follow_defs_anyof_and_remote_refs() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"anyOf": [{"$ref": "#/$defs/node"}, {"$ref": "https://x/y.json"}]}},
        "required": ["a"],
        "additionalProperties": False,
        "$defs": {"node": {"type": "object", "properties": {}}},
    }
    assert [p for p, _ in schema_rules.strict_problems(schema, "s")] == [
        "s.properties.a.anyOf[1].$ref",
        "s.$defs.node.additionalProperties",
    ]


# --- convert: the new request fields ----------------------------------------------------------


def test_json_schema_format_with_strict_violations_is_refused_naming_the_path() -> None:
    req = request()
    req.params.json_schema.name = "weather"
    req.params.json_schema.strict = True
    req.params.json_schema.schema.update({"type": "object", "properties": {"x": {"type": "string"}}})
    assert violations(req) == {
        "params.json_schema.schema.additionalProperties": "must be false on every object in strict mode"
    }
    req.params.json_schema.schema.update({"additionalProperties": False, "required": ["x"]})
    call = ok(req)
    assert call.params.json_schema is not None and call.params.json_schema.strict
    assert call.params.response_format.value == "json_schema"
    assert call.needed_capabilities() == {Capability.STRUCTURED_OUTPUTS}


def test_json_schema_format_bounds() -> None:
    bad_name = request()
    bad_name.params.json_schema.name = "has space"
    bad_name.params.json_schema.schema.update({"type": "array"})
    assert set(violations(bad_name)) == {"params.json_schema.name", "params.json_schema.schema"}
    missing = request()
    missing.params.response_format = pb.RESPONSE_FORMAT_JSON_SCHEMA
    assert set(violations(missing)) == {"params.json_schema"}
    clash = request()
    clash.params.response_format = pb.RESPONSE_FORMAT_JSON
    clash.params.json_schema.name = "x"
    clash.params.json_schema.schema.update({"type": "object"})
    assert set(violations(clash)) == {"params.response_format"}


def test_strict_tools_are_checked_and_need_structured_outputs() -> None:
    req = request()
    tool = req.tools.add(name="get", strict=True)
    tool.parameters.update({"type": "object", "properties": {"q": {"type": "string"}}})
    assert set(violations(req)) == {"tools[0].parameters.additionalProperties"}
    tool.parameters.update({"additionalProperties": False, "required": ["q"]})
    call = ok(req)
    assert call.tools[0].strict
    assert call.needed_capabilities() == {Capability.TOOLS, Capability.STRUCTURED_OUTPUTS}


def test_reasoning_settings() -> None:
    req = request()
    req.params.reasoning.effort = pb.REASONING_EFFORT_HIGH
    call = ok(req)
    assert call.params.reasoning is not None and call.params.reasoning.effort is ReasoningEffort.HIGH
    assert call.needed_capabilities() == {Capability.REASONING}
    off = request()
    off.params.reasoning.disabled = True
    assert ok(off).needed_capabilities() == set()  # turning it off needs nothing of the model
    for setter, path in (
        (lambda r: setattr(r.params.reasoning, "budget_tokens", 0), "params.reasoning.budget_tokens"),
        (lambda r: setattr(r.params.reasoning, "disabled", False), "params.reasoning.disabled"),
        (lambda r: r.params.reasoning.SetInParent(), "params.reasoning"),
        (lambda r: setattr(r.params.reasoning, "effort", 99), "params.reasoning.effort"),
    ):
        bad = request()
        setter(bad)
        assert set(violations(bad)) == {path}


def test_documents_are_checked_and_need_the_documents_capability() -> None:
    req = request()
    part = req.messages[0].content.add()
    part.document.data = PDF
    part.document.title = "Q3"
    call = ok(req)
    doc = call.messages[0].content[1]
    assert isinstance(doc, DocumentPart) and doc.media_type == "application/pdf" and doc.title == "Q3"
    assert call.needed_capabilities() == {Capability.DOCUMENTS}
    cases = {
        "messages[0].content[1].document.data": pb.Document(data=b"hello", media_type="application/pdf"),
        "messages[0].content[1].document.url": pb.Document(url="http://insecure/x.pdf"),
        "messages[0].content[1].document.media_type": pb.Document(data=PDF, media_type="application/zip"),
    }
    for path, bad_doc in cases.items():
        bad = request()
        bad.messages[0].content.add(document=bad_doc)
        assert path in violations(bad), path
    in_system = request()
    in_system.messages.add(role=pb.ROLE_SYSTEM).content.add(document=pb.Document(data=PDF))
    assert "messages[1].content[0].document" in violations(in_system)


def test_reasoning_parts_only_in_assistant_turns_and_never_cached() -> None:
    req = request()
    turn = req.messages.add(role=pb.ROLE_ASSISTANT)
    turn.content.add(reasoning=pb.ReasoningPart(text="hmm", signature="sig", provider_type="anthropic"))
    turn.content.add(text="answer")
    call = ok(req)
    assert call.messages[1].content[0] == ReasoningPart("hmm", "sig", "", "anthropic")
    bad = request()
    bad.messages[0].content.add(reasoning=pb.ReasoningPart(text="x"))
    assert "messages[0].content[1].reasoning" in violations(bad)
    cached = request()
    part = cached.messages.add(role=pb.ROLE_ASSISTANT).content.add(reasoning=pb.ReasoningPart(text="x"))
    part.cache_control.ttl = pb.CACHE_TTL_1H
    assert "messages[1].content[0].cache_control" in violations(cached)
    both = request()
    both.messages.add(role=pb.ROLE_ASSISTANT).content.add(
        reasoning=pb.ReasoningPart(text="x", redacted_data="opaque")
    )
    assert "messages[1].content[0].reasoning.redacted_data" in violations(both)


def test_cache_breakpoints_carry_their_ttl_and_at_most_four_per_request() -> None:
    req = request()
    req.messages[0].content[0].cache_control.ttl = pb.CACHE_TTL_1H
    tool = req.tools.add(name="t")
    tool.cache_control.SetInParent()
    call = ok(req)
    assert call.messages[0].content[0] == TextPart("hi", CacheTTL.ONE_HOUR)
    assert call.tools[0].cache is CacheTTL.DEFAULT
    many = request()
    for i in range(5):
        many.messages[0].content.add(text=f"block {i}").cache_control.SetInParent()
    assert "at most 4 cache breakpoints per request, got 5" in violations(many)["cache_control"]


def test_request_metadata_bounds() -> None:
    req = request(metadata=pb.RequestMetadata(end_user_id="u_8f3a", tags={"team": "search", "env": "prod"}))
    assert ok(req).metadata.tags == (("env", "prod"), ("team", "search"))
    for md, path in (
        (pb.RequestMetadata(end_user_id="jane@example.com plus spaces"), "metadata.end_user_id"),
        (pb.RequestMetadata(end_user_id="x" * 65), "metadata.end_user_id"),
        (pb.RequestMetadata(tags={f"k{i}": "v" for i in range(17)}), "metadata.tags"),
        (pb.RequestMetadata(tags={"k": "v\n"}), "metadata.tags[k]"),
    ):
        assert path in violations(request(metadata=md)), md


def test_provider_options_known_types_and_reserved_keys() -> None:
    req = request()
    req.provider_options["ollama"].update({"options": {"num_ctx": 8192}, "keep_alive": "5m"})
    assert ok(req).provider_options == {"ollama": {"options": {"num_ctx": 8192.0}, "keep_alive": "5m"}}
    unknown = request()
    unknown.provider_options["gpt"].update({"x": 1})
    assert "unknown provider type" in violations(unknown)["provider_options[gpt]"]
    reserved = request()
    reserved.provider_options["openai"].update({"model": "gpt-5", "stream": False})
    assert set(violations(reserved)) == {"provider_options[openai].model", "provider_options[openai].stream"}


# --- reasoning across turns and providers -----------------------------------------------------


def test_foreign_reasoning_is_dropped_for_another_provider_type_only() -> None:
    history = [
        Message(Role.USER, [TextPart("q")]),
        Message(Role.ASSISTANT, [ReasoningPart("think", "sig", "", "anthropic"), TextPart("a")]),
        Message(Role.USER, [TextPart("more")]),
    ]
    call = CompletionCall(model="m", messages=history)
    same = call.upstream(
        "claude",
        provider_type="anthropic",
        default_max_tokens=None,
        max_output_tokens=None,
        reasoning_model=None,
        timeout=None,
    )
    assert same.messages is history  # nothing to drop: the list is shared, not copied
    other = call.upstream(
        "gpt",
        provider_type="openai",
        default_max_tokens=None,
        max_output_tokens=None,
        reasoning_model=None,
        timeout=None,
    )
    assert other.messages[1].content == [TextPart("a")]
    assert history[1].content[0] == ReasoningPart(
        "think", "sig", "", "anthropic"
    )  # the caller's is untouched


def test_provider_options_reach_only_their_type() -> None:
    call = CompletionCall(
        model="m",
        messages=[Message(Role.USER, [TextPart("q")])],
        provider_options={"ollama": {"keep_alive": "5m"}},
    )
    kw: dict[str, Any] = dict(
        default_max_tokens=None, max_output_tokens=None, reasoning_model=None, timeout=None
    )
    assert call.upstream("x", provider_type="ollama", **kw).provider_options == {"keep_alive": "5m"}
    assert call.upstream("x", provider_type="openai", **kw).provider_options == {}


def test_unary_answer_keeps_text_and_reasoning_in_order() -> None:
    # Anthropic adaptive mode: text "\n\n", a thinking block, then the answer.
    held = Held(1 << 20)
    events: list[TextDeltaEvent | ReasoningDeltaEvent] = [
        TextDeltaEvent("\n\n"),
        ReasoningDeltaEvent(0, "Brief "),
        ReasoningDeltaEvent(0, "answer."),
        ReasoningDeltaEvent(0, signature="EtAB=="),
        ReasoningDeltaEvent(1, redacted_data="EqkE"),
        TextDeltaEvent("Pelly"),
        TextDeltaEvent(" and Beaky"),
    ]
    for ev in events:
        held.add(ev)
    acc = Accumulated()
    acc.add(Started("r", "claude", "claude-opus-4-6", "anthropic"))
    for out in held.outputs():
        acc.add(out)
    acc.add(Finished(FinishReason.STOP, Usage(1, 2), Cost()))
    assert acc.parts() == [
        TextPart("\n\n"),
        ReasoningPart("Brief answer.", "EtAB==", "", "anthropic"),
        ReasoningPart("", "", "EqkE", "anthropic"),
        TextPart("Pelly and Beaky"),
    ]
    resp = convert.complete_response(acc)
    kinds = [p.WhichOneof("part") for p in resp.message.content]
    assert kinds == ["text", "reasoning", "reasoning", "text"]
    assert resp.message.content[1].reasoning.provider_type == "anthropic"


def test_refusal_reaches_the_answer_and_the_stream_end() -> None:
    acc = Accumulated()
    acc.add(Started("r", "claude", "m", "anthropic"))
    refusal = Refusal("This request was blocked", "cyber")
    acc.add(Finished(FinishReason.REFUSAL, Usage(), Cost(), refusal))
    resp = convert.complete_response(acc)
    assert resp.finish_reason == pb.FINISH_REASON_REFUSAL
    assert (resp.refusal.explanation, resp.refusal.category) == ("This request was blocked", "cyber")
    end = convert.stream_message(Finished(FinishReason.REFUSAL, Usage(), Cost(), refusal)).end
    assert end.refusal.category == "cyber"


# --- cost -----------------------------------------------------------------------------------


def test_one_hour_cache_writes_bill_at_twice_input_reasoning_once_as_output() -> None:
    # claude-haiku-4-5: $1 input, $5 output, 5m write $1.25, read $0.10 per Mtok.
    price = Pricing(1_000_000, 5_000_000, 100_000, 1_250_000)
    usage = Usage(
        input_tokens=1_000_000 + 400_000 + 600_000,  # uncached + read + written
        output_tokens=1_000_000,
        cached_input_tokens=400_000,
        cache_write_input_tokens=600_000,
        cache_write_1h_input_tokens=200_000,
        reasoning_tokens=700_000,  # part of output_tokens: not billed again
    )
    cost = compute_cost(price, usage)
    # 1.0 + 0.4*0.10 + 0.4*1.25 + 0.2*2.00 = 1.94 USD in; 5 USD out.
    assert (cost.input_micro_usd, cost.output_micro_usd) == (1_940_000, 5_000_000)


def test_reasoning_origin_splits_one_type_that_serves_two_vendors() -> None:
    history = [
        Message(Role.USER, [TextPart("q")]),
        Message(
            Role.ASSISTANT, [ReasoningPart("claude thought", "sig", "", "vertex.anthropic"), TextPart("a")]
        ),
        Message(Role.USER, [TextPart("more")]),
    ]
    call = CompletionCall(model="m", messages=history, provider_options={"vertex": {"labels": {"team": "x"}}})
    kw: dict[str, Any] = dict(
        default_max_tokens=None, max_output_tokens=None, reasoning_model=None, timeout=None
    )
    to_gemini = call.upstream("gemini-2.5-pro", provider_type="vertex", reasoning_origin="vertex", **kw)
    assert to_gemini.messages[1].content == [TextPart("a")]
    to_claude = call.upstream("claude", provider_type="vertex", reasoning_origin="vertex.anthropic", **kw)
    assert to_claude.messages is history and to_claude.provider_type == "vertex.anthropic"
    assert to_claude.provider_options == {"labels": {"team": "x"}}  # options are keyed by the type
