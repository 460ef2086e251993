"""Selection by requirements: SelectModel and completions with an empty `model`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply
from tests.reliability.conftest import openai_provider, stream, stub, unary, user

USD = 1_000_000  # micro-USD per USD


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeOpenAI]]:
    async with (
        FakeOpenAI(api_key=OPENAI_TEST_KEY, models=["gpt-4o"]) as pricey,
        FakeOpenAI(api_key=OPENAI_TEST_KEY, models=["gpt-4o-mini", "small-text"]) as cheap,
    ):
        yield pricey, cheap


@pytest.fixture
async def broker(fakes, daemon, channel_to):
    pricey, cheap = fakes
    settings = broker_settings(
        [
            openai_provider("pricey", pricey.url, priority=10),
            # The configured order says which of its models the operator prefers.
            openai_provider("cheap", cheap.url, priority=20, models=["small-text", "gpt-4o-mini"]),
        ],
        models=[
            {"id": "pricey/gpt-4o", "input_usd_per_mtok": 2.5, "output_usd_per_mtok": 10},
            {"id": "cheap/gpt-4o-mini", "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6},
            {
                "id": "cheap/small-text",
                "vision": False,
                "tools": True,
                "json_mode": True,
                "context_window": 8192,
                "input_usd_per_mtok": 0.05,
                "output_usd_per_mtok": 0.1,
            },
        ],
        routing={
            "retry": {"max_attempts": 1},
            "breaker": {"consecutive_failures": 1, "cooldown_seconds": 60},
        },
    )
    server, target = await daemon(settings)
    return server, stub(channel_to(target))


async def select(s, requirements: pb.Requirements) -> pb.SelectModelResponse:
    resp: pb.SelectModelResponse = await s.SelectModel(
        pb.SelectModelRequest(requirements=requirements), timeout=5
    )
    return resp


def ids(resp: pb.SelectModelResponse) -> list[str]:
    return [resp.selected.id, *(m.id for m in resp.alternatives)]


async def test_select_gives_the_choice_the_alternatives_and_every_exclusion_with_its_reason(broker) -> None:
    _, s = broker
    resp = await select(
        s, pb.Requirements(capabilities=[pb.CAPABILITY_VISION], max_input_price_micro_usd_per_mtok=1 * USD)
    )
    assert ids(resp) == ["cheap/gpt-4o-mini"]
    assert resp.selected.pricing.input_micro_usd_per_mtok == 150_000
    assert {e.model_id: e.reason for e in resp.excluded} == {
        "pricey/gpt-4o": "input price 2.50 > 1.00",
        "cheap/small-text": "no vision",
    }


async def test_context_and_output_price_ceilings(broker) -> None:
    _, s = broker
    resp = await select(
        s, pb.Requirements(min_context_window=100_000, max_output_price_micro_usd_per_mtok=5 * USD)
    )
    assert ids(resp) == ["cheap/gpt-4o-mini"]
    assert {e.model_id: e.reason for e in resp.excluded} == {
        "pricey/gpt-4o": "output price 10.00 > 5.00",
        "cheap/small-text": "context 8192 < 100000",
    }


@pytest.mark.parametrize(
    ("preference", "order"),
    [
        (pb.PREFERENCE_PRIORITY, ["pricey/gpt-4o", "cheap/small-text", "cheap/gpt-4o-mini"]),
        (pb.PREFERENCE_UNSPECIFIED, ["pricey/gpt-4o", "cheap/small-text", "cheap/gpt-4o-mini"]),
        (pb.PREFERENCE_CHEAPEST, ["cheap/small-text", "cheap/gpt-4o-mini", "pricey/gpt-4o"]),
    ],
)
async def test_preferences_rank_the_candidates(
    broker, preference: pb.Preference.ValueType, order: list[str]
) -> None:
    _, s = broker
    resp = await select(s, pb.Requirements(capabilities=[pb.CAPABILITY_TOOLS], preference=preference))
    assert ids(resp) == order and list(resp.excluded) == []


async def test_fastest_follows_observed_time_to_first_token(broker, fakes) -> None:
    _, s = broker
    pricey, _ = fakes
    pricey.reply = Reply(chunk_delay=0.2)  # its first token comes 0.2 s after the request
    for model in ("pricey/gpt-4o", "cheap/gpt-4o-mini"):
        assert (await unary(s, pb.CompleteRequest(model=model, messages=[user("hi")]))).status == "OK"
    resp = await select(s, pb.Requirements(preference=pb.PREFERENCE_FASTEST))
    # Observed models by their latency; cheap/small-text was never observed, so it comes last.
    assert ids(resp) == ["cheap/gpt-4o-mini", "pricey/gpt-4o", "cheap/small-text"]


async def test_a_completion_without_a_model_uses_the_selection(broker, fakes) -> None:
    _, s = broker
    pricey, cheap = fakes
    image = pb.ContentPart(image=pb.Image(url="https://example.com/cat.png"))
    msg = pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="what is this?"), image])
    # The cheapest model lacks vision, which the image needs: the selection knows.
    out = await stream(
        s,
        pb.StreamCompleteRequest(
            messages=[msg], requirements=pb.Requirements(preference=pb.PREFERENCE_CHEAPEST)
        ),
    )
    assert (out.status, out.provider, out.model) == ("OK", "cheap", "gpt-4o-mini")
    assert cheap.chat_bodies[-1]["model"] == "gpt-4o-mini" and pricey.chat_bodies == []


async def test_requirements_also_bind_a_named_model(broker) -> None:
    _, s = broker
    r = pb.CompleteRequest(
        model="pricey/gpt-4o",
        messages=[user("hi")],
        fallback_models=["cheap/gpt-4o-mini"],
        requirements=pb.Requirements(max_input_price_micro_usd_per_mtok=1 * USD),
    )
    out = await unary(s, r)
    assert (out.status, out.provider) == ("OK", "cheap"), "the over-budget model is never tried"


async def test_an_open_breaker_excludes_a_provider_from_selection(broker, fakes) -> None:
    _, s = broker
    _, cheap = fakes
    cheap.faults.append(Fault("status", status=500))
    failed = await unary(s, pb.CompleteRequest(model="cheap/small-text", messages=[user("hi")]))
    assert failed.status == "UNAVAILABLE UPSTREAM_UNAVAILABLE"  # and that opened cheap's breaker
    resp = await select(s, pb.Requirements(preference=pb.PREFERENCE_CHEAPEST))
    assert ids(resp) == ["pricey/gpt-4o"]
    reasons = {e.model_id: e.reason for e in resp.excluded}
    assert reasons["cheap/gpt-4o-mini"].startswith("breaker open (retry in ")
    out = await unary(
        s,
        pb.CompleteRequest(
            messages=[user("hi")], requirements=pb.Requirements(preference=pb.PREFERENCE_CHEAPEST)
        ),
    )
    assert (out.status, out.provider) == ("OK", "pricey")
    # Only provider state stands in the way: that is UNAVAILABLE (come back soon), not a mismatch.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await select(s, pb.Requirements(allow_providers=["cheap"]))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "breaker open" in e.value.details()


async def test_nothing_qualifies_is_a_failed_precondition_that_says_why(broker) -> None:
    _, s = broker
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await select(s, pb.Requirements(max_input_price_micro_usd_per_mtok=10_000))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "pricey/gpt-4o: input price 2.50 > 0.01" in e.value.details()
    out = await unary(
        s,
        pb.CompleteRequest(
            messages=[user("hi")], requirements=pb.Requirements(max_input_price_micro_usd_per_mtok=10_000)
        ),
    )
    assert out.status == "FAILED_PRECONDITION NO_MODEL_MATCHES"


async def test_unknown_provider_names_are_invalid_arguments(broker) -> None:
    _, s = broker
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await select(s, pb.Requirements(allow_providers=["cheap", "nope"]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requirements.allow_providers[1]" in e.value.details()
    resp = await select(s, pb.Requirements(exclude_providers=["pricey"]))
    assert "pricey/gpt-4o" not in ids(resp)
    assert {e.model_id: e.reason for e in resp.excluded} == {"pricey/gpt-4o": "provider excluded"}
