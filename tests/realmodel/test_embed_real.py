"""Embed through the daemon against llama-cpp-python's server (`--embedding true`, Gemma 3 270M):
two paraphrases must be closer to each other than either is to an unrelated sentence."""

from __future__ import annotations

import math
from typing import Any

import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import broker_settings, stub
from tests.realmodel.conftest import MODEL, PROVIDER, LlamaServer

pytestmark = pytest.mark.real_model

PARAPHRASES = ("The cat is sleeping on the warm windowsill.", "A cat naps on the sunny window ledge.")
UNRELATED = "Quarterly tax filings are due at the end of the fiscal year."


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture
async def broker(llama_server: LlamaServer, daemon, channel_to) -> Any:
    # embed_batch_size 1: llama-cpp-python mis-embeds every input after the first of a batch for
    # a model without pooling (Gemma 3 270M: the 2nd vector of a batch had cosine -0.07 with the
    # same text embedded alone), so each input goes in its own call, and the broker splits.
    provider = {"name": PROVIDER, "type": "openai", "base_url": llama_server.base_url, "embed_batch_size": 1}
    settings = broker_settings([provider], health={"interval_seconds": 30, "timeout_seconds": 5})
    _, target = await daemon(settings)
    return stub(channel_to(target))


async def test_paraphrases_are_closer_than_an_unrelated_sentence(broker) -> None:
    req = pb.EmbedRequest(model=f"{PROVIDER}/{MODEL}", inputs=[*PARAPHRASES, UNRELATED])
    resp = await broker.Embed(req, timeout=120)  # 3 inputs in 3 parts: split and reassembled
    vectors = [list(e.values) for e in resp.embeddings]
    assert [e.index for e in resp.embeddings] == [0, 1, 2]
    dims = {len(v) for v in vectors}
    assert len(dims) == 1 and dims.pop() > 0
    close, far1, far2 = (
        cosine(vectors[0], vectors[1]),
        cosine(vectors[0], vectors[2]),
        cosine(vectors[1], vectors[2]),
    )
    print(
        f"\nreal model {MODEL}: {len(vectors[0])} dimensions; cosine(paraphrases)={close:.4f}, "
        f"cosine(p1, unrelated)={far1:.4f}, cosine(p2, unrelated)={far2:.4f}; "
        f"usage input_tokens={resp.usage.input_tokens} estimated={resp.usage.estimated}"
    )
    assert close > far1 and close > far2
