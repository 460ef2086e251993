"""Generated requests against a live daemon (issue 11): valid ones are answered, every
invalid one is INVALID_ARGUMENT naming its field, and nothing is ever INTERNAL or UNKNOWN,
whatever the fields hold (NaN, ±Inf, unknown enum numbers, control characters, a tool
schema nested 60 deep, 300 bad messages, a 70 KiB model name), with trailers under 8 KiB.

Three properties:
- `test_valid_requests_are_answered`: well-formed requests to each provider get an answer.
- `test_each_defect_is_named`: a valid request with 1-3 known defects injected gets
  INVALID_ARGUMENT with a BadRequest violation at each defect's field path.
- `test_arbitrary_requests_never_fail_internally`: requests drawn from everything the
  proto can hold get some status with an ErrorInfo, never INTERNAL/UNKNOWN.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelbroker.v1 import broker_pb2 as pb
from tests.fuzz.conftest import MODELS, SCALE, LiveDaemon, assert_alive, check_failure, count_ok, details

Request = pb.CompleteRequest | pb.StreamCompleteRequest
KINDS: list[type[pb.CompleteRequest] | type[pb.StreamCompleteRequest]] = [
    pb.CompleteRequest,
    pb.StreamCompleteRequest,
]

# --- building blocks ---------------------------------------------------------------------------

short_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)
tool_names = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
json_leaf = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


def nested(levels: int) -> dict[str, Any]:
    """A JSON object `levels` objects deep (1: a flat object)."""
    inner: dict[str, Any] = {"type": "string"}
    for _ in range(levels - 1):
        inner = {"x": inner}
    return inner


@st.composite
def valid_requests(draw: st.DrawFn) -> Request:
    """Requests every fake upstream answers (Anthropic's temperature is 0-1, so is this)."""
    kind = draw(st.sampled_from(KINDS))
    req = kind(model=draw(st.sampled_from(MODELS)))
    if draw(st.booleans()):
        req.messages.add(role=pb.ROLE_SYSTEM).content.add(text=draw(short_text))
    for _ in range(draw(st.integers(1, 3))):
        req.messages.add(role=pb.ROLE_USER).content.add(text=draw(short_text))
    names = draw(st.lists(tool_names, max_size=3, unique=True))
    for name in names:
        tool = req.tools.add(name=name, description=draw(st.text(max_size=30)))
        tool.parameters.update(
            {
                "type": "object",
                "properties": {k: {"type": "string"} for k in draw(st.lists(tool_names, max_size=3))},
            }
        )
    if draw(st.booleans()):
        req.params.temperature = draw(st.floats(0, 1))
    if draw(st.booleans()):
        req.params.top_p = draw(st.floats(0, 1))
    if draw(st.booleans()):
        req.params.max_tokens = draw(st.integers(1, 4096))
    for s in draw(st.lists(short_text, max_size=3)):
        req.params.stop.append(s)
    return req


# --- defects: (how to inject, the field path the violation must name) --------------------------

Defect = Callable[[Request], str]


def _model_long(r: Request) -> str:
    r.model = "m" * 300
    return "model"


def _model_control(r: Request) -> str:
    r.model = "openai/gpt\n4o"
    return "model"


def _role(r: Request) -> str:
    r.messages[-1].role = 99  # type: ignore[assignment]
    return f"messages[{len(r.messages) - 1}].role"


def _empty_message(r: Request) -> str:
    r.messages.add(role=pb.ROLE_USER)
    return f"messages[{len(r.messages) - 1}].content"


def _tool_newline(r: Request) -> str:
    r.tools.add(name="f\n")
    return f"tools[{len(r.tools) - 1}].name"


def _tool_long_name(r: Request) -> str:
    r.tools.add(name="t" * 65)
    return f"tools[{len(r.tools) - 1}].name"


def _schema_nan(r: Request) -> str:
    t = r.tools.add(name="nan_tool")
    t.parameters.update({"type": "object", "properties": {"x": {"type": "number", "minimum": math.nan}}})
    return f"tools[{len(r.tools) - 1}].parameters.properties.x.minimum"


def _schema_inf(r: Request) -> str:
    t = r.tools.add(name="inf_tool")
    t.parameters.update({"type": "object", "properties": {"x": {"type": "number", "maximum": -math.inf}}})
    return f"tools[{len(r.tools) - 1}].parameters.properties.x.maximum"


def _schema_deep(depth: int) -> Defect:
    def inject(r: Request) -> str:
        t = r.tools.add(name=f"deep_{depth}")
        t.parameters.update(nested(depth))
        return f"tools[{len(r.tools) - 1}].parameters"

    return inject


def _temperature(value: float) -> Defect:
    def inject(r: Request) -> str:
        r.params.temperature = value
        return "params.temperature"

    return inject


def _top_p(value: float) -> Defect:
    def inject(r: Request) -> str:
        r.params.top_p = value
        return "params.top_p"

    return inject


def _max_tokens(value: int) -> Defect:
    def inject(r: Request) -> str:
        r.params.max_tokens = value
        return "params.max_tokens"

    return inject


def _stop_many(r: Request) -> str:
    r.params.stop.extend(["a", "b", "c", "d", "e"][: max(5 - len(r.params.stop), 1)])
    return "params.stop"


def _stop_empty(r: Request) -> str:
    r.params.stop.append("")
    return f"params.stop[{len(r.params.stop) - 1}]"


def _stop_long(r: Request) -> str:
    r.params.stop.append("s" * 2000)
    return f"params.stop[{len(r.params.stop) - 1}]"


def _response_format(r: Request) -> str:
    r.params.response_format = 7  # type: ignore[assignment]
    return "params.response_format"


def _tool_choice(r: Request) -> str:
    r.tool_choice.mode = 9  # type: ignore[assignment]
    return "tool_choice.mode"


def _fallback_empty(r: Request) -> str:
    r.fallback_models.append(" ")
    return f"fallback_models[{len(r.fallback_models) - 1}]"


def _fallbacks_many(r: Request) -> str:
    r.fallback_models.extend(["openai/gpt-4o-mini"] * 9)
    return "fallback_models"


def _capability(r: Request) -> str:
    r.requirements.capabilities.append(42)  # type: ignore[arg-type]
    return f"requirements.capabilities[{len(r.requirements.capabilities) - 1}]"


def _min_context(r: Request) -> str:
    r.requirements.min_context_window = -1
    return "requirements.min_context_window"


def _preference(r: Request) -> str:
    r.requirements.preference = 17  # type: ignore[assignment]
    return "requirements.preference"


def _calls_in_user_turn(r: Request) -> str:
    m = r.messages.add(role=pb.ROLE_USER)
    m.content.add(text="hi")
    m.tool_calls.add(id="c1", name="f", arguments="{}")
    return f"messages[{len(r.messages) - 1}].tool_calls"


def _tool_call_id_long(r: Request) -> str:
    m = r.messages.add(role=pb.ROLE_TOOL, tool_call_id="i" * 300)
    m.content.add(text="ok")
    return f"messages[{len(r.messages) - 1}].tool_call_id"


def _image_url(r: Request) -> str:
    m = r.messages.add(role=pb.ROLE_USER)
    m.content.add(text="look")
    m.content.add(image=pb.Image(url="ftp://example.com/cat.png"))
    return f"messages[{len(r.messages) - 1}].content[1].image.url"


def _too_many_messages(r: Request) -> str:
    for _ in range(2049 - len(r.messages)):
        r.messages.add(role=pb.ROLE_USER).content.add(text="x")
    return "messages"


# Lists whose items past the limit are not examined (their count is the violation).
CAPS = {"messages": 2048, "fallback_models": 8, "params.stop": 16, "tools": 128}


def examined(path: str) -> bool:
    m = re.match(r"(messages|fallback_models|params\.stop|tools)\[(\d+)\]", path)
    return m is None or int(m.group(2)) < CAPS[m.group(1)]


# Nested past protobuf's own limit (about 33 levels of Struct): these never decode.
UNDECODABLE = {_deep_40 := _schema_deep(40), _deep_64 := _schema_deep(64)}

DEFECTS: list[Defect] = [
    _model_long,
    _model_control,
    _role,
    _empty_message,
    _tool_newline,
    _tool_long_name,
    _schema_nan,
    _schema_inf,
    _schema_deep(33),
    _deep_40,
    _deep_64,
    _temperature(math.nan),
    _temperature(math.inf),
    _temperature(2.5),
    _top_p(-math.inf),
    _top_p(1.01),
    _max_tokens(0),
    _max_tokens(-7),
    _max_tokens(2**31 - 1),
    _stop_many,
    _stop_empty,
    _stop_long,
    _response_format,
    _tool_choice,
    _fallback_empty,
    _fallbacks_many,
    _capability,
    _min_context,
    _preference,
    _calls_in_user_turn,
    _tool_call_id_long,
    _image_url,
    _too_many_messages,
]


# --- calling ---------------------------------------------------------------------------------


def call(channel: grpc.Channel, req: Request, kind: str) -> grpc.RpcError | None:
    """Send `req` (serialized by us, so any content goes) and read the whole answer."""
    data = req.SerializeToString()
    try:
        if isinstance(req, pb.CompleteRequest):
            rpc = channel.unary_unary("/modelbroker.v1.ModelBroker/Complete")
            pb.CompleteResponse.FromString(rpc(data, timeout=20))
        else:
            stream = channel.unary_stream("/modelbroker.v1.ModelBroker/StreamComplete")
            for raw in stream(data, timeout=20):
                pb.StreamCompleteResponse.FromString(raw)
    except grpc.RpcError as err:
        return err
    count_ok(kind)
    return None


@pytest.fixture(scope="module")
def channel(live: tuple[LiveDaemon, grpc.Channel]) -> grpc.Channel:
    return live[1]


@settings(max_examples=150 * SCALE)
@given(req=valid_requests())
def test_valid_requests_are_answered(channel: grpc.Channel, req: Request) -> None:
    err = call(channel, req, "valid request")
    if err is not None:
        check_failure(err, "valid request")
        raise AssertionError(f"a valid request failed: {err.code()} {err.details()}")


@settings(max_examples=400 * SCALE)
@given(req=valid_requests(), picks=st.lists(st.sampled_from(DEFECTS), min_size=1, max_size=3, unique=True))
def test_each_defect_is_named(channel: grpc.Channel, req: Request, picks: list[Defect]) -> None:
    expected = [inject(req) for inject in picks]
    # Past a list's limit only the count is named: the items beyond it are not looked at.
    expected = [p for p in expected if examined(p)]
    if any(p in UNDECODABLE for p in picks):
        # Past protobuf's own nesting limit the bytes do not decode at all: only the field
        # where decoding stopped can be named, none of the others.
        expected = [path for p, path in zip(picks, expected, strict=True) if p in UNDECODABLE][:1]
    err = call(channel, req, "defective request")
    assert err is not None, f"accepted with defects at {expected}"
    code, reason, fields = check_failure(err, "defective request")
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"), (
        code,
        reason,
        err.details(),
    )
    for path in expected:
        # A schema nested too deep is named at the level where it went too deep, inside the tool.
        assert any(f == path or f.startswith(path + ".") or f.startswith(path + "[") for f in fields), (
            path,
            fields,
        )


