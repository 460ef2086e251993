"""/metrics over real HTTP from a real daemon: the counters a dashboard reads move with traffic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.config import ConfigError, settings_from_dict
from broker.metrics import MAX_MODELS, OTHER, BrokerMetrics
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings, stub
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply
from tests.httpclient import HTTP

PRICED = {"id": "openai/gpt-4o-mini", "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        fake.reply = Reply(text_chunks=["a", "b", "c"], input_tokens=100_000, output_tokens=10_000)
        yield fake


@pytest.fixture
async def broker(upstream, daemon, channel_to):
    provider = {"name": "openai", "type": "openai", "base_url": upstream.url, "api_key": OPENAI_TEST_KEY}
    settings = broker_settings([provider], models=[PRICED], metrics={"listen": "127.0.0.1:0"})
    server, target = await daemon(settings)
    assert server.metrics_server is not None
    return server, stub(channel_to(target)), f"http://127.0.0.1:{server.metrics_server.port}/metrics"


async def scrape(url: str) -> Samples:
    async with HTTP() as http:
        resp = await http.get(url, timeout=5)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


async def test_counters_move_after_traffic(broker, upstream) -> None:
    _, s, url = broker
    before = await scrape(url)
    ok = {"model": "gpt-4o-mini", "provider": "openai"}
    assert value(before, "modelbroker_requests_total", rpc="StreamComplete", status="OK", **ok) == 0

    for _ in range(2):
        msgs = [
            m
            async for m in s.StreamComplete(
                pb.StreamCompleteRequest(model="gpt-4o-mini", messages=[user("q")]), timeout=5
            )
        ]
        assert msgs[-1].HasField("end")
    await s.Complete(pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("q")]), timeout=5)
    upstream.faults.append(Fault("status", status=400))  # not retried: one failed request
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Complete(pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("q")]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError):
        await s.Complete(pb.CompleteRequest(model="no-such-model", messages=[user("q")]), timeout=5)

    after = await scrape(url)
    req = "modelbroker_requests_total"
    assert value(after, req, rpc="StreamComplete", status="OK", **ok) == 2
    assert value(after, req, rpc="Complete", status="OK", **ok) == 1
    assert value(after, req, rpc="Complete", status="INVALID_ARGUMENT", **ok) == 1
    # Never resolved: no model or provider label (raw request text never becomes a label).
    assert value(after, req, rpc="Complete", status="NOT_FOUND", model="", provider="") == 1
    assert value(after, "modelbroker_tokens_total", direction="input", **ok) == 300_000
    assert value(after, "modelbroker_tokens_total", direction="output", **ok) == 30_000
    # 100k in at $0.15/M = 15,000 micro-USD, 10k out at $0.60/M = 6,000; three paid answers.
    assert value(after, "modelbroker_cost_micro_usd_total", **ok) == 3 * 21_000
    assert value(after, "modelbroker_request_duration_seconds_count", **ok) == 4
    assert value(after, "modelbroker_time_to_first_token_seconds_count", **ok) == 3
    assert value(after, "modelbroker_overhead_seconds_count", rpc="StreamComplete") == 2
    assert value(after, "modelbroker_overhead_seconds_count", rpc="Complete") == 2
    overhead = value(after, "modelbroker_overhead_seconds_sum", rpc="StreamComplete")
    duration = value(after, "modelbroker_request_duration_seconds_sum", **ok)
    assert 0 < overhead < duration
    assert value(after, "modelbroker_provider_healthy", provider="openai") == 1
    assert value(after, "modelbroker_ready") == 1
    assert value(after, "process_resident_memory_bytes") > 0


async def test_inflight_streams_gauge_follows_open_streams(broker, upstream) -> None:
    _, s, url = broker
    upstream.reply = Reply(text_chunks=["slow"] * 4, chunk_delay=0.3)
    call = s.StreamComplete(pb.StreamCompleteRequest(model="gpt-4o-mini", messages=[user("q")]), timeout=10)
    first = await call.read()  # the stream is open once its first message arrived
    assert first.HasField("start")
    during = await scrape(url)
    assert value(during, "modelbroker_inflight_streams", rpc="StreamComplete") == 1
    while await call.read() is not grpc.aio.EOF:
        pass
    after = await scrape(url)
    assert value(after, "modelbroker_inflight_streams", rpc="StreamComplete") == 0


async def test_provider_health_gauge_follows_the_checks(broker, upstream) -> None:
    _, _, url = broker
    await upstream.stop()
    for _ in range(50):  # health checks run every 0.2 s; allow up to ~5 s
        samples = await scrape(url)
        if value(samples, "modelbroker_provider_healthy", provider="openai") == 0:
            break
        await asyncio.sleep(0.1)
    assert value(samples, "modelbroker_provider_healthy", provider="openai") == 0
    assert value(samples, "modelbroker_ready") == 0


def test_model_labels_are_capped() -> None:
    m = BrokerMetrics(process=False)
    labels = {m.model_label(f"m{i}") for i in range(MAX_MODELS + 50)}
    assert len(labels) == MAX_MODELS + 1 and OTHER in labels
    assert m.model_label("m0") == "m0", "models seen before the cap keep their label"


def test_observe_records_the_same_series_through_its_lookup_table(monkeypatch) -> None:
    """`observe` reaches its children through a table of shortcuts (bounded, emptied when
    full): what is recorded is what `.labels()` per request recorded, the model cap included."""
    monkeypatch.setattr("broker.metrics.MAX_SERIES", 8)
    m = BrokerMetrics(process=False)
    get = m.registry.get_sample_value
    for i in range(MAX_MODELS + 20):
        m.observe(
            "Complete", model=f"m{i}", provider="p", status="OK", duration=0.5, ttft=0.1, upstream_wait=0.4
        )
    for _ in range(3):  # again, after the table was emptied many times over
        m.observe(
            "Complete",
            model="m0",
            provider="p",
            status="OK",
            duration=0.5,
            ttft=0.1,
            upstream_wait=0.4,
            tokens_in=7,
            tokens_out=2,
            cost_micro_usd=5,
        )
        m.observe(
            "Complete",
            model=f"m{MAX_MODELS + 5}",
            provider="p",
            status="OK",
            duration=0.5,
            ttft=None,
            upstream_wait=None,
        )
        m.observe(
            "StreamComplete",
            model="",
            provider="",
            status="RESOURCE_EXHAUSTED",
            duration=0.001,
            ttft=None,
            upstream_wait=None,
        )
    assert len(m._series) <= 8
    ok = {"rpc": "Complete", "provider": "p", "status": "OK"}
    assert get("modelbroker_requests_total", {**ok, "model": "m0"}) == 4
    assert get("modelbroker_requests_total", {**ok, "model": OTHER}) == 20 + 3
    assert get("modelbroker_request_duration_seconds_count", {"model": "m0", "provider": "p"}) == 4
    assert get("modelbroker_time_to_first_token_seconds_count", {"model": "m0", "provider": "p"}) == 4
    assert get("modelbroker_time_to_first_token_seconds_count", {"model": OTHER, "provider": "p"}) == 20
    assert get("modelbroker_tokens_total", {"model": "m0", "provider": "p", "direction": "input"}) == 21
    assert get("modelbroker_cost_micro_usd_total", {"model": "m0", "provider": "p"}) == 15
    assert get("modelbroker_overhead_seconds_count", {"rpc": "Complete"}) == MAX_MODELS + 20 + 3
    refused = {"rpc": "StreamComplete", "model": "", "provider": "", "status": "RESOURCE_EXHAUSTED"}
    assert get("modelbroker_requests_total", refused) == 3
    assert get("modelbroker_request_duration_seconds_count", {"model": "", "provider": ""}) == 3
    assert get("modelbroker_time_to_first_token_seconds_count", {"model": "", "provider": ""}) is None
    assert get("modelbroker_overhead_seconds_count", {"rpc": "StreamComplete"}) == 0


def test_metrics_listen_is_validated_with_its_path() -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"metrics": {"listen": "9464"}}, env={})
    assert err.value.problems[0].startswith("metrics.listen: must be HOST:PORT")
    assert settings_from_dict({"metrics": {"listen": "${M:-}"}}, env={}).metrics.listen is None


async def test_refused_calls_are_counted(upstream, daemon, channel_to) -> None:
    """Calls the auth gate refuses never reach the servicer; they still show on /metrics."""
    import hashlib

    provider = {"name": "openai", "type": "openai", "base_url": upstream.url, "api_key": OPENAI_TEST_KEY}
    key = "mb_metrics-test-key-0123456789"
    settings = broker_settings(
        [provider],
        metrics={"listen": "127.0.0.1:0"},
        auth={"keys": [{"name": "team-a", "sha256": hashlib.sha256(key.encode()).hexdigest()}]},
    )
    server, target = await daemon(settings)
    assert server.metrics_server is not None
    url = f"http://127.0.0.1:{server.metrics_server.port}/metrics"
    s = stub(channel_to(target))
    req = pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")])
    for metadata in ((), (("authorization", "Bearer mb_wrong-key-000000000000"),)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.Complete(req, timeout=5, metadata=metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await s.Complete(req, timeout=5, metadata=(("authorization", f"Bearer {key}"),))
    after = await scrape(url)
    name = "modelbroker_refused_requests_total"
    assert value(after, name, rpc="Complete", status="UNAUTHENTICATED", reason="API_KEY_MISSING") == 1
    assert value(after, name, rpc="Complete", status="UNAUTHENTICATED", reason="API_KEY_INVALID") == 1
    assert (
        value(
            after,
            "modelbroker_requests_total",
            rpc="Complete",
            model="gpt-4o-mini",
            provider="openai",
            status="OK",
        )
        == 1
    )
