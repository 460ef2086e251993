"""The embeddings wire mappings (PROTOCOLS-2026.md section 7): bodies, answers, bad answers."""

from __future__ import annotations

import math

import pytest

from broker import errors
from broker.providers import ollama_wire, openai_wire

KW = {"provider": "p", "model": "m"}


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