# Anything the proto can hold, valid or not.
def _any_text() -> st.SearchStrategy[str]:
    return (
        st.text(max_size=12)
        | st.sampled_from(["", " ", "f\n", "\x00", "a" * 300, "\u202e\u0000x", "openai/", "/", "*", "%s%n"])
        | st.sampled_from(MODELS)
    )


@st.composite
def any_requests(draw: st.DrawFn) -> Request:
    kind = draw(st.sampled_from(KINDS))
    req = kind(model=draw(_any_text()))
    enum: st.SearchStrategy[Any] = st.integers(-3, 9)  # unknown numbers too
    for _ in range(draw(st.integers(0, 4))):
        m = req.messages.add(role=draw(enum), tool_call_id=draw(_any_text()), is_error=draw(st.booleans()))
        for _ in range(draw(st.integers(0, 3))):
            which = draw(st.integers(0, 3))
            if which == 0:
                m.content.add(text=draw(_any_text()))
            elif which == 1:
                m.content.add(image=pb.Image(data=draw(st.binary(max_size=16)), media_type=draw(_any_text())))
            elif which == 2:
                m.content.add(image=pb.Image(url=draw(_any_text() | st.just("https://x/y.png"))))
            else:
                m.content.add()
        for _ in range(draw(st.integers(0, 2))):
            m.tool_calls.add(id=draw(_any_text()), name=draw(_any_text()), arguments=draw(_any_text()))
    for _ in range(draw(st.integers(0, 3))):
        t = req.tools.add(name=draw(_any_text() | tool_names), description=draw(_any_text()))
        shape = draw(st.integers(0, 3))
        if shape == 0:
            t.parameters.update(draw(st.dictionaries(st.text(max_size=6), json_value, max_size=4)))
        elif shape == 1:
            t.parameters.update({"type": "object", "minimum": draw(st.floats())})  # NaN and ±Inf too
        elif shape == 2:
            t.parameters.update(nested(draw(st.integers(1, 60))))
    req.tool_choice.mode = draw(enum)
    req.tool_choice.tool_name = draw(_any_text())
    if draw(st.booleans()):
        p = req.params
        if draw(st.booleans()):
            p.temperature = draw(st.floats())
        if draw(st.booleans()):
            p.top_p = draw(st.floats())
        if draw(st.booleans()):
            p.max_tokens = draw(st.integers(-(2**31), 2**31 - 1))
        if draw(st.booleans()):
            p.seed = draw(st.integers(-(2**63), 2**63 - 1))
        p.stop.extend(draw(st.lists(_any_text(), max_size=6)))
        p.response_format = draw(enum)
    if draw(st.booleans()):
        r = req.requirements
        r.capabilities.extend(draw(st.lists(enum, max_size=4)))
        r.min_context_window = draw(st.integers(-(2**63), 2**63 - 1))
        if draw(st.booleans()):
            r.max_input_price_micro_usd_per_mtok = draw(st.integers(-(2**63), 2**63 - 1))
        r.allow_providers.extend(draw(st.lists(_any_text(), max_size=3)))
        r.exclude_providers.extend(draw(st.lists(_any_text(), max_size=3)))
        r.preference = draw(enum)
    req.fallback_models.extend(draw(st.lists(_any_text(), max_size=3)))
    return req


