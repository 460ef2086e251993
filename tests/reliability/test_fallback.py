"""Fallback chains: named groups in config and per request; what moves on and what never does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import structlog

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply
from tests.reliability.conftest import (
    FAST_ROUTING,
    openai_provider,
    refused_url,
    settled,
    stream,
    stub,
    unary,
    user,
)


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeAnthropic]]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as openai, FakeAnthropic() as anthropic:
        anthropic.reply = Reply(text_chunks=["Claude ", "here."])
        yield openai, anthropic


@pytest.fixture
async def broker(fakes, daemon, channel_to):
    openai, anthropic = fakes
    settings = broker_settings(
        [
            openai_provider("openai", openai.url, priority=10),
            {"name": "claude", "type": "anthropic", "base_url": anthropic.url, "api_key": anthropic.api_key},
            openai_provider("off", "http://127.0.0.1:1/v1", enabled=False),
        ],
        routing=FAST_ROUTING,
        aliases={
            # A group: tried in order; a member whose provider is disabled is skipped.
            "smart": ["off/gpt-4o", "openai/gpt-4o-mini", "claude/claude-haiku-4-5"],
            "fast": "smart",
        },
    )
    server, target = await daemon(settings)
    return server, stub(channel_to(target))


async def test_a_group_falls_back_across_vendors_before_the_first_token(broker, fakes) -> None:
    server, s = broker
    openai, anthropic = fakes
    for ref in ("smart", "fast"):
        for kind in ("unary", "stream"):
            openai.faults[:] = [Fault("status", status=503)] * 2  # both attempts at the first member
            before = set(asyncio.all_tasks())
            if kind == "unary":
                out = await unary(s, pb.CompleteRequest(model=ref, messages=[user("hi")]))
            else:
                out = await stream(s, pb.StreamCompleteRequest(model=ref, messages=[user("hi")]))
                assert out.messages[0].start.provider == "claude", "Start names the model that answers"
            assert (out.status, out.provider, out.model, out.text) == (
                "OK",
                "claude",
                "claude-haiku-4-5",
                "Claude here.",
            )
            assert await settled(server, before) == []
    assert len(anthropic.message_bodies) == 4


async def test_a_healthy_first_member_answers_alone(broker, fakes) -> None:
    _, s = broker
    _, anthropic = fakes
    out = await stream(s, pb.StreamCompleteRequest(model="smart", messages=[user("hi")]))
    assert (out.status, out.provider, out.text) == ("OK", "openai", "Hello there!")
    assert anthropic.message_bodies == []


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (Fault("status", status=400), "INVALID_ARGUMENT UPSTREAM_INVALID_REQUEST"),
        (
            Fault("status", status=400, error_type="context_length_exceeded"),
            "INVALID_ARGUMENT CONTEXT_LENGTH_EXCEEDED",
        ),
        (
            Fault("status", status=400, message="rejected by our content_policy"),
            "INVALID_ARGUMENT CONTENT_FILTERED",
        ),
    ],
    ids=["400", "context length", "content policy"],
)
async def test_the_callers_own_errors_never_fall_back(broker, fakes, fault: Fault, status: str) -> None:
    _, s = broker
    openai, anthropic = fakes
    openai.faults.append(fault)
    out = await unary(s, pb.CompleteRequest(model="smart", messages=[user("hi")]))
    assert out.status == status
    assert len(openai.chat_bodies) == 1, "not retried either"
    assert anthropic.message_bodies == [], "another model would reject it the same way"


async def test_per_request_fallbacks_follow_the_model(broker, fakes) -> None:
    _, s = broker
    openai, _ = fakes
    openai.faults[:] = [Fault("status", status=500)] * 2
    r = pb.StreamCompleteRequest(
        model="openai/gpt-4o-mini", messages=[user("hi")], fallback_models=["claude/claude-sonnet-4-5"]
    )
    out = await stream(s, r)
    assert (out.status, out.provider, out.model) == ("OK", "claude", "claude-sonnet-4-5")


async def test_when_every_candidate_fails_the_error_lists_the_attempts(broker, fakes) -> None:
    _, s = broker
    openai, anthropic = fakes
    openai.faults[:] = [Fault("status", status=500)] * 2
    anthropic.faults[:] = [Fault("status", status=529)] * 2
    out = await unary(s, pb.CompleteRequest(model="smart", messages=[user("hi")]))
    assert out.status == "UNAVAILABLE UPSTREAM_UNAVAILABLE"
    assert out.metadata["provider"] == "claude", "the last failure is the one reported"
    assert out.metadata["attempts"] == (
        "openai/gpt-4o-mini: UPSTREAM_UNAVAILABLE, openai/gpt-4o-mini: UPSTREAM_UNAVAILABLE, "
        "claude/claude-haiku-4-5: UPSTREAM_UNAVAILABLE, claude/claude-haiku-4-5: UPSTREAM_UNAVAILABLE"
    )


async def test_after_the_first_token_a_stream_is_never_spliced(broker, fakes) -> None:
    server, s = broker
    openai, anthropic = fakes
    openai.reply = Reply(text_chunks=["one ", "two ", "three"])
    openai.faults.append(Fault("disconnect_mid_stream", after_chunks=2))
    before = set(asyncio.all_tasks())
    out = await stream(s, pb.StreamCompleteRequest(model="smart", messages=[user("count")]))
    assert out.status == "UNAVAILABLE STREAM_INTERRUPTED"
    assert out.text == "one two ", "what the caller got came from one model only"
    assert anthropic.message_bodies == [] and len(openai.chat_bodies) == 1
    assert out.metadata["provider"] == "openai" and out.metadata["cause"] == "UPSTREAM_UNAVAILABLE"
    assert (out.metadata["delivered_chunks"], out.metadata["delivered_text_chars"]) == ("2", "8")
    assert await settled(server, before) == []


async def test_a_failed_attempts_cause_is_logged_never_sent(daemon, channel_to) -> None:
    """The exception under an upstream failure goes to the log (debug, redacted), and the
    caller's status says what the BrokerError says, nothing of the cause."""
    settings = broker_settings(
        [openai_provider("gone", refused_url())],
        routing=FAST_ROUTING,
    )
    _, target = await daemon(settings)
    s = stub(channel_to(target))
    with structlog.testing.capture_logs() as logs:
        err = None
        try:
            await s.Complete(pb.CompleteRequest(model="gone/gpt-4o-mini", messages=[user("hi")]), timeout=10)
        except grpc.aio.AioRpcError as exc:
            err = exc
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
    failed = [e for e in logs if e["event"] == "attempt_failed"]
    assert failed and all(e["log_level"] == "debug" for e in failed), logs
    assert failed[0]["reason"] == "UPSTREAM_UNAVAILABLE" and failed[0]["provider"] == "gone"
    assert "Traceback" in failed[0]["exception"] and "Error" in failed[0]["exception"]
    assert "Traceback" not in (err.details() or "") and "aiohttp" not in (err.details() or "")
