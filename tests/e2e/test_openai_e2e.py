"""End to end: a real grpc.aio daemon on a real port in front of a fake OpenAI upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings, stub
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply, weather_tool_reply

PRICED = {"id": "openai/gpt-4o-mini", "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        yield fake


def openai_provider(url: str, **kw: object) -> dict[str, object]:
    return {
        "name": "openai",
        "type": "openai",
        "base_url": url,
        "api_key": OPENAI_TEST_KEY,
        "priority": 10,
        **kw,
    }


@pytest.fixture
async def broker(upstream, daemon, channel_to):
    settings = broker_settings(
        [openai_provider(upstream.url)], aliases={"fast": "openai/gpt-4o-mini"}, models=[PRICED]
    )
    server, target = await daemon(settings)
    return server, stub(channel_to(target)), channel_to(target)


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def details(
    err: grpc.aio.AioRpcError,
) -> tuple[error_details_pb2.ErrorInfo, list[tuple[str, str]], float | None]:
    st = rpc_status.from_call(err)
    assert st is not None, "the status must carry google.rpc details"
    info, violations, delay = error_details_pb2.ErrorInfo(), [], None
    for d in st.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            d.Unpack(info)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            violations = [(v.field, v.description) for v in br.field_violations]
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            d.Unpack(ri)
            delay = ri.retry_delay.ToTimedelta().total_seconds()
    return info, violations, delay


async def collect(s, req: pb.StreamCompleteRequest) -> list[pb.StreamCompleteResponse]:
    return [m async for m in s.StreamComplete(req, timeout=10)]


async def test_stream_start_deltas_end_with_usage_and_cost(broker, upstream) -> None:
    _, s, _ = broker
    upstream.reply = Reply(
        text_chunks=["The ", "answer ", "is ", "42."], input_tokens=120_000, output_tokens=50_000
    )
    msgs = await collect(s, pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("Q?")]))
    kinds = [m.WhichOneof("event") for m in msgs]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("text_delta") == 4, "text must arrive as several deltas, not one blob"
    start, end = msgs[0].start, msgs[-1].end
    assert start.provider == "openai" and start.model == "gpt-4o-mini" and len(start.request_id) >= 16
    assert "".join(m.text_delta.text for m in msgs if m.HasField("text_delta")) == "The answer is 42."
    assert end.finish_reason == pb.FINISH_REASON_STOP
    assert (end.usage.input_tokens, end.usage.output_tokens) == (120_000, 50_000)
    # 120k tokens at $0.15/M = 18,000 micro-USD; 50k at $0.60/M = 30,000 micro-USD.
    assert end.cost.known
    assert (end.cost.input_micro_usd, end.cost.output_micro_usd, end.cost.total_micro_usd) == (
        18_000,
        30_000,
        48_000,
    )
    body = upstream.server.requests[-1].json()
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "gpt-4o-mini"


async def test_unary_complete_accumulates_the_stream(broker, upstream) -> None:
    _, s, _ = broker
    upstream.reply = Reply(text_chunks=["Hel", "lo"], input_tokens=10, output_tokens=2)
    resp = await s.Complete(pb.CompleteRequest(model="gpt-4o-mini", messages=[user("hi")]), timeout=10)
    assert resp.message.role == pb.ROLE_ASSISTANT
    assert [p.text for p in resp.message.content] == ["Hello"]
    assert resp.provider == "openai" and resp.model == "gpt-4o-mini"
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    assert resp.usage.input_tokens == 10 and resp.usage.output_tokens == 2
    assert resp.cost.known and resp.cost.total_micro_usd == 3  # 1.5 + 1.2 micro-USD, rounded once


async def test_tool_call_streams_as_indexed_deltas(broker, upstream) -> None:
    _, s, _ = broker
    upstream.reply = weather_tool_reply()
    req = pb.StreamCompleteRequest(model="fast", messages=[user("Weather in Paris?")])
    req.tools.add(name="get_weather", description="Weather by city").parameters.update(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    )
    msgs = await collect(s, req)
    deltas = [m.tool_call_delta for m in msgs if m.HasField("tool_call_delta")]
    assert deltas[0].id == "call_w1" and deltas[0].name == "get_weather"
    assert {d.index for d in deltas} == {0}
    assert "".join(d.arguments_delta for d in deltas) == '{"city": "Paris"}'
    assert msgs[-1].end.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    sent = upstream.server.requests[-1].json()
    assert sent["tools"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("ref", ["openai/gpt-4o-mini", "gpt-4o-mini", "fast"])
async def test_model_resolution(broker, ref: str) -> None:
    _, s, _ = broker
    resp = await s.Complete(pb.CompleteRequest(model=ref, messages=[user("hi")]), timeout=10)
    assert (resp.provider, resp.model) == ("openai", "gpt-4o-mini")


async def test_explicit_provider_model_passes_through_undiscovered(broker, upstream) -> None:
    _, s, _ = broker
    upstream.models.append("gpt-brand-new")  # launched after discovery ran
    resp = await s.Complete(
        pb.CompleteRequest(model="openai/gpt-brand-new", messages=[user("hi")]), timeout=10
    )
    assert resp.model == "gpt-brand-new"


async def test_unknown_model_is_not_found(broker) -> None:
    _, s, _ = broker
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.Complete(pb.CompleteRequest(model="no-such-model", messages=[user("hi")]), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    info, _, _ = details(e.value)
    assert info.reason == "MODEL_NOT_FOUND" and info.domain == "modelbroker"
    assert "no-such-model" in e.value.details()


INVALID = [
    (pb.CompleteRequest(model="gpt-4o-mini"), "messages"),
    (
        pb.CompleteRequest(
            model="gpt-4o-mini", messages=[pb.Message(role=cast(Any, 9), content=[pb.ContentPart(text="x")])]
        ),
        "messages[0].role",
    ),
    (
        pb.CompleteRequest(
            model="gpt-4o-mini", messages=[user("x")], params=pb.GenerationParams(max_tokens=-5)
        ),
        "params.max_tokens",
    ),
    (
        pb.CompleteRequest(
            model="gpt-4o-mini", messages=[user("x")], params=pb.GenerationParams(temperature=3.5)
        ),
        "params.temperature",
    ),
    (pb.CompleteRequest(model="gpt-4o-mini", messages=[user("x" * 70_000)]), "messages[0].content"),
    (pb.CompleteRequest(messages=[user("x")]), "model"),
]


@pytest.mark.parametrize(("req", "field"), INVALID, ids=[f for _, f in INVALID])
async def test_invalid_requests_name_the_field(upstream, daemon, channel_to, req, field) -> None:
    settings = broker_settings([openai_provider(upstream.url)], server={"max_message_bytes": 65536})
    _, target = await daemon(settings)
    s = stub(channel_to(target))
    calls_before = len(upstream.server.requests)
    for call in (
        s.Complete(req, timeout=10),
        collect(s, pb.StreamCompleteRequest.FromString(req.SerializeToString())),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info, violations, _ = details(e.value)
        assert info.reason == "INVALID_REQUEST"
        assert field in [f for f, _ in violations], violations
        assert field in e.value.details()
    assert len(upstream.server.requests) == calls_before, "an invalid request must never reach the upstream"


async def test_upstream_401_maps_and_redacts_the_key(upstream, daemon, channel_to) -> None:
    wrong = "sk-test-wrong-key-7777777777"
    upstream.echo_full_key = True  # the variant that echoes the key it was sent
    _, target = await daemon(broker_settings([openai_provider(upstream.url, api_key=wrong)]))
    s = stub(channel_to(target))
    for call in (
        s.Complete(pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("x")]), timeout=10),
        collect(s, pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("x")])),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info, _, _ = details(e.value)
        assert info.reason == "UPSTREAM_AUTH_FAILED"
        assert info.metadata["provider"] == "openai" and info.metadata["upstream_status"] == "401"
        assert "Incorrect API key" in e.value.details()
        assert wrong not in e.value.details() and wrong not in str(e.value.trailing_metadata())


async def test_upstream_429_carries_retry_info(broker, upstream) -> None:
    _, s, _ = broker
    upstream.faults.append(Fault("status", status=429, headers={"retry-after": "7"}))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.Complete(pb.CompleteRequest(model="gpt-4o-mini", messages=[user("x")]), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, _, delay = details(e.value)
    assert info.reason == "UPSTREAM_RATE_LIMITED" and delay == 7.0


async def test_list_get_models_and_providers(broker) -> None:
    _, s, _ = broker
    models = (await s.ListModels(pb.ListModelsRequest(), timeout=5)).models
    ids = {m.id for m in models}
    assert {"openai/gpt-4o-mini", "openai/gpt-4o"} <= ids
    mini = next(m for m in models if m.id == "openai/gpt-4o-mini")
    assert mini.discovered and mini.pricing.known and mini.pricing.input_micro_usd_per_mtok == 150_000
    got = (await s.GetModel(pb.GetModelRequest(model="fast"), timeout=5)).model
    assert got.id == "openai/gpt-4o-mini"
    providers = (await s.ListProviders(pb.ListProvidersRequest(), timeout=5)).providers
    assert [(p.name, p.type, p.health) for p in providers] == [
        ("openai", "openai", pb.PROVIDER_HEALTH_SERVING)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.ListModels(pb.ListModelsRequest(provider="nope"), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(resp.status)


async def wait_for_status(channel, service: str, want: int, within: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while loop.time() < end:
        if await health_status(channel, service) == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{service!r} did not become {want} within {within}s")


async def test_health_follows_the_upstream(broker, upstream) -> None:
    server, _, channel = broker
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", "modelbroker.v1.ModelBroker", "provider/openai"):
        assert await health_status(channel, name) == SERVING
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="provider/openai"), timeout=10
    )
    assert (await watch.read()).status == SERVING

    await upstream.stop()
    interval = server.settings.health.interval_seconds
    await wait_for_status(channel, "provider/openai", NOT_SERVING, within=2 * interval + 1.0)
    assert (await watch.read()).status == NOT_SERVING, "Watch must see the change"
    assert await health_status(channel, "modelbroker.v1.ModelBroker") == NOT_SERVING
    assert await health_status(channel, "") == SERVING, "liveness must not depend on providers"

    await upstream.start()
    await wait_for_status(channel, "provider/openai", SERVING, within=2 * interval + 1.0)
    assert (await watch.read()).status == SERVING
    assert await health_status(channel, "modelbroker.v1.ModelBroker") == SERVING
    watch.cancel()

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await health_status(channel, "provider/nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_connection_refused_is_unavailable(daemon, channel_to) -> None:
    _, target = await daemon(broker_settings([openai_provider("http://127.0.0.1:9/v1")]))
    s = stub(channel_to(target))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.Complete(pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("x")]), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    info, _, _ = details(e.value)
    assert info.reason == "UPSTREAM_UNAVAILABLE"


async def test_max_connection_age_lets_streams_finish_and_clients_reconnect(
    upstream, daemon, channel_to
) -> None:
    settings = broker_settings(
        [openai_provider(upstream.url)],
        server={"max_connection_age_seconds": 0.3, "max_connection_age_grace_seconds": 10},
    )
    _, target = await daemon(settings)
    s = stub(channel_to(target))
    upstream.reply = Reply(text_chunks=[f"{i} " for i in range(10)], chunk_delay=0.1)  # ~1 s, past the age
    msgs = await collect(s, pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("count")]))
    assert msgs[-1].HasField("end") and sum(m.HasField("text_delta") for m in msgs) == 10
    upstream.reply = Reply()
    resp = await s.Complete(pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]), timeout=10)
    assert resp.finish_reason == pb.FINISH_REASON_STOP  # the client reconnected after GOAWAY


async def test_request_id_in_body_and_trailers_on_success_and_error(broker) -> None:
    _, s, _ = broker
    call = s.Complete(
        pb.CompleteRequest(model="gpt-4o-mini", messages=[user("hi")]),
        timeout=10,
        metadata=(("x-request-id", "caller-chosen-id-1"),),
    )
    resp = await call
    assert resp.request_id == "caller-chosen-id-1"
    assert ("x-request-id", "caller-chosen-id-1") in tuple(await call.trailing_metadata())

    stream = s.StreamComplete(
        pb.StreamCompleteRequest(model="gpt-4o-mini", messages=[user("hi")]), timeout=10
    )
    msgs = [m async for m in stream]
    assert dict(await stream.trailing_metadata())["x-request-id"] == msgs[0].start.request_id

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.Complete(
            pb.CompleteRequest(model="no-such-model", messages=[user("hi")]),
            timeout=10,
            metadata=(("x-request-id", "failing-call-2"),),
        )
    trailers = dict(e.value.trailing_metadata())
    assert trailers["x-request-id"] == "failing-call-2"
    info, _, _ = details(e.value)  # the rich details survive beside it
    assert info.reason == "MODEL_NOT_FOUND"
