"""Traces as a collector receives them: a real daemon in front of fake upstreams, exporting over
OTLP/gRPC to a real receiver on loopback (tests/otlp.py).

What a user checks: the caller's trace id and parent, one server span per RPC, one client
span per upstream attempt (retries and fallbacks as siblings), the GenAI attributes, and no
prompt or answer text unless `tracing.capture_content` is set.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from broker.config import ConfigError, TracingConfig
from broker.tracing import setup
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import FAST_ROUTING, OPENAI_TEST_KEY, broker_settings, stub
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply
from tests.otlp import OTLPReceiver, ReceivedSpan

PROMPT = "What is the secret word of the tracing test?"
ANSWER = ["The word ", "is ", "marmalade."]
CALLER_KEY = "mb_tracing_test_key_8c1f0e6a2b9d4c7e"


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


@pytest.fixture
async def otlp() -> AsyncIterator[OTLPReceiver]:
    async with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeAnthropic]]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as openai, FakeAnthropic() as anthropic:
        openai.reply = Reply(text_chunks=ANSWER, input_tokens=21, output_tokens=7)
        anthropic.reply = Reply(text_chunks=["Claude ", "here."], input_tokens=9, output_tokens=3)
        yield openai, anthropic


def settings_for(otlp: OTLPReceiver, fakes: tuple[FakeOpenAI, FakeAnthropic], **tracing: Any) -> Any:
    from broker.auth import hash_key

    openai, anthropic = fakes
    return broker_settings(
        [
            # catalog_prices: the fake stands in for the vendor, so the catalogue's prices apply.
            {
                "name": "openai",
                "type": "openai",
                "base_url": openai.url,
                "api_key": OPENAI_TEST_KEY,
                "priority": 10,
                "catalog_prices": True,
            },
            {"name": "claude", "type": "anthropic", "base_url": anthropic.url, "api_key": anthropic.api_key},
        ],
        routing=FAST_ROUTING,
        aliases={"smart": ["openai/gpt-4o-mini", "claude/claude-haiku-4-5"]},
        auth={"keys": [{"name": "team-tracing", "sha256": hash_key(CALLER_KEY)}]},
        tracing={"enabled": True, "endpoint": otlp.endpoint, **tracing},
    )


def metadata(tp: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {CALLER_KEY}"), ("traceparent", tp), *extra.items())


async def flushed(server: Any, otlp: OTLPReceiver, trace_id: str, count: int) -> list[ReceivedSpan]:
    """The spans of `trace_id` once `count` of them have arrived (the exporter is flushed first)."""
    assert server.tracing is not None
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    # A span can end just after a flush (a cancelled stream notices at its next await): flush again.
    while len(otlp.in_trace(trace_id)) < count:
        assert loop.time() < end, f"only {otlp.in_trace(trace_id)} arrived"
        await asyncio.to_thread(server.tracing.force_flush)
        await asyncio.sleep(0.02)
    return sorted(otlp.in_trace(trace_id), key=lambda s: s.start_ns)


def values(spans: list[ReceivedSpan]) -> str:
    return repr([sorted(s.attributes.items()) for s in spans])


async def test_a_stream_is_a_server_span_under_the_callers_trace_with_one_client_span(
    otlp, fakes, daemon, channel_to
) -> None:
    server, target = await daemon(settings_for(otlp, fakes))
    tp, trace_id, caller_span = traceparent()
    request = pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user(PROMPT)])
    md = metadata(tp, baggage="tenant=acme,plan=gold")
    text = "".join(
        [m.text_delta.text async for m in stub(channel_to(target)).StreamComplete(request, metadata=md)]
    )
    assert text == "".join(ANSWER)

    rpc, chat = await flushed(server, otlp, trace_id, 2)
    print(f"\ncaller's traceparent {tp}; the trace as the OTLP receiver got it:")  # pytest -s
    for span in (rpc, chat):
        print(json.dumps(span.brief()))
    assert (rpc.name, rpc.kind, rpc.parent_span_id) == (
        "modelbroker.v1.ModelBroker/StreamComplete",
        "SERVER",
        caller_span,
    )
    assert (chat.name, chat.kind, chat.parent_span_id) == ("chat gpt-4o-mini", "CLIENT", rpc.span_id)
    assert rpc.start_ns <= chat.start_ns and chat.end_ns <= rpc.end_ns
    assert rpc.resource["service.name"] == "model-broker"
    a = rpc.attributes
    assert (a["rpc.system"], a["rpc.service"], a["rpc.method"], a["rpc.grpc.status_code"]) == (
        "grpc",
        "modelbroker.v1.ModelBroker",
        "StreamComplete",
        0,
    )
    assert (a["modelbroker.caller"], a["modelbroker.provider"], a["modelbroker.attempts"]) == (
        "team-tracing",
        "openai",
        1,
    )
    assert (a["gen_ai.request.model"], a["gen_ai.response.model"]) == ("openai/gpt-4o-mini", "gpt-4o-mini")
    assert (a["baggage.tenant"], a["baggage.plan"]) == ("acme", "gold")
    assert len(a["modelbroker.request_id"]) == 32
    c = chat.attributes
    assert c["gen_ai.operation.name"] == "chat"
    assert (c["gen_ai.system"], c["gen_ai.request.model"], c["gen_ai.response.model"]) == (
        "openai",
        "gpt-4o-mini",
        "gpt-4o-mini",
    )
    assert (c["gen_ai.usage.input_tokens"], c["gen_ai.usage.output_tokens"]) == (21, 7)
    assert c["gen_ai.response.finish_reasons"] == ["stop"]
    assert (c["modelbroker.provider"], c["modelbroker.attempt"], c["server.address"]) == (
        "openai",
        1,
        "127.0.0.1",
    )
    # gpt-4o-mini at the catalogue's price: 21 in, 7 out -> a known, positive cost in micro-USD.
    assert (
        c["modelbroker.cost_micro_usd"] > 0
        and a["modelbroker.cost_micro_usd"] == c["modelbroker.cost_micro_usd"]
    )
    assert chat.status == "UNSET" and rpc.status == "UNSET"
    # Without capture_content no prompt or answer text anywhere, and no key.
    for secret in (PROMPT, "marmalade", CALLER_KEY, OPENAI_TEST_KEY):
        assert secret not in values([rpc, chat])


async def test_retries_and_a_fallback_are_sibling_attempt_spans(otlp, fakes, daemon, channel_to) -> None:
    server, target = await daemon(settings_for(otlp, fakes))
    openai, _ = fakes
    openai.faults[:] = [Fault("status", status=503)] * 2  # both attempts at the first member
    tp, trace_id, _ = traceparent()
    response = await stub(channel_to(target)).Complete(
        pb.CompleteRequest(model="smart", messages=[user("hi")]), metadata=metadata(tp)
    )
    assert response.provider == "claude"

    rpc, *attempts = await flushed(server, otlp, trace_id, 4)
    print("\nthe trace as the OTLP receiver got it:")  # for a closing note (pytest -s)
    for span in (rpc, *attempts):
        print(json.dumps(span.brief()))
    assert rpc.kind == "SERVER" and rpc.name == "modelbroker.v1.ModelBroker/Complete"
    assert [s.parent_span_id for s in attempts] == [rpc.span_id] * 3, "siblings under the server span"
    assert [(s.name, s.attributes["modelbroker.provider"]) for s in attempts] == [
        ("chat gpt-4o-mini", "openai"),
        ("chat gpt-4o-mini", "openai"),
        ("chat claude-haiku-4-5", "claude"),
    ]
    assert [s.attributes["modelbroker.attempt"] for s in attempts] == [1, 2, 3]
    assert [s.attributes["modelbroker.target_attempt"] for s in attempts] == [1, 2, 1]
    assert [s.status for s in attempts] == ["ERROR", "ERROR", "UNSET"]
    assert [s.attributes.get("error.type") for s in attempts] == ["UPSTREAM_UNAVAILABLE"] * 2 + [None]
    assert attempts[2].attributes["gen_ai.system"] == "anthropic"
    assert (
        attempts[2].attributes["gen_ai.usage.input_tokens"],
        attempts[2].attributes["gen_ai.usage.output_tokens"],
    ) == (9, 3)
    assert rpc.attributes["modelbroker.attempts"] == 3
    assert rpc.attributes["gen_ai.request.model"] == "smart"
    assert rpc.attributes["gen_ai.response.model"] == "claude-haiku-4-5"


async def test_refused_and_failed_calls_are_traced_with_their_status(otlp, fakes, daemon, channel_to) -> None:
    server, target = await daemon(settings_for(otlp, fakes))
    s = stub(channel_to(target))
    tp, refused_trace, _ = traceparent()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await s.Complete(
            pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]),
            metadata=(("traceparent", tp), ("authorization", "Bearer mb_wrong_key_000000000000000000")),
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    tp2, missing_trace, _ = traceparent()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await s.Complete(pb.CompleteRequest(model="nope/none", messages=[user("hi")]), metadata=metadata(tp2))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    [span] = await flushed(server, otlp, refused_trace, 1)
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert span.status == "UNSET", "a caller's error is not the server's (OpenTelemetry RPC conventions)"
    [span] = await flushed(server, otlp, missing_trace, 1)
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.attributes["error.type"] == "MODEL_NOT_FOUND"

    # An upstream that stays down is the server's failure: ERROR, with the reason.
    openai, _ = fakes
    openai.faults[:] = [Fault("status", status=503)] * 2
    tp3, down_trace, _ = traceparent()
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await s.Complete(
            pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]), metadata=metadata(tp3)
        )
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    rpc, *attempts = await flushed(server, otlp, down_trace, 3)
    assert rpc.status == "ERROR" and rpc.attributes["error.type"] == "UPSTREAM_UNAVAILABLE"
    assert [a.status for a in attempts] == ["ERROR", "ERROR"]


async def test_capture_content_puts_prompt_and_answer_on_the_attempt_span(
    otlp, fakes, daemon, channel_to
) -> None:
    server, target = await daemon(settings_for(otlp, fakes, capture_content=True))
    tp, trace_id, _ = traceparent()
    request = pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user(PROMPT)])
    async for _ in stub(channel_to(target)).StreamComplete(request, metadata=metadata(tp)):
        pass
    _, chat = await flushed(server, otlp, trace_id, 2)
    assert PROMPT in chat.attributes["gen_ai.input.messages"]
    assert '"content":"The word is marmalade."' in chat.attributes["gen_ai.output.messages"]


async def test_embed_has_an_embeddings_attempt_span(otlp, fakes, daemon, channel_to) -> None:
    server, target = await daemon(settings_for(otlp, fakes))
    tp, trace_id, _ = traceparent()
    await stub(channel_to(target)).Embed(
        pb.EmbedRequest(model="openai/text-embedding-3-small", inputs=["one", "two"]), metadata=metadata(tp)
    )
    rpc, emb = await flushed(server, otlp, trace_id, 2)
    assert (rpc.name, emb.name, emb.parent_span_id) == (
        "modelbroker.v1.ModelBroker/Embed",
        "embeddings text-embedding-3-small",
        rpc.span_id,
    )
    assert emb.attributes["gen_ai.operation.name"] == "embeddings"
    assert emb.attributes["gen_ai.usage.input_tokens"] > 0
    assert "gen_ai.response.finish_reasons" not in emb.attributes


def test_tracing_is_off_unless_asked_and_the_standard_variables_decide() -> None:
    off, on = TracingConfig(), TracingConfig(enabled=True, endpoint="http://127.0.0.1:4317")
    assert setup(off, {}) is None
    assert setup(off, {"OTEL_TRACES_EXPORTER": "console"}) is None
    for env, config in (({"OTEL_TRACES_EXPORTER": "otlp"}, off), ({}, on)):
        tracing = setup(config, env)
        assert tracing is not None
        tracing.shutdown()
    # The standard off switches win over the config.
    assert setup(on, {"OTEL_SDK_DISABLED": "true"}) is None
    assert setup(on, {"OTEL_TRACES_EXPORTER": "none"}) is None
    with pytest.raises(ConfigError, match="OTLP over gRPC only"):
        setup(on, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})


async def test_a_stream_the_caller_cancels_ends_both_spans_as_cancelled(
    otlp, fakes, daemon, channel_to
) -> None:
    server, target = await daemon(settings_for(otlp, fakes))
    openai, _ = fakes
    openai.reply = Reply(text_chunks=["a", "b", "c", "d"], chunk_delay=0.5)
    tp, trace_id, _ = traceparent()
    call = stub(channel_to(target)).StreamComplete(
        pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]), metadata=metadata(tp)
    )
    async for m in call:
        if m.HasField("text_delta"):
            call.cancel()
            break
    rpc, chat = await flushed(server, otlp, trace_id, 2)
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert (chat.status, chat.attributes["error.type"]) == ("ERROR", "CancelledError")