@st.composite
def noisy_valid_requests(draw: st.DrawFn) -> Request:
    """Valid requests with odd but legal content (any Unicode, empty strings, odd tool
    descriptions, seeds at the int64 edges): these reach the upstreams."""
    req = draw(valid_requests())
    for m in req.messages:
        if draw(st.booleans()):
            m.content.add(text=draw(st.text(max_size=40)))
    for t in req.tools:
        t.description = draw(_any_text())
    if draw(st.booleans()):
        req.params.seed = draw(st.sampled_from([0, -1, 2**63 - 1, -(2**63)]))
    if draw(st.booleans()):
        req.params.response_format = draw(st.sampled_from([0, 1, 2]))  # type: ignore[assignment]
    if draw(st.booleans()) and req.tools:
        req.tool_choice.mode = draw(st.sampled_from([0, 1, 2, 3]))  # type: ignore[assignment]
    return req


@settings(max_examples=500 * SCALE)
@given(req=st.one_of(any_requests(), noisy_valid_requests()))
def test_arbitrary_requests_never_fail_internally(channel: grpc.Channel, req: Request) -> None:
    err = call(channel, req, "arbitrary request")
    if err is not None:
        check_failure(err, "arbitrary request")


def test_many_invalid_messages_still_fit(channel: grpc.Channel) -> None:
    """300 bad messages and a 64 KiB model name: INVALID_ARGUMENT, 20 violations, the rest counted."""
    req = pb.CompleteRequest(model="x" * 65536)
    for _ in range(300):
        req.messages.add(role=pb.ROLE_USER)
    err = call(channel, req, "300 invalid messages")
    assert err is not None
    code, _, fields = check_failure(err, "300 invalid messages")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(fields) == 20
    assert fields[0] == "model" and fields[1] == "messages[0].content"
    info, _ = details(err)
    assert info is not None and info.metadata["field_violations_omitted"] == "281"
    assert "x" * 300 not in (err.details() or "")


def test_unknown_model_name_is_bounded_not_found(channel: grpc.Channel) -> None:
    """A 200-character unknown model: NOT_FOUND, the name echoed only up to the cut."""
    req = pb.CompleteRequest(model="openai/" + "q" * 200, messages=[pb.Message(role=pb.ROLE_USER)])
    req.messages[0].content.add(text="hi")
    err = call(channel, req, "unknown model")
    assert err is not None
    code, reason, _ = check_failure(err, "unknown model")
    assert code == grpc.StatusCode.NOT_FOUND, (code, reason, err.details())


def test_daemon_alive_after(channel: grpc.Channel) -> None:
    assert_alive(channel)
