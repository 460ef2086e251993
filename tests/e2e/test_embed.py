"""Embed end to end: a real daemon in front of the fake OpenAI and Ollama upstreams."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import struct
from collections.abc import AsyncIterator

import grpc
import pytest

from broker.providers import kinds
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings, stub
from tests.e2e.test_openai_e2e import details, openai_provider
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI, fake_vector

SMALL = "openai/text-embedding-3-small"
PRICED = {"id": SMALL, "input_usd_per_mtok": 0.02, "output_usd_per_mtok": 0}


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        yield fake


@pytest.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as fake:
        yield fake


@pytest.fixture
async def broker(upstream, ollama, daemon, channel_to):
    settings = broker_settings(
        [
            openai_provider(upstream.url, embed_batch_size=3, embed_concurrency=2),
            {"name": "local", "type": "ollama", "base_url": ollama.url, "embed_batch_size": 2},
            {"name": "claude", "type": "anthropic", "base_url": "http://127.0.0.1:9", "api_key": "sk-ant-x"},
        ],
        aliases={"emb": SMALL, "emb-group": ["gone/nope-embed", SMALL]},
        models=[PRICED],
    )
    server, target = await daemon(settings)
    server.target = target
    return server, stub(channel_to(target))


def values(resp: pb.EmbedResponse) -> list[list[float]]:
    assert [e.index for e in resp.embeddings] == list(range(len(resp.embeddings)))
    return [list(e.values) for e in resp.embeddings]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b, strict=True))


async def test_embed_split_reassembled_in_order_with_usage_and_exact_cost(broker, upstream) -> None:
    _, s = broker
    texts = [f"text number {i} " + "word " * i for i in range(8)]
    resp = await s.Embed(pb.EmbedRequest(model="emb", inputs=texts, dimensions=8), timeout=10)
    assert (resp.provider, resp.model) == ("openai", "text-embedding-3-small")
    assert resp.request_id
    got = values(resp)
    assert all(close(g, fake_vector(t, 8)) for g, t in zip(got, texts, strict=True))
    assert sorted(upstream.embed_sizes) == [2, 3, 3]  # 8 inputs in parts of 3
    assert upstream.embed_peak <= 2  # embed_concurrency
    tokens = sum(len(t.split()) for t in texts)
    assert resp.usage.input_tokens == tokens and not resp.usage.estimated
    # 0.02 USD/Mtok = 20,000 micro-USD per Mtok, rounded half-up once.
    assert resp.cost.known and resp.cost.total_micro_usd == (tokens * 20_000 + 500_000) // 1_000_000


async def test_embed_cost_of_a_large_batch(broker, upstream) -> None:
    _, s = broker
    texts = ["word " * 5000] * 6  # 30,000 tokens at $0.02/Mtok = 600 micro-USD
    resp = await s.Embed(pb.EmbedRequest(model=SMALL, inputs=texts, dimensions=4), timeout=10)
    assert resp.usage.input_tokens == 30_000
    assert (resp.cost.input_micro_usd, resp.cost.output_micro_usd, resp.cost.total_micro_usd) == (600, 0, 600)


async def test_embed_failing_part_names_its_input_range(broker, upstream) -> None:
    _, s = broker
    texts = ["a", "b", "c", "d", "word " * 8193, "f", "g"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Embed(pb.EmbedRequest(model=SMALL, inputs=texts, dimensions=4), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[3:6]" in (err.value.details() or "")
    assert "maximum input length is 8192 tokens" in (err.value.details() or "")
    info, _, _ = details(err.value)
    assert info.metadata["failed_inputs"] == "3:6"


async def test_cancel_closes_every_part(broker, upstream) -> None:
    server, s = broker
    upstream.embed_delay = 30
    call = s.Embed(pb.EmbedRequest(model=SMALL, inputs=[str(i) for i in range(6)], dimensions=4), timeout=20)
    for _ in range(200):
        if upstream.embed_open == 2:
            break
        await asyncio.sleep(0.02)
    assert upstream.embed_open == 2  # both parts in flight
    call.cancel()
    for _ in range(200):
        if upstream.embed_open == 0 and server.servicer.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert upstream.embed_open == 0 and server.servicer.in_flight == 0
    assert upstream.server.disconnects.qsize() >= 2


async def test_ollama_embed_split(broker, ollama) -> None:
    _, s = broker
    texts = ["one", "two words", "three little words", "four"]
    resp = await s.Embed(pb.EmbedRequest(model="local/nomic-embed-text", inputs=texts), timeout=10)
    assert ollama.embed_sizes == [2, 2]
    got = values(resp)
    assert len(got[0]) == 768 and all(close(g, fake_vector(t, 768)) for g, t in zip(got, texts, strict=True))
    assert resp.usage.input_tokens == 1 + 2 + 3 + 1
    assert resp.cost.known and resp.cost.total_micro_usd == 0  # local: free


async def test_group_skips_a_member_that_resolves_to_nothing(broker, ollama) -> None:
    _, s = broker
    resp = await s.Embed(pb.EmbedRequest(model="emb-group", inputs=["x"], dimensions=4), timeout=10)
    assert resp.provider == "openai"


async def test_anthropic_has_no_embeddings(broker) -> None:
    _, s = broker
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Embed(pb.EmbedRequest(model="claude/voyage-3", inputs=["x"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "anthropic" in (err.value.details() or "")
    info, _, _ = details(err.value)
    assert info.reason == "CAPABILITY_MISSING"


async def test_kinds_do_not_cross(broker) -> None:
    _, s = broker
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Embed(pb.EmbedRequest(model="openai/gpt-4o-mini", inputs=["x"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(err.value)[0].reason == "CAPABILITY_MISSING"
    msg = pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Complete(pb.CompleteRequest(model=SMALL, messages=[msg]), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(err.value)[0].reason == "CAPABILITY_MISSING"


async def test_bounds(broker) -> None:
    _, s = broker
    for req, field in (
        (pb.EmbedRequest(model=SMALL), "inputs"),
        (pb.EmbedRequest(model=SMALL, inputs=["x"] * 2049), "inputs"),
        (pb.EmbedRequest(model=SMALL, inputs=["ok", " "]), "inputs[1]"),
        (pb.EmbedRequest(model=SMALL, inputs=["x" * (1024 * 1024 + 1)]), "inputs[0]"),
        (pb.EmbedRequest(model=SMALL, inputs=["x"], dimensions=0), "dimensions"),
        (pb.EmbedRequest(inputs=["x"]), "model"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.Embed(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in [f for f, _ in details(err.value)[1]]


async def test_list_models_by_kind(broker) -> None:
    _, s = broker
    emb = await s.ListModels(pb.ListModelsRequest(kind=pb.MODEL_KIND_EMBEDDING), timeout=10)
    by_id = {m.id: m for m in emb.models}
    assert by_id[SMALL].dimensions == 1536 and by_id[SMALL].kind == pb.MODEL_KIND_EMBEDDING
    assert all(m.kind == pb.MODEL_KIND_EMBEDDING for m in emb.models)
    chat = await s.ListModels(pb.ListModelsRequest(kind=pb.MODEL_KIND_CHAT), timeout=10)
    assert SMALL not in {m.id for m in chat.models} and "openai/gpt-4o-mini" in {m.id for m in chat.models}


async def test_python_client_embed(broker) -> None:
    from modelbroker.client import AsyncBrokerClient, FailedPreconditionError

    server, _ = broker
    async with AsyncBrokerClient(server.target, timeout=10) as client:
        out = await client.embed("emb", ["b a", "c"], dimensions=6)
        assert out.dimensions == 6 and len(out.vectors) == 2 and out.usage.input_tokens == 3
        assert out.vectors[1] == pytest.approx(fake_vector("c", 6), abs=1e-6)
        assert out.cost.known and out.provider == "openai"
        with pytest.raises(FailedPreconditionError):
            await client.embed("openai/gpt-4o", "x")


async def test_requirements_select_an_embedding_model_of_at_least_n_dimensions(broker, upstream) -> None:
    _, s = broker
    req = pb.Requirements(min_dimensions=1500, allow_providers=["openai"])
    resp = await s.Embed(pb.EmbedRequest(inputs=["a", "b"], requirements=req), timeout=10)
    assert (resp.provider, resp.model) == ("openai", "text-embedding-3-small")
    assert [len(e.values) for e in resp.embeddings] == [1536, 1536]
    assert upstream.requests[-1].json()["model"] == "text-embedding-3-small"
    # SelectModel answers the same question without calling anything.
    sel = await s.SelectModel(pb.SelectModelRequest(requirements=req), timeout=10)
    assert sel.selected.id == SMALL
    assert all(m.kind == pb.MODEL_KIND_EMBEDDING for m in sel.alternatives)


async def test_requirements_bind_a_named_embedding_model_and_nothing_fits_is_explained(broker) -> None:
    _, s = broker
    too_big = pb.Requirements(min_dimensions=4000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Embed(pb.EmbedRequest(inputs=["a"], requirements=too_big), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert details(err.value)[0].reason == "NO_MODEL_MATCHES"
    assert "openai/text-embedding-3-small: dimensions 1536 < 4000" in err.value.details()
    assert "openai/gpt-4o-mini: chat model, not embedding" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Embed(
            pb.EmbedRequest(model=SMALL, inputs=["a"], requirements=pb.Requirements(min_dimensions=2000)),
            timeout=10,
        )
    assert "dimensions 1536 < 2000" in err.value.details()
    # Completion-only requirements are refused on Embed, embedding ones on completions.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Embed(
            pb.EmbedRequest(inputs=["a"], requirements=pb.Requirements(min_context_window=10)), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    msg = pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Complete(
            pb.CompleteRequest(messages=[msg], requirements=pb.Requirements(min_dimensions=10)), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "use Embed" in err.value.details()


def float32(values: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


@pytest.fixture
async def platform_broker(upstream, daemon, channel_to, monkeypatch):
    """The fake on 127.0.0.1 counts as api.openai.com (kinds.py vendor_hosts) for this daemon."""
    openai = kinds.kind("openai")
    monkeypatch.setitem(
        kinds.KINDS, "openai", dataclasses.replace(openai, vendor_hosts=frozenset({"127.0.0.1"}))
    )
    settings = broker_settings([openai_provider(upstream.url, embed_batch_size=3)], models=[PRICED])
    _, target = await daemon(settings)
    return stub(channel_to(target))


async def test_api_openai_com_is_asked_for_base64_and_other_servers_for_floats(
    broker, platform_broker, upstream
) -> None:
    _, s = broker
    texts = ["a b", "c", "d e f", "g"]
    resp = await s.Embed(pb.EmbedRequest(model=SMALL, inputs=texts, dimensions=8), timeout=10)
    assert {r.json()["encoding_format"] for r in upstream.requests if r.path == "/v1/embeddings"} == {"float"}
    by_floats = values(resp)
    seen = len(upstream.requests)
    resp = await platform_broker.Embed(pb.EmbedRequest(model=SMALL, inputs=texts, dimensions=8), timeout=10)
    sent = [r.json() for r in upstream.requests[seen:] if r.path == "/v1/embeddings"]
    assert [b["encoding_format"] for b in sent] == ["base64", "base64"]  # split in parts of 3
    # The caller gets the same vectors either way: the proto carries float32.
    assert values(resp) == by_floats == [float32(fake_vector(t, 8)) for t in texts]
    assert resp.usage.input_tokens == 7 and not resp.usage.estimated


@pytest.mark.parametrize(
    ("vector", "says"),
    [
        ("not base64!", "data[0].embedding is 'not base64!', not base64"),
        ("AAAAAAA=", "data[0].embedding is 5 bytes of base64, not a whole number of float32 values"),
        (base64.b64encode(struct.pack("<2f", 0.5, float("nan"))).decode(), "data[0].embedding holds nan"),
        ([0.5, True], "data[0].embedding holds True, not a finite number"),
    ],
)
async def test_a_bad_base64_vector_is_an_upstream_protocol_error(
    platform_broker, upstream, vector, says
) -> None:
    upstream.embed_vector = vector
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await platform_broker.Embed(pb.EmbedRequest(model=SMALL, inputs=["x"], dimensions=2), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert says in (err.value.details() or "")
    assert details(err.value)[0].reason == "UPSTREAM_PROTOCOL_ERROR"


async def test_a_bad_float_vector_is_an_upstream_protocol_error(broker, upstream) -> None:
    _, s = broker
    upstream.embed_vector = [0.5, "x"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Embed(pb.EmbedRequest(model=SMALL, inputs=["x"], dimensions=2), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "data[0].embedding holds 'x', not a finite number" in (err.value.details() or "")
    assert details(err.value)[0].reason == "UPSTREAM_PROTOCOL_ERROR"
