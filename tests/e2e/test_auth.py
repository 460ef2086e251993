"""Caller auth and admission limits, end to end: a real daemon on a real port, a fake OpenAI.

Two providers sit on the same fake upstream ("openai" and "other") so a key limited to
`openai/*` has something it may not use; the fake's request log proves a refused call never
reached the upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import structlog
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from broker.auth import hash_key
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings, stub
from tests.fakes.openai_upstream import CHAT_PATH, FakeOpenAI
from tests.fakes.script import Fault, Reply

KEY_A = "mb_test-team-a-5b1f0c9e7d2a4f68"
KEY_ADMIN = "mb_test-admin-0e4d9a7c3b2f1e56"
MODEL = "openai/gpt-4o-mini"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        yield fake


def providers(url: str) -> list[dict[str, Any]]:
    return [
        {"name": "openai", "type": "openai", "base_url": url, "api_key": OPENAI_TEST_KEY, "priority": 10},
        {"name": "other", "type": "openai", "base_url": url, "api_key": OPENAI_TEST_KEY, "priority": 20},
    ]


def chat_calls(upstream: FakeOpenAI) -> int:
    """Completions that reached the upstream (health checks list models meanwhile)."""
    return sum(1 for r in upstream.server.requests if r.path == CHAT_PATH)


def key(name: str, secret: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "sha256": hash_key(secret), **kw}


def bearer(secret: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {secret}"),)


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def complete_req(model: str = MODEL) -> pb.CompleteRequest:
    return pb.CompleteRequest(model=model, messages=[user("hi")])


def stream_req(model: str = MODEL) -> pb.StreamCompleteRequest:
    return pb.StreamCompleteRequest(model=model, messages=[user("hi")])


def error_info(err: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, float | None]:
    st = rpc_status.from_call(err)
    assert st is not None, "the status must carry google.rpc details"
    info, delay = error_details_pb2.ErrorInfo(), None
    for d in st.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            d.Unpack(info)
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            d.Unpack(ri)
            delay = ri.retry_delay.ToTimedelta().total_seconds()
    return info, delay


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value


async def drain(call: Any) -> list[pb.StreamCompleteResponse]:
    return [m async for m in call]


async def start(daemon, channel_to, settings) -> tuple[Any, grpc.aio.Channel]:
    _, target = await daemon(settings)
    ch = channel_to(target)
    return stub(ch), ch


@pytest.fixture
async def authed(upstream, daemon, channel_to):
    """team-a may use openai/* only; admin may use everything."""
    settings = broker_settings(
        providers(upstream.url),
        aliases={"fast": "openai/gpt-4o-mini", "elsewhere": "other/gpt-4o-mini"},
        auth={"keys": [key("team-a", KEY_A, allow_models=["openai/*"]), key("admin", KEY_ADMIN)]},
    )
    s, ch = await start(daemon, channel_to, settings)
    return s, ch


async def test_no_key_is_unauthenticated_on_every_broker_rpc(authed, upstream) -> None:
    s, _ = authed
    before = chat_calls(upstream)
    for call in (
        s.Complete(complete_req(), timeout=10),
        drain(s.StreamComplete(stream_req(), timeout=10)),
        s.ListModels(pb.ListModelsRequest(), timeout=10),
        s.ListProviders(pb.ListProvidersRequest(), timeout=10),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(err)[0].reason == "API_KEY_MISSING"
        assert "authorization: Bearer" in (err.details() or "")
    assert chat_calls(upstream) == before, "an unauthenticated call must not reach the upstream"


async def test_wrong_key_is_unauthenticated_and_never_echoed(authed, upstream) -> None:
    s, _ = authed
    wrong = "mb_wrong-key-9c8b7a6f5e4d3c2b1a"
    before = chat_calls(upstream)
    for md in (bearer(wrong), (("authorization", KEY_A),), (("authorization", "Basic dXNlcjpwYXNz"),)):
        for call in (
            s.Complete(complete_req(), timeout=10, metadata=md),
            drain(s.StreamComplete(stream_req(), timeout=10, metadata=md)),
        ):
            err = await refused(call)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_info(err)[0].reason == "API_KEY_INVALID"
            assert wrong not in (err.details() or "") and KEY_A not in (err.details() or "")
    assert chat_calls(upstream) == before


async def test_allowed_key_completes_and_sees_only_its_models(authed, upstream) -> None:
    s, _ = authed
    upstream.reply = Reply(text_chunks=["Hel", "lo"], input_tokens=10, output_tokens=2)
    resp = await s.Complete(complete_req(), timeout=10, metadata=bearer(KEY_A))
    assert (resp.provider, resp.model, resp.message.content[0].text) == ("openai", "gpt-4o-mini", "Hello")
    msgs = await drain(s.StreamComplete(stream_req("fast"), timeout=10, metadata=bearer(KEY_A)))
    assert msgs[0].start.provider == "openai" and msgs[-1].HasField("end")

    mine = await s.ListModels(pb.ListModelsRequest(), timeout=10, metadata=bearer(KEY_A))
    everything = await s.ListModels(pb.ListModelsRequest(), timeout=10, metadata=bearer(KEY_ADMIN))
    assert {m.provider for m in everything.models} == {"openai", "other"}
    assert mine.models and {m.provider for m in mine.models} == {"openai"}
    got = await s.GetModel(pb.GetModelRequest(model=MODEL), timeout=10, metadata=bearer(KEY_A))
    assert got.model.id == MODEL


@pytest.mark.parametrize(
    "model",
    ["other/gpt-4o-mini", "elsewhere", "gpt-4o-mini"],
    ids=["explicit", "alias-resolving-to-forbidden", "bare-id-served-by-both"],
)
async def test_forbidden_model_is_permission_denied_before_any_upstream_call(authed, upstream, model) -> None:
    s, _ = authed
    before = chat_calls(upstream)
    for call in (
        s.Complete(complete_req(model), timeout=10, metadata=bearer(KEY_A)),
        drain(s.StreamComplete(stream_req(model), timeout=10, metadata=bearer(KEY_A))),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        info, _ = error_info(err)
        assert info.reason == "MODEL_NOT_ALLOWED"
        assert info.metadata["provider"] == "other" and info.metadata["caller"] == "team-a"
        assert "other/gpt-4o-mini" in (err.details() or "") and "openai/*" in (err.details() or "")
    assert chat_calls(upstream) == before, "a forbidden model must never be called"
    # The same model is fine for a key allowed everything.
    resp = await s.Complete(complete_req(model), timeout=10, metadata=bearer(KEY_ADMIN))
    assert resp.provider in ("openai", "other")


async def test_forbidden_fallback_and_get_model_are_denied(authed, upstream) -> None:
    s, _ = authed
    req = complete_req()
    req.fallback_models.append("other/gpt-4o-mini")
    err = await refused(s.Complete(req, timeout=10, metadata=bearer(KEY_A)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await refused(
        s.GetModel(pb.GetModelRequest(model="other/gpt-4o-mini"), timeout=10, metadata=bearer(KEY_A))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(err)[0].reason == "MODEL_NOT_ALLOWED"


async def test_health_and_reflection_stay_open_without_a_key(authed) -> None:
    _, ch = authed
    health = health_pb2_grpc.HealthStub(ch)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    names: list[str] = []
    async for r in refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    ):
        names += [svc.name for svc in r.list_services_response.service]
    assert "modelbroker.v1.ModelBroker" in names and "grpc.health.v1.Health" in names


@pytest.mark.parametrize(
    "method", ["/modelbroker.v1.ModelBroker/NoSuchMethod", "/modelbroker.v1.Elsewhere/Complete"]
)
async def test_unknown_methods_are_unimplemented_with_or_without_a_key(authed, method) -> None:
    """The gate lives in the handlers the guard mounts: a method with none is grpc's
    UNIMPLEMENTED, keyed or not, never UNAUTHENTICATED."""
    _, ch = authed
    call = ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    for metadata in ((), bearer(KEY_A)):
        err = await refused(call(b"", metadata=metadata, timeout=10))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_request_rate_limit_refuses_with_retry_info_then_recovers(upstream, daemon, channel_to) -> None:
    # 30/minute refills one request every 2 s; a burst of 2 lets two through at once.
    limited = key("team-a", KEY_A, requests_per_minute=30, burst=2)
    settings = broker_settings(providers(upstream.url), auth={"keys": [limited, key("admin", KEY_ADMIN)]})
    s, _ = await start(daemon, channel_to, settings)
    results = await asyncio.gather(
        *(s.Complete(complete_req(), timeout=10, metadata=bearer(KEY_A)) for _ in range(3)),
        return_exceptions=True,
    )
    errs = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(results) - len(errs) == 2, results
    assert len(errs) == 1 and errs[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, delay = error_info(errs[0])
    assert info.reason == "CALLER_RATE_LIMITED" and info.metadata["limit"] == "requests_per_minute"
    assert delay is not None and 0 < delay <= 2.0
    # Other callers have their own budget.
    await s.Complete(complete_req(), timeout=10, metadata=bearer(KEY_ADMIN))
    # Waiting as long as RetryInfo says is enough.
    await asyncio.sleep(delay)
    resp = await s.Complete(complete_req(), timeout=10, metadata=bearer(KEY_A))
    assert resp.provider == "openai"


async def test_token_limit_counts_usage_after_the_request(upstream, daemon, channel_to) -> None:
    # 600/minute refills 10 tokens a second; one answer of 610 tokens leaves the bucket at -10.
    settings = broker_settings(
        providers(upstream.url), auth={"keys": [key("team-a", KEY_A, tokens_per_minute=600)]}
    )
    s, _ = await start(daemon, channel_to, settings)
    upstream.reply = Reply(input_tokens=600, output_tokens=10)
    msgs = await drain(s.StreamComplete(stream_req(), timeout=10, metadata=bearer(KEY_A)))
    assert msgs[-1].end.usage.input_tokens == 600  # admitted: tokens are only known afterwards
    err = await refused(s.Complete(complete_req(), timeout=10, metadata=bearer(KEY_A)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, delay = error_info(err)
    assert info.reason == "CALLER_TOKEN_LIMITED"
    assert delay is not None and 0 < delay <= 1.0
    await asyncio.sleep(delay)
    upstream.reply = Reply(input_tokens=5, output_tokens=1)
    resp = await s.Complete(complete_req(), timeout=10, metadata=bearer(KEY_A))
    assert resp.usage.input_tokens == 5


async def test_per_caller_stream_limit_frees_its_slot_when_the_caller_cancels(
    upstream, daemon, channel_to
) -> None:
    settings = broker_settings(
        providers(upstream.url),
        auth={"keys": [key("team-a", KEY_A, max_concurrent_streams=1), key("admin", KEY_ADMIN)]},
    )
    s, _ = await start(daemon, channel_to, settings)
    upstream.faults.append(Fault("stall_mid_stream", after_chunks=1, seconds=8))
    first = s.StreamComplete(stream_req(), timeout=10, metadata=bearer(KEY_A))
    assert (await first.read()).HasField("start")  # in flight, stalled upstream

    err = await refused(s.Complete(complete_req(), timeout=10, metadata=bearer(KEY_A)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, delay = error_info(err)
    assert info.reason == "CALLER_TOO_MANY_STREAMS" and delay is not None
    await s.Complete(complete_req(), timeout=10, metadata=bearer(KEY_ADMIN))  # not admin's limit

    first.cancel()
    # The daemon frees the slot when it sees the cancellation: a bounded wait for that event.
    for _ in range(50):
        try:
            resp = await s.Complete(complete_req(), timeout=10, metadata=bearer(KEY_A))
            break
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the cancelled stream's slot was never freed")
    assert resp.provider == "openai"


async def test_daemon_stream_cap_refuses_but_health_still_answers(upstream, daemon, channel_to) -> None:
    settings = broker_settings(providers(upstream.url), server={"max_concurrent_streams": 1})
    s, ch = await start(daemon, channel_to, settings)  # auth off: the cap applies to everyone
    upstream.faults.append(Fault("stall_mid_stream", after_chunks=1, seconds=8))
    first = s.StreamComplete(stream_req(), timeout=10)
    assert (await first.read()).HasField("start")
    err = await refused(s.Complete(complete_req(), timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, delay = error_info(err)
    assert info.reason == "BROKER_OVERLOADED" and delay is not None
    assert "max_concurrent_streams" in (err.details() or "")
    health = health_pb2_grpc.HealthStub(ch)
    for service in ("", "modelbroker.v1.ModelBroker"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    first.cancel()


async def test_message_over_the_size_limit_gets_a_clear_status(upstream, daemon, channel_to) -> None:
    # The transport limit is server.max_message_bytes plus 1 MiB of envelope.
    settings = broker_settings(providers(upstream.url), server={"max_message_bytes": 4096})
    s, _ = await start(daemon, channel_to, settings)
    before = chat_calls(upstream)
    huge = complete_req()
    huge.messages[0].content[0].text = "x" * (2 * 1024 * 1024)
    err = await refused(s.Complete(huge, timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (err.details() or "")
    # Under the transport limit but over max_message_bytes: the field is named.
    big = complete_req()
    big.messages[0].content[0].text = "x" * 8192
    err = await refused(s.Complete(big, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].content" in (err.details() or "")
    assert chat_calls(upstream) == before


async def test_log_lines_carry_the_caller_name_and_never_the_key(authed) -> None:
    s, _ = authed
    with structlog.testing.capture_logs() as logs:
        await s.Complete(complete_req(), timeout=10, metadata=bearer(KEY_A))
        await refused(s.Complete(complete_req(), timeout=10, metadata=bearer(KEY_A + "x")))
        await refused(s.Complete(complete_req("other/gpt-4o-mini"), timeout=10, metadata=bearer(KEY_A)))
    requests = [e for e in logs if e["event"] == "request"]
    assert [(e["caller"], e["status"]) for e in requests] == [
        ("team-a", "OK"),
        ("team-a", "PERMISSION_DENIED"),
    ]
    refusals = [e for e in logs if e["event"] == "request_refused"]
    assert [(e["caller"], e["reason"]) for e in refusals] == [("", "API_KEY_INVALID")]
    assert KEY_A not in repr(logs)
