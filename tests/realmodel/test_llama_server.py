"""The daemon in front of a real OpenAI-compatible server nobody here wrote: llama-cpp-python's
`llama_cpp.server` serving Gemma 3 270M on loopback (see conftest.py; `make test-real-model`).

Streaming, unary, and what the caller going away does to the generation: cancelling a
stream or letting its deadline pass must stop the model, not just the relay. Observed three
ways on the server itself: it logs "Disconnected from client" (llama_cpp.server prints it only
when it drops a generation whose client went away), its CPU time stops growing, and a next
request, which this server queues behind the one in flight (`--interrupt_requests false`), is
answered in seconds rather than after the ~45 s the cancelled 1,500 tokens would have taken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import broker_settings, stub
from tests.realmodel.conftest import MODEL, PROVIDER, LlamaServer

pytestmark = pytest.mark.real_model

REF = f"{PROVIDER}/{MODEL}"
# Gemma 3 270M on 2 shared cores: ~35 tokens/s, so this is ~45 s of generation if nobody stops it.
LONG = 1500
DISCONNECT_LINE = "Disconnected from client (via refresh/close)"


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def params(max_tokens: int) -> pb.GenerationParams:
    return pb.GenerationParams(max_tokens=max_tokens, temperature=0.0, seed=7)


@pytest.fixture
async def broker(llama_server: LlamaServer, daemon, channel_to) -> AsyncIterator[Any]:
    provider = {"name": PROVIDER, "type": "openai", "base_url": llama_server.base_url}
    # A slow health loop: every check is a GET /v1/models on the model server's event loop.
    settings = broker_settings([provider], health={"interval_seconds": 30, "timeout_seconds": 5})
    _, target = await daemon(settings)
    yield stub(channel_to(target))


def assert_estimated(usage: pb.Usage) -> None:
    """llama_cpp.server sends no usage chunk in a stream despite stream_options.include_usage,
    and the daemon always streams from the upstream (unary too): the counts are the broker's
    estimate, and must say so, and be an estimate rather than zeros."""
    assert usage.estimated, usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0, usage


async def test_stream_complete_streams_text_and_ends(broker) -> None:
    req = pb.StreamCompleteRequest(model=REF, messages=[user("Say hello in French.")], params=params(16))
    msgs = [m async for m in broker.StreamComplete(req, timeout=60)]
    kinds = [m.WhichOneof("event") for m in msgs]
    assert kinds[0] == "start" and kinds[-1] == "end", kinds
    assert msgs[0].start.provider == PROVIDER and msgs[0].start.model == MODEL
    deltas = [m.text_delta.text for m in msgs if m.WhichOneof("event") == "text_delta"]
    assert len(deltas) >= 2, kinds  # streamed, not one lump
    assert "".join(deltas).strip()
    end = msgs[-1].end
    # The server sends finish_reason "length" on the last content chunk: 16 tokens are reached.
    assert end.finish_reason == pb.FINISH_REASON_LENGTH, end
    assert_estimated(end.usage)
    assert not end.cost.known  # a local server has no price


async def test_complete_unary_respects_max_tokens(broker) -> None:
    req = pb.CompleteRequest(model=REF, messages=[user("Name three colours.")], params=params(8))
    t0 = time.monotonic()
    resp = await broker.Complete(req, timeout=60)
    took = time.monotonic() - t0
    assert resp.provider == PROVIDER and resp.model == MODEL
    text = "".join(p.text for p in resp.message.content)
    assert text.strip()
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert_estimated(resp.usage)
    # The limit reached the server under a name it honours (llama.cpp ignores
    # max_completion_tokens): 8 tokens are a few words and well under a second of generation;
    # without the limit this base model runs on to n_ctx (2,048 tokens, about a minute).
    assert len(text) < 120, text
    assert took < 20, f"{took:.1f}s for 8 tokens"


async def cpu_rate(server: LlamaServer, seconds: float = 1.0) -> float:
    """The server's CPU seconds per wall second over the next `seconds`."""
    c0, t0 = server.cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    return (server.cpu_seconds() - c0) / (time.monotonic() - t0)


async def wait_disconnects(server: LlamaServer, count: int, within: float) -> float:
    start = time.monotonic()
    while server.log_text().count(DISCONNECT_LINE) < count:
        if time.monotonic() - start > within:
            tail = server.log_text()[-2000:]
            raise AssertionError(f"llama_cpp.server did not log a disconnect within {within}s:\n{tail}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def assert_generation_stopped(
    broker: Any, server: LlamaServer, before: int, *, name: str, busy: float | None = None
) -> None:
    seen = await wait_disconnects(server, before + 1, within=10)
    idle = await cpu_rate(server)
    # The next request waits for the model lock: prompt answers prove nothing still generates.
    t0 = time.monotonic()
    resp = await broker.Complete(
        pb.CompleteRequest(model=REF, messages=[user("Hi")], params=params(4)), timeout=30
    )
    served = time.monotonic() - t0
    print(
        f"\n{name}: server logged the disconnect {seen * 1000:.0f} ms after the caller left; "
        f"CPU {'' if busy is None else f'{busy:.2f} s/s while generating, '}{idle:.2f} s/s afterwards; "
        f"next request answered in {served:.2f} s"
    )
    assert idle < 0.15, f"the model server still burns {idle:.2f} CPU s/s after the caller left"
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH  # its own 4 tokens, then done
    assert served < 15, f"the next request waited {served:.1f}s: the cancelled generation kept the model"


async def test_cancel_mid_stream_stops_the_model(broker, llama_server: LlamaServer) -> None:
    before = llama_server.log_text().count(DISCONNECT_LINE)
    req = pb.StreamCompleteRequest(
        model=REF, messages=[user("Write a very long story about a dragon.")], params=params(LONG)
    )
    call = broker.StreamComplete(req, timeout=120)
    deltas = 0
    async for m in call:
        if m.WhichOneof("event") == "text_delta":
            deltas += 1
            if deltas == 5:
                break
    assert deltas == 5
    busy = await cpu_rate(llama_server)  # still streaming into the daemon: generation runs
    assert busy > 0.25, f"expected the model to be generating, CPU {busy:.2f} s/s"
    call.cancel()
    await assert_generation_stopped(broker, llama_server, before, name="cancel", busy=busy)


async def test_deadline_mid_stream_stops_the_model(broker, llama_server: LlamaServer) -> None:
    before = llama_server.log_text().count(DISCONNECT_LINE)
    req = pb.StreamCompleteRequest(
        model=REF, messages=[user("Write a very long story about a castle.")], params=params(LONG)
    )
    deltas = 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for m in broker.StreamComplete(req, timeout=6):
            if m.WhichOneof("event") == "text_delta":
                deltas += 1
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    assert deltas > 0, "the deadline should pass mid-stream, after some text"
    await assert_generation_stopped(broker, llama_server, before, name="deadline")
