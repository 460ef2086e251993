"""GetUsage, budgets and the unknown-price policy through a real daemon (per-process state), and
`model-broker usage` / `serve`'s warnings as a user meets them.

The shared (Redis) side of the same features is in tests/test_state_replicas.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelbroker.client import AsyncBrokerClient
from modelbroker.v1 import broker_pb2 as pb
from tests.clirun import run_cli, serving
from tests.conftest import Daemon, broker_settings, reason_of, stub
from tests.fakes.openai_upstream import CHAT_PATH, FakeOpenAI
from tests.fakes.script import Fault, Reply
from tests.procs import ServeDaemon, env_without, start_serve, stop, write_config
from tests.state_cluster import ADMIN_KEY, PRICED, UNPRICED, bearer, config, key, secret, user

UPSTREAM_KEY = "sk-test-openai-3f9a7c2e1b0d4e5f"
USD = 1_000_000  # micro-USD


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=UPSTREAM_KEY, models=["priced-model", "unpriced-model"]) as fake:
        fake.reply = Reply(text_chunks=["ok"], input_tokens=3, output_tokens=2)  # $5 at $1/token
        yield fake


def settings(upstream: FakeOpenAI, keys: list[dict[str, Any]], **state: Any) -> Any:
    cfg = config(upstream.url, None, keys, **state)
    return broker_settings(cfg["providers"], auth=cfg["auth"], models=cfg["models"], state=cfg["state"])


async def call(ch: grpc.aio.Channel, who: str, model: str = PRICED) -> str:
    try:
        await stub(ch).Complete(
            pb.CompleteRequest(model=model, messages=[user()]), timeout=10, metadata=bearer(who)
        )
    except grpc.aio.AioRpcError as err:
        return reason_of(err) or err.code().name
    return "OK"


async def usage(ch: grpc.aio.Channel, who: str, *names: str) -> pb.GetUsageResponse:
    resp: pb.GetUsageResponse = await stub(ch).GetUsage(
        pb.GetUsageRequest(key_names=list(names)), timeout=5, metadata=bearer(who)
    )
    return resp


def chat_calls(upstream: FakeOpenAI) -> int:
    return sum(1 for r in upstream.requests if r.path == CHAT_PATH)


async def test_a_key_sees_its_own_usage_and_an_admin_sees_every_key(
    upstream, daemon: Daemon, channel_to
) -> None:
    _, target = await daemon(settings(upstream, [key("team-a", budget_usd_per_day=100), key("team-b")]))
    ch = channel_to(target)
    assert await call(ch, "team-a") == "OK"
    assert await call(ch, "team-a") == "OK"
    own = await usage(ch, "team-a")
    assert [k.name for k in own.keys] == ["team-a"] and own.shared is False
    day = own.keys[0].day
    assert (day.spend_micro_usd, day.requests, day.input_tokens, day.output_tokens) == (10 * USD, 2, 6, 4)
    assert day.budget_micro_usd == 100 * USD and day.budget_left_micro_usd == 90 * USD
    assert own.keys[0].month.spend_micro_usd == 10 * USD and not own.keys[0].month.HasField(
        "budget_micro_usd"
    )
    assert day.reset_time.seconds - day.start_time.seconds == 86_400

    everyone = await usage(ch, "admin")
    assert [k.name for k in everyone.keys] == ["team-a", "team-b", "admin"]  # config order
    assert [k.day.spend_micro_usd for k in everyone.keys] == [10 * USD, 0, 0]
    named = await usage(ch, "admin", "team-b", "team-a", "team-b")
    assert [k.name for k in named.keys] == ["team-a", "team-b"]
    assert [k.name for k in (await usage(ch, "team-b", "team-b")).keys] == ["team-b"]


async def test_usage_refusals_say_what_to_do(upstream, daemon: Daemon, channel_to) -> None:
    _, target = await daemon(settings(upstream, [key("team-a"), key("team-b")]))
    ch = channel_to(target)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await usage(ch, "team-a", "team-b")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and reason_of(e.value) == "USAGE_NOT_PERMITTED"
    assert "only its own usage" in (e.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await usage(ch, "admin", "team-a", "nobody")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(e.value) == [("key_names[1]", "no key named 'nobody' in auth.keys")]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await usage(ch, "admin", "bad name\n")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(e.value)[0][0] == "key_names[0]"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub(ch).GetUsage(pb.GetUsageRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_usage_with_auth_off_is_a_failed_precondition(upstream, daemon: Daemon, channel_to) -> None:
    cfg = config(upstream.url, None, [])
    _, target = await daemon(broker_settings(cfg["providers"], models=cfg["models"]))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub(channel_to(target)).GetUsage(pb.GetUsageRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and reason_of(e.value) == "AUTH_DISABLED"
    assert "auth.keys" in (e.value.details() or "")


def _violations(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    st = rpc_status.from_call(err)
    out = []
    for d in st.details if st is not None else ():
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


async def test_budget_refuses_with_retry_info_and_spend_is_in_metrics(
    upstream, daemon: Daemon, channel_to
) -> None:
    server, target = await daemon(
        settings(upstream, [key("team-a", budget_usd_per_day=12, budget_usd_per_month=100)])
    )
    ch = channel_to(target)
    assert [await call(ch, "team-a") for _ in range(4)] == ["OK", "OK", "OK", "BUDGET_EXCEEDED"]
    before = chat_calls(upstream)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub(ch).Complete(
            pb.CompleteRequest(model=PRICED, messages=[user()]), timeout=5, metadata=bearer("team-a")
        )
    err = e.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert chat_calls(upstream) == before, "a refused call never reaches the upstream"
    st = rpc_status.from_call(err)
    assert st is not None
    details = {d.type_url.rsplit(".", 1)[-1]: d for d in st.details}
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    details["ErrorInfo"].Unpack(info)
    details["RetryInfo"].Unpack(retry)
    assert info.metadata["limit"] == "budget_usd_per_day" and info.metadata["spend_micro_usd"] == str(
        15 * USD
    )
    reset = (await usage(ch, "team-a")).keys[0].day.reset_time.seconds
    assert info.metadata["resets_at"].endswith("T00:00:00Z")
    assert 0 < retry.retry_delay.seconds <= 86_400 and reset > 0
    assert "$15.00 of its $12.00 budget" in (err.details() or "")
    spend = server.metrics.registry.get_sample_value(
        "modelbroker_caller_spend_micro_usd_total", {"caller": "team-a"}
    )
    assert spend == 15 * USD


async def test_unpriced_models_are_refused_to_budgeted_keys_unless_allowed(
    upstream, daemon: Daemon, channel_to
) -> None:
    _, target = await daemon(settings(upstream, [key("budgeted", budget_usd_per_day=5), key("open")]))
    ch = channel_to(target)
    before = chat_calls(upstream)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub(ch).Complete(
            pb.CompleteRequest(model=UNPRICED, messages=[user()]), timeout=5, metadata=bearer("budgeted")
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and reason_of(e.value) == "MODEL_UNPRICED"
    assert "models[]" in (e.value.details() or "") and "state.unpriced: allow" in (e.value.details() or "")
    assert chat_calls(upstream) == before
    assert await call(ch, "open", UNPRICED) == "OK", "a key without a budget is never refused for this"
    assert await call(ch, "budgeted", PRICED) == "OK"

    _, target = await daemon(settings(upstream, [key("budgeted", budget_usd_per_day=5)], unpriced="allow"))
    ch = channel_to(target)
    assert await call(ch, "budgeted", UNPRICED) == "OK"
    day = (await usage(ch, "budgeted")).keys[0].day
    assert (day.spend_micro_usd, day.unpriced_requests, day.requests) == (0, 1, 1)


async def eventually_spent(ch: grpc.aio.Channel, who: str) -> pb.UsageWindow:
    for _ in range(100):
        day = (await usage(ch, who)).keys[0].day
        if day.spend_micro_usd:
            return day
        await asyncio.sleep(0.05)
    raise AssertionError("the request was never charged")


async def test_cancelled_and_interrupted_streams_are_charged_an_estimate(
    upstream, daemon: Daemon, channel_to
) -> None:
    _, target = await daemon(settings(upstream, [key("cancels"), key("breaks")]))
    ch = channel_to(target)
    upstream.reply = Reply(text_chunks=["abcd"] * 50, chunk_delay=0.05)
    stream = stub(ch).StreamComplete(
        pb.StreamCompleteRequest(model=PRICED, messages=[user("hello there")]),
        timeout=10,
        metadata=bearer("cancels"),
    )
    got = [await stream.read() for _ in range(4)]  # start + 3 deltas
    assert got[0].HasField("start")
    stream.cancel()
    day = await eventually_spent(ch, "cancels")
    assert day.requests == 1 and day.output_tokens >= 3 and day.input_tokens >= 1
    assert day.spend_micro_usd == (day.input_tokens + day.output_tokens) * USD  # $1 a token

    upstream.faults.append(Fault("disconnect_mid_stream", after_chunks=2))
    stream = stub(ch).StreamComplete(
        pb.StreamCompleteRequest(model=PRICED, messages=[user("hello there")]),
        timeout=10,
        metadata=bearer("breaks"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in stream:
            pass
    assert reason_of(e.value) == "STREAM_INTERRUPTED"
    day = (await usage(ch, "breaks")).keys[0].day  # charged before the status went out
    assert day.output_tokens == 2 and day.spend_micro_usd == (day.input_tokens + 2) * USD


async def test_python_client_usage(upstream, daemon: Daemon) -> None:
    _, target = await daemon(settings(upstream, [key("team-a", budget_usd_per_month=50)]))
    async with AsyncBrokerClient(target, api_key=secret("team-a")) as client:
        await client.complete(PRICED, "hi")
        resp = await client.usage()
    assert (
        resp.keys[0].month.spend_micro_usd == 5 * USD and resp.keys[0].month.budget_left_micro_usd == 45 * USD
    )


async def test_usage_command_prints_each_key_and_window(upstream, tmp_path: Path) -> None:
    path = write_config(config(upstream.url, None, [key("team-a", budget_usd_per_day=12)]), tmp_path)
    async with serving(path) as (target, _):
        env = env_without("MODEL_BROKER_")
        code, _, err = await run_cli(
            "complete", "--target", target, "--api-key", secret("team-a"), "--model", PRICED, "hi", env=env
        )
        assert code == 0, err
        code, out, err = await run_cli("usage", "--target", target, "--api-key", secret("team-a"), env=env)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:4] == ["KEY", "WINDOW", "SPEND", "$"]
        assert lines[1].split()[:6] == ["team-a", "day", "5.00", "12.00", "7.00", "1"]
        assert lines[2].split()[:6] == ["team-a", "month", "5.00", "-", "-", "1"]
        assert "this daemon process only" in err
        code, out, _ = await run_cli("usage", "--json", "--target", target, "--api-key", ADMIN_KEY, env=env)
        doc = json.loads(out)
        assert [k["name"] for k in doc["keys"]] == ["team-a", "admin"]
        assert (
            doc["keys"][0]["day"]["spend_micro_usd"] == 5 * USD
            and "budget_micro_usd" not in doc["keys"][1]["day"]
        )
        code, _, err = await run_cli(
            "usage", "--key", "admin", "--target", target, "--api-key", secret("team-a"), env=env
        )
        assert code == 1 and "PERMISSION_DENIED" in err and "USAGE_NOT_PERMITTED" in err


async def test_serve_warns_when_workers_would_multiply_limits_without_redis(upstream, tmp_path: Path) -> None:
    path = write_config(
        config(upstream.url, None, [key("team-a", requests_per_minute=60, budget_usd_per_day=1)]), tmp_path
    )
    env = env_without("OPENAI_", "ANTHROPIC_", "OLLAMA_", "MODEL_BROKER_")
    proc = await start_serve(path, "127.0.0.1:0", "--workers", "2", env=env)
    d = ServeDaemon(proc)
    try:
        for _ in range(200):
            if len(d.other) >= 2 or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        text = "\n".join(d.other)
        assert "--workers 2 without state.redis_url" in text and "team-a get up to 2x" in text
        assert "budgets of keys team-a are counted in this process only" in text
    finally:
        await stop(proc, 10)
        await d.close()
