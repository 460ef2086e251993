"""Byte-level mutations of valid serialized requests, sent raw to every ModelBroker method
(identity serializers, so the daemon sees exactly these bytes): whatever they decode to, or
fail to, the answer is never INTERNAL or UNKNOWN and never names a Python class; bytes that
do not decode are INVALID_ARGUMENT with the field where decoding stopped; trailers stay
under 8 KiB and the daemon keeps answering health.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelbroker.v1 import broker_pb2 as pb
from tests.fuzz.conftest import SCALE, LiveDaemon, assert_alive, check_failure, count_ok


def _completion(kind: type[pb.CompleteRequest] | type[pb.StreamCompleteRequest]) -> bytes:
    req = kind(model="openai/gpt-4o-mini")
    req.messages.add(role=pb.ROLE_SYSTEM).content.add(text="Be brief.")
    m = req.messages.add(role=pb.ROLE_USER)
    m.content.add(text="What is in this picture, and the weather in Paris?")
    m.content.add(image=pb.Image(data=b"\x89PNG\r\n\x1a\n0000", media_type="image/png"))
    tool = req.tools.add(name="get_weather", description="Weather by city")
    tool.parameters.update(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    )
    req.params.temperature = 0.5
    req.params.max_tokens = 64
    req.params.stop.append("END")
    req.fallback_models.append("anthropic/claude-sonnet-4-5")
    return req.SerializeToString()


BASES: dict[str, tuple[bytes, bool]] = {
    # method -> (a valid request, server streaming)
    "Complete": (_completion(pb.CompleteRequest), False),
    "StreamComplete": (_completion(pb.StreamCompleteRequest), True),
    "ListModels": (
        pb.ListModelsRequest(provider="openai", capabilities=[pb.CAPABILITY_TOOLS]).SerializeToString(),
        False,
    ),
    "GetModel": (pb.GetModelRequest(model="openai/gpt-4o-mini").SerializeToString(), False),
    "SelectModel": (
        pb.SelectModelRequest(
            requirements=pb.Requirements(capabilities=[pb.CAPABILITY_TOOLS], allow_providers=["openai"])
        ).SerializeToString(),
        False,
    ),
    "ListProviders": (b"", False),
}


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with 1-4 mutations: flipped bits, bytes set, inserted, deleted, duplicated,
    truncation, or invalid UTF-8 spliced in."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 6))
        at = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == 0 and buf:
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and buf:
            buf[at] = draw(st.integers(0, 255))
        elif op == 2:
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == 3 and buf:
            del buf[at : at + draw(st.integers(1, 16))]
        elif op == 4 and buf:
            n = draw(st.integers(1, 24))
            buf[at:at] = buf[at : at + n]
        elif op == 5:
            del buf[at:]
        else:
            buf[at:at] = draw(
                st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
            )
    return bytes(buf)


@st.composite
def raw_calls(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    method = draw(st.sampled_from(sorted(BASES)))
    base, streaming = BASES[method]
    return method, draw(mutated(base)), streaming


@pytest.fixture(scope="module")
def channel(live: tuple[LiveDaemon, grpc.Channel]) -> grpc.Channel:
    return live[1]


def send(channel: grpc.Channel, method: str, data: bytes, streaming: bool) -> grpc.RpcError | None:
    path = f"/modelbroker.v1.ModelBroker/{method}"
    try:
        if streaming:
            for _ in channel.unary_stream(path)(data, timeout=20):
                pass
        else:
            channel.unary_unary(path)(data, timeout=20)
    except grpc.RpcError as err:
        return err
    return None


@settings(max_examples=800 * SCALE)
@given(case=raw_calls())
def test_mutated_bytes_never_fail_internally(channel: grpc.Channel, case: tuple[str, bytes, bool]) -> None:
    method, data, streaming = case
    kind = f"bytes: {method}"
    err = send(channel, method, data, streaming)
    if err is None:
        count_ok(kind)
        return
    code, reason, fields = check_failure(err, kind)
    try:
        getattr(pb, f"{method}Request").FromString(data)
        decodes = True
    except Exception:
        decodes = False
    if not decodes:
        # Bytes protobuf refuses: always the caller's error, with the field where they broke.
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"), (code, err.details())
        assert fields and fields[0], fields


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (pb.CompleteRequest(model="ab").SerializeToString().replace(b"ab", b"a\xff"), "model"),
        (b"\x0a\x05ab", "model"),  # a length past the end
        (b"\x0f", "model"),  # wire type 7
        (b"\x80", "request"),  # a truncated tag
    ],
)
def test_undecodable_names_the_field(channel: grpc.Channel, data: bytes, field: str) -> None:
    err = send(channel, "Complete", data, False)
    assert err is not None
    code, reason, fields = check_failure(err, "bytes: known-bad")
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", [field])
    assert "DecodeError" not in (err.details() or "")


def test_bad_utf8_deep_in_a_message(channel: grpc.Channel) -> None:
    req = pb.StreamCompleteRequest(model="openai/gpt-4o-mini")
    for text in ("one", "two", "three", "MARK"):
        req.messages.add(role=pb.ROLE_USER).content.add(text=text)
    data = req.SerializeToString().replace(b"MARK", b"MA\xffK")
    err = send(channel, "StreamComplete", data, True)
    assert err is not None
    _, _, fields = check_failure(err, "bytes: known-bad")
    assert fields == ["messages[3].content[0].text"]


def test_daemon_alive_after(channel: grpc.Channel) -> None:
    assert_alive(channel)
