"""Caller limits and budgets held across replicas: three real daemons on one real redis-server.

Each test spreads 4N calls of one key over the three daemons (round robin) and counts what
a caller sees: exactly N admitted, the rest refused with the limit's reason. Budgets: spend
charged on one replica refuses on the others, and is still there after every daemon restarts.
A replica killed with streams open: its slots come free when their lease runs out.

Figures for the closing note are printed (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import reason_of
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.redisproc import (
    RedisProc,
    hang_guard,  # noqa: F401 (a fixture, for pytestmark)
    running_redis,
)
from tests.state_cluster import PRICED, Cluster, Daemon, bearer, config, key, user

pytestmark = pytest.mark.usefixtures("hang_guard")

N = 10  # the limit under test; each test sends 4N calls
LEASE = 1.5  # state.stream_lease_seconds: short, so a dead replica's slots free quickly


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisProc]:
    async with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(
        api_key="sk-test-openai-3f9a7c2e1b0d4e5f", models=["priced-model", "unpriced-model"]
    ) as fake:
        fake.reply = Reply(text_chunks=["ok"], input_tokens=3, output_tokens=2)  # $5 at $1/token
        yield fake


@pytest.fixture
async def cluster(tmp_path: Path, upstream: FakeOpenAI, redis: RedisProc) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, upstream)
    c.configure(
        config(
            upstream.url,
            redis.url,
            [
                key("rpm", requests_per_minute=N),
                key("tpm", tokens_per_minute=600),
                key("streams", max_concurrent_streams=N),
                key("budget", budget_usd_per_day=12),
                key("slots", max_concurrent_streams=2),
            ],
            stream_lease_seconds=LEASE,
        )
    )
    await c.start(3)
    yield c
    await c.close()


def spread(daemons: list[Daemon], i: int) -> Daemon:
    return daemons[i % len(daemons)]


async def test_requests_per_minute_admit_exactly_n_across_three_replicas(cluster: Cluster) -> None:
    # rpm N, burst N: the bucket refills one request per 60/N s, so 4N calls sent at once
    # find exactly N tokens (the calls all land well within that refill time).
    t0 = time.monotonic()
    outcomes = await asyncio.gather(*(spread(cluster.daemons, i).complete("rpm") for i in range(4 * N)))
    elapsed = time.monotonic() - t0
    assert elapsed < 60 / N, f"the calls took {elapsed:.1f}s: a request refilled meanwhile"
    counts = Counter(outcomes)
    print(f"\nrpm {N}, {4 * N} concurrent calls over 3 replicas in {elapsed:.2f}s: {dict(counts)}")
    assert counts == {"OK": N, "CALLER_RATE_LIMITED": 3 * N}
    per_daemon = Counter(spread(cluster.daemons, i).target for i, o in enumerate(outcomes) if o == "OK")
    print(f"admitted per replica: {sorted(per_daemon.values())}")


async def test_tokens_per_minute_hold_across_three_replicas(cluster: Cluster) -> None:
    # Tokens are known only when a call ends, so calls go one after another, round robin:
    # 600 tokens a minute, 250 per call -> 600, 350, 100 left: three admitted, then the
    # bucket is in debt (-150, refilled at 10 tokens/s) and every replica refuses.
    cluster.upstream.reply = Reply(text_chunks=["ok"], input_tokens=200, output_tokens=50)
    outcomes = [await spread(cluster.daemons, i).complete("tpm") for i in range(12)]
    print(f"\ntpm 600, 250 tokens per call, 12 calls one after another over 3 replicas: {outcomes}")
    assert outcomes == ["OK"] * 3 + ["CALLER_TOKEN_LIMITED"] * 9
    # The refusal says when the debt is paid off.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await cluster.daemons[0].stub.Complete(
            pb.CompleteRequest(model=PRICED, messages=[user()]), timeout=5, metadata=bearer("tpm")
        )
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tokens_per_minute (600)" in (exc.value.details() or "")


async def open_stream(d: Daemon, who: str) -> tuple[str, grpc.aio.UnaryStreamCall | None]:
    """("OK", the call still open) once content arrives, or (the refusal's reason, None)."""
    call = d.stub.StreamComplete(
        pb.StreamCompleteRequest(model=PRICED, messages=[user()]), timeout=20, metadata=bearer(who)
    )
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as err:
        return reason_of(err) or err.code().name, None
    assert first != grpc.aio.EOF and first.HasField("start")
    return "OK", call


async def test_concurrent_streams_admit_exactly_n_across_three_replicas(cluster: Cluster) -> None:
    # Streams that stay open (40 chunks, 0.25 s apart) until every call has its answer.
    cluster.upstream.reply = Reply(text_chunks=["x"] * 40, chunk_delay=0.25)
    results = await asyncio.gather(
        *(open_stream(spread(cluster.daemons, i), "streams") for i in range(4 * N))
    )
    counts = Counter(r for r, _ in results)
    print(f"\nmax_concurrent_streams {N}, {4 * N} concurrent streams over 3 replicas: {dict(counts)}")
    assert counts == {"OK": N, "CALLER_TOO_MANY_STREAMS": 3 * N}
    usage = await cluster.daemons[1].usage("admin", "streams")
    assert usage.keys[0].streams_in_flight == N, "every replica's open streams are counted"
    for _, call in results:
        if call is not None:
            call.cancel()
    # Cancelled streams hand their slots back: a new one is admitted at once, on any replica.
    for d in cluster.daemons:
        for _ in range(50):
            outcome, call = await open_stream(d, "streams")
            if outcome == "OK":
                assert call is not None
                call.cancel()
                break
            await asyncio.sleep(0.05)  # the cancelled calls' releases are on their way
        else:
            pytest.fail("slots were not released after the streams were cancelled")


async def test_budget_spent_on_one_replica_refuses_on_the_others_and_survives_restarts(
    cluster: Cluster,
) -> None:
    # $1 a token, 5 tokens a call: $5 per call against a $12 daily budget. Admitted while
    # spend < budget: $0, $5, $10 pass (each on another replica), then $15 >= $12 refuses.
    a, b, c = cluster.daemons
    transcript = []
    for d, label in (
        (a, "replica 1"),
        (b, "replica 2"),
        (c, "replica 3"),
        (a, "replica 1"),
        (b, "replica 2"),
    ):
        outcome = await d.complete("budget")
        spend = (await d.usage("budget")).keys[0].day.spend_micro_usd
        transcript.append(f"{label}: {outcome}, day spend ${spend / 1e6:g}")
    assert [line.split(": ")[1].split(",")[0] for line in transcript] == [
        "OK",
        "OK",
        "OK",
        "BUDGET_EXCEEDED",
        "BUDGET_EXCEEDED",
    ]

    await cluster.restart_all()  # every daemon SIGTERMed and started again
    a, b, c = cluster.daemons
    after = (await c.usage("budget")).keys[0]
    transcript.append(
        f"after restarting all 3: day spend ${after.day.spend_micro_usd / 1e6:g}, month "
        f"${after.month.spend_micro_usd / 1e6:g}, budget left ${after.day.budget_left_micro_usd / 1e6:g}, "
        f"requests {after.day.requests}, tokens {after.day.input_tokens}+{after.day.output_tokens}"
    )
    assert after.day.spend_micro_usd == 15_000_000 and after.month.spend_micro_usd == 15_000_000
    assert after.day.budget_micro_usd == 12_000_000 and after.day.budget_left_micro_usd == 0
    assert after.day.requests == 3 and (after.day.input_tokens, after.day.output_tokens) == (9, 6)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await b.stub.Complete(
            pb.CompleteRequest(model=PRICED, messages=[user()]), timeout=5, metadata=bearer("budget")
        )
    err = exc.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason_of(err) == "BUDGET_EXCEEDED"
    reset = after.day.reset_time.seconds
    retry = _retry_delay(err)
    assert retry is not None and abs((time.time() + retry) - reset) < 5, "RetryInfo points at UTC midnight"
    transcript.append(f"replica 2 after restart: BUDGET_EXCEEDED, retry in {retry:.0f}s ({err.details()})")
    print("\nbudget $12/day, $5 per call:\n  " + "\n  ".join(transcript))


def _retry_delay(err: grpc.aio.AioRpcError) -> float | None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    st = rpc_status.from_call(err)
    for d in st.details if st is not None else ():
        if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            d.Unpack(info)
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


async def test_a_killed_replica_frees_its_stream_slots_when_their_lease_runs_out(cluster: Cluster) -> None:
    cluster.upstream.reply = Reply(text_chunks=["x"] * 80, chunk_delay=0.25)
    a, b, _ = cluster.daemons
    held = [await open_stream(a, "slots") for _ in range(2)]
    assert [r for r, _ in held] == ["OK", "OK"]
    await a.kill()  # SIGKILL with both streams open: nothing is released
    killed = time.monotonic()
    first, _ = await open_stream(b, "slots")
    assert first == "CALLER_TOO_MANY_STREAMS", "the dead replica's slots still count until their lease ends"
    timeline = [f"t=0.00 replica 1 SIGKILLed with 2 streams open; replica 2: {first}"]
    freed = None
    for _ in range(int((LEASE + 3) / 0.1)):
        began = time.monotonic()
        outcome, call = await open_stream(b, "slots")
        if outcome == "OK":  # admitted when it began (its first content comes 0.25 s later)
            assert call is not None
            freed = began - killed
            call.cancel()
            break
        await asyncio.sleep(0.1)
    assert freed is not None, f"the slots never came free (lease {LEASE}s)"
    assert freed <= LEASE + 1.0
    timeline.append(f"t={freed:.2f} replica 2 admitted (stream_lease_seconds {LEASE})")
    print("\n" + "\n".join(timeline))
