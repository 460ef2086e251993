"""x-request-id in the trailers of every RPC outcome (issue 11, item 6).

The auth gate gives each ModelBroker RPC its id before the servicer runs: the caller's
`x-request-id` when it is 1-128 of [A-Za-z0-9._:-] (used, echoed in the trailers, in the
body of completions and in the log line), else a fresh 32-hex id (an invalid one is
ignored, not refused). Checked here for stream errors before and after the first
message (the StreamComplete handler relays through a task of its own, which once lost the
id), unary errors, refusals by the auth gate, and the other RPCs.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import grpc
import pytest
import structlog

from broker.auth import hash_key, request_id_for
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings, stub
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply

FRESH = re.compile(r"[0-9a-f]{32}")
CALLER_KEY = "mb_request-id-test-caller-key-0001"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        yield fake


def provider(url: str) -> dict[str, Any]:
    return {"name": "openai", "type": "openai", "base_url": url, "api_key": OPENAI_TEST_KEY}


@pytest.fixture
async def s(upstream, daemon, channel_to):
    _, target = await daemon(broker_settings([provider(upstream.url)]))
    return stub(channel_to(target))


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def rid(value: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", value),)


def trailer_id(md: Any) -> str:
    ids = [v for k, v in md or () if k == "x-request-id"]
    assert len(ids) == 1, f"expected one x-request-id trailer, got {ids}"
    return str(ids[0])


async def stream_error(call: Any) -> tuple[list[pb.StreamCompleteResponse], grpc.aio.AioRpcError]:
    got: list[pb.StreamCompleteResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for m in call:
            got.append(m)
    return got, e.value


def request_lines(logs: list[MutableMapping[str, Any]]) -> dict[str, MutableMapping[str, Any]]:
    return {e["request_id"]: e for e in logs if e["event"] == "request"}


async def test_stream_error_before_the_first_message_carries_the_callers_id(s) -> None:
    with structlog.testing.capture_logs() as logs:
        got, err = await stream_error(
            s.StreamComplete(
                pb.StreamCompleteRequest(model="no-such-model", messages=[user("hi")]),
                timeout=10,
                metadata=rid("stream-err-1"),
            )
        )
    assert got == [] and err.code() == grpc.StatusCode.NOT_FOUND
    assert trailer_id(err.trailing_metadata()) == "stream-err-1"
    assert request_lines(logs)["stream-err-1"]["status"] == "NOT_FOUND"


async def test_stream_error_after_content_carries_the_id_of_its_start(s, upstream) -> None:
    upstream.reply = Reply(text_chunks=["a ", "b ", "c ", "d "])
    upstream.faults.append(Fault("disconnect_mid_stream", after_chunks=2))
    with structlog.testing.capture_logs() as logs:
        got, err = await stream_error(
            s.StreamComplete(
                pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]),
                timeout=10,
                metadata=rid("caller:chosen-id.2"),
            )
        )
    assert got[0].start.request_id == "caller:chosen-id.2"
    assert any(m.HasField("text_delta") for m in got)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert trailer_id(err.trailing_metadata()) == "caller:chosen-id.2"
    assert request_lines(logs)["caller:chosen-id.2"]["reason"] == "STREAM_INTERRUPTED"


async def test_stream_error_without_a_caller_id_gets_a_fresh_one_that_the_log_names(s) -> None:
    with structlog.testing.capture_logs() as logs:
        _, err = await stream_error(
            s.StreamComplete(
                pb.StreamCompleteRequest(model="no-such-model", messages=[user("x")]), timeout=10
            )
        )
    fresh = trailer_id(err.trailing_metadata())
    assert FRESH.fullmatch(fresh)
    assert fresh in request_lines(logs)


def test_request_id_rule() -> None:
    assert request_id_for([("x-request-id", "A-z_0.9:x")]) == "A-z_0.9:x"
    assert request_id_for([("x-request-id", "x" * 128)]) == "x" * 128
    # `$` would match before a trailing newline: the rule is a full match.
    for bad in ["", "a b", "ok\n", "x" * 129, "semi;colon", "ümlaut", "a/b"]:
        assert FRESH.fullmatch(request_id_for([("x-request-id", bad)])), bad
    assert FRESH.fullmatch(request_id_for(None))


def test_fresh_ids_are_uuid4_hex_as_before() -> None:
    ids = {request_id_for(None) for _ in range(2000)}
    assert len(ids) == 2000
    for fresh in ids:
        u = uuid.UUID(hex=fresh)
        assert u.hex == fresh and u.version == 4 and u.variant == uuid.RFC_4122


@pytest.mark.parametrize(
    "bad", ["has space", "x" * 129, "semi;colon", "a/b"], ids=["space", "too-long", "semicolon", "slash"]
)
async def test_an_invalid_caller_id_is_ignored_and_a_fresh_one_used(s, bad: str) -> None:
    call = s.StreamComplete(
        pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]),
        timeout=10,
        metadata=rid(bad),
    )
    msgs = [m async for m in call]
    fresh = msgs[0].start.request_id
    assert FRESH.fullmatch(fresh) and fresh != bad
    assert trailer_id(await call.trailing_metadata()) == fresh


async def test_unary_success_and_error_echo_the_callers_id(s) -> None:
    call = s.Complete(
        pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]),
        timeout=10,
        metadata=rid("u-ok"),
    )
    resp = await call
    assert resp.request_id == "u-ok" and trailer_id(await call.trailing_metadata()) == "u-ok"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.Complete(
            pb.CompleteRequest(model="no-such-model", messages=[user("hi")]),
            timeout=10,
            metadata=rid("u-err"),
        )
    assert trailer_id(e.value.trailing_metadata()) == "u-err"


async def test_every_other_rpc_outcome_has_an_id(s) -> None:
    call = s.ListModels(pb.ListModelsRequest(), timeout=10, metadata=rid("list-1"))
    await call
    assert trailer_id(await call.trailing_metadata()) == "list-1"
    call = s.ListProviders(pb.ListProvidersRequest(), timeout=10)
    await call
    assert FRESH.fullmatch(trailer_id(await call.trailing_metadata()))
    for rpc, req in [
        (s.ListModels, pb.ListModelsRequest(provider="nope")),
        (s.GetModel, pb.GetModelRequest(model="no-such-model")),
        (s.SelectModel, pb.SelectModelRequest(requirements=pb.Requirements(min_context_window=10**9))),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rpc(req, timeout=10, metadata=rid("other-err"))
        assert trailer_id(e.value.trailing_metadata()) == "other-err", rpc


async def test_refusals_by_the_auth_interceptor_carry_the_id(upstream, daemon, channel_to) -> None:
    settings = broker_settings(
        [provider(upstream.url)], auth={"keys": [{"name": "team-a", "sha256": hash_key(CALLER_KEY)}]}
    )
    _, target = await daemon(settings)
    s = stub(channel_to(target))
    with structlog.testing.capture_logs() as logs:
        for rpc, req in [
            (s.StreamComplete, pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")])),
            (s.Complete, pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")])),
            (s.ListModels, pb.ListModelsRequest()),
        ]:
            call = rpc(req, timeout=10, metadata=(*rid("no-key-1"), ("authorization", "Bearer wrong")))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                if hasattr(call, "__aiter__"):
                    async for _ in call:
                        pass
                else:
                    await call
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert trailer_id(e.value.trailing_metadata()) == "no-key-1"
    refusals = [x for x in logs if x["event"] == "request_refused"]
    assert len(refusals) == 3 and all(x["request_id"] == "no-key-1" for x in refusals)
