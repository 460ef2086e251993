"""The embeddings wire mappings (PROTOCOLS-2026.md section 7): bodies, answers, bad answers."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import pytest

from broker import errors
from broker.providers import checks, ollama_wire, openai_wire
from broker.types import EmbedResult

KW: dict[str, Any] = {"provider": "p", "model": "m"}


def test_openai_body_is_an_array_of_floats_request() -> None:
    assert openai_wire.build_embed_body("text-embedding-3-small", ("a", "b"), 512) == {
        "model": "text-embedding-3-small",
        "input": ["a", "b"],
        "encoding_format": "float",
        "dimensions": 512,
    }
    assert "dimensions" not in openai_wire.build_embed_body("m", ("a",), None)


def test_openai_answer_is_put_in_index_order_with_usage() -> None:
    doc = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 1, "embedding": [0.5, 0.5]},
            {"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093]},
        ],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    r = openai_wire.parse_embeddings(doc, 2, **KW)
    assert r.vectors == ((0.0023, -0.0093), (0.5, 0.5)) and r.input_tokens == 8 and r.usage_reported
    assert not openai_wire.parse_embeddings({"data": doc["data"]}, 2, **KW).usage_reported


@pytest.mark.parametrize(
    "data",
    [
        [{"index": 0, "embedding": [1.0]}],  # one missing
        [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}],  # twice
        [{"index": 0, "embedding": "AAAAAA=="}, {"index": 1, "embedding": [1.0]}],  # base64: not asked for
        [{"index": 0, "embedding": [1.0, True]}, {"index": 1, "embedding": [1.0]}],
        [{"index": 0, "embedding": []}, {"index": 1, "embedding": [1.0]}],
        [{"index": 5, "embedding": [1.0]}, {"index": 1, "embedding": [1.0]}],
    ],
)
def test_openai_bad_answers_are_protocol_errors(data: list[object]) -> None:
    with pytest.raises(errors.UpstreamProtocolError):
        openai_wire.parse_embeddings({"data": data}, 2, **KW)


def test_per_token_vectors_are_mean_pooled_and_normalised() -> None:
    doc = {"data": [{"index": 0, "embedding": [[1.0, 0.0], [0.0, 1.0]]}]}
    (v,) = openai_wire.parse_embeddings(doc, 1, **KW).vectors
    assert v == pytest.approx((1 / math.sqrt(2), 1 / math.sqrt(2)))
    with pytest.raises(errors.UpstreamProtocolError):
        openai_wire.parse_embeddings({"data": [{"index": 0, "embedding": [[1.0], [1.0, 2.0]]}]}, 1, **KW)


def test_ollama_body_and_answer() -> None:
    assert ollama_wire.build_embed_body("nomic-embed-text", ("a", "b"), 256) == {
        "model": "nomic-embed-text",
        "input": ["a", "b"],
        "dimensions": 256,
    }
    doc = {"model": "nomic-embed-text", "embeddings": [[0.01, -0.0017], [0.2, 0.3]], "prompt_eval_count": 8}
    r = ollama_wire.parse_embed(doc, 2, **KW)
    assert r.vectors == ((0.01, -0.0017), (0.2, 0.3)) and r.input_tokens == 8 and r.usage_reported
    with pytest.raises(errors.UpstreamProtocolError):
        ollama_wire.parse_embed({"embeddings": [[0.1]]}, 2, **KW)
    with pytest.raises(errors.UpstreamProtocolError):
        ollama_wire.parse_embed({"embeddings": [[0.1], [float("nan")]]}, 2, **KW)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (None, "data[0].embedding is null, not an embedding vector"),
        ([], "data[0].embedding is a JSON list, not an embedding vector"),
        ({"a": 1}, "data[0].embedding is a JSON dict, not an embedding vector"),
        ([1.0] * 65537, "data[0].embedding is a JSON list, not an embedding vector"),
        ([1.0, True, "x"], "data[0].embedding holds True, not a finite number"),
        ([False], "data[0].embedding holds False, not a finite number"),
        ([0.5, 2, "x"], "data[0].embedding holds 'x', not a finite number"),
        ([1.0, None], "data[0].embedding holds null, not a finite number"),
        ([1.0, [1.0]], "data[0].embedding holds a JSON list, not a finite number"),
        ([1.0, {"k": 1}], "data[0].embedding holds a JSON dict, not a finite number"),
        ([1.0, float("nan"), True], "data[0].embedding holds nan, not a finite number"),
        ([float("inf")], "data[0].embedding holds inf, not a finite number"),
        ([1.0, float("-inf")], "data[0].embedding holds -inf, not a finite number"),
        ([1.0, 10**400], "data[0].embedding holds an integer of 1329 bits, not a finite number"),
    ],
)
def test_a_bad_vector_is_named_with_its_first_bad_number(value: object, says: str) -> None:
    with pytest.raises(errors.UpstreamProtocolError) as err:
        openai_wire.parse_embeddings({"data": [{"index": 0, "embedding": value}]}, 1, **KW)
    assert err.value.message == f"p: {says}" and err.value.reason == "UPSTREAM_PROTOCOL_ERROR"


@pytest.mark.parametrize(
    "value",
    [
        [0.25, -0.5, 1e-30],
        [1, 0, -3],  # integers, as JavaScript's JSON.stringify writes 1.0 and 0.0
        [0.5, 2, 0.25],
        [2**70, 0.5],
        [1e308, 1e308],  # finite, though their sum overflows
        [float.fromhex("0x1.fffffffffffffp+1023")] * 3,
    ],
)
def test_good_vectors_are_floats(value: list[float]) -> None:
    (v,) = openai_wire.parse_embeddings({"data": [{"embedding": value}]}, 1, **KW).vectors
    assert isinstance(v, tuple) and v == tuple(float(x) for x in value)
    assert all(type(x) is float for x in v)


def test_a_float_subclass_becomes_a_float() -> None:
    class F(float):
        pass

    v = checks.vector([F(0.5), 0.25], field="f", **KW)
    assert v == (0.5, 0.25) and all(type(x) is float for x in v)


def test_mean_pooling_is_a_mean_per_dimension() -> None:
    rows = [[0.1, 0.7, -0.2], [0.3, 0.3, 0.9], [0.25, -0.1, 0.05]]
    (v,) = openai_wire.parse_embeddings({"data": [{"embedding": rows}]}, 1, **KW).vectors
    mean = [sum(r[d] for r in rows) / 3 for d in range(3)]
    norm = math.sqrt(sum(x * x for x in mean))
    assert v == tuple(x / norm for x in mean)  # exactly: the same additions, in the same order


def b64(*values: float) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def parse64(doc: object, expected: int) -> EmbedResult:
    """An answer to a body that asked for base64."""
    return openai_wire.parse_embeddings(doc, expected, provider="p", model="m", base64=True)


def test_openai_body_asks_for_base64_when_told() -> None:
    assert openai_wire.build_embed_body("text-embedding-3-small", ("a",), None, base64=True) == {
        "model": "text-embedding-3-small",
        "input": ["a"],
        "encoding_format": "base64",
    }


def test_openai_base64_answer_is_the_float32_values() -> None:
    values = (0.0023064255, -0.009327292, 0.5, -1.0, 3.4e38)
    as_f32 = struct.unpack("<5f", struct.pack("<5f", *values))
    doc = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 1, "embedding": [0.25, 0.5]},  # a server may send floats
            {"object": "embedding", "index": 0, "embedding": b64(*values)},
        ],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    r = parse64(doc, 2)
    assert r.vectors == (as_f32, (0.25, 0.5)) and r.input_tokens == 3
    assert all(type(x) is float for x in r.vectors[0])
    # A whole MAX_DIMENSIONS vector is one.
    (big,) = parse64({"data": [{"embedding": b64(*[0.125] * checks.MAX_DIMENSIONS)}]}, 1).vectors
    assert big == (0.125,) * checks.MAX_DIMENSIONS


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("not base64!", "data[0].embedding is 'not base64!', not base64"),
        ("AAAAAA=", "data[0].embedding is 'AAAAAA=', not base64"),  # padding cut short
        ("AAAA\nAAAA", "data[0].embedding is 'AAAA\\nAAAA', not base64"),
        ("AAAAAA==AAAA", "data[0].embedding is 'AAAAAA==AAAA', not base64"),  # data after the padding
        ("ÀÀÀÀ", "data[0].embedding is 'ÀÀÀÀ', not base64"),
        ("", "data[0].embedding is '', not an embedding vector"),
        ("AAAAAAA=", "data[0].embedding is 5 bytes of base64, not a whole number of float32 values"),
        (b64(0.5, float("nan")), "data[0].embedding holds nan, not a finite number"),
        (b64(float("-inf"), 0.5), "data[0].embedding holds -inf, not a finite number"),
        (
            "A" * 349_532,
            "data[0].embedding is 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA..., not an embedding vector",
        ),
        (None, "data[0].embedding is null, not an embedding vector"),
        ([1.0, True], "data[0].embedding holds True, not a finite number"),
    ],
)
def test_a_bad_base64_vector_is_a_protocol_error(value: object, says: str) -> None:
    doc = {"data": [{"index": 0, "embedding": value}]}
    with pytest.raises(errors.UpstreamProtocolError) as err:
        parse64(doc, 1)
    assert err.value.message == f"p: {says}" and err.value.reason == "UPSTREAM_PROTOCOL_ERROR"


def test_base64_not_asked_for_is_refused_as_before() -> None:
    with pytest.raises(errors.UpstreamProtocolError) as err:
        openai_wire.parse_embeddings({"data": [{"index": 0, "embedding": b64(0.5)}]}, 1, **KW)
    assert err.value.message == "p: data[0].embedding is 'AAAAPw==', not an embedding vector"
