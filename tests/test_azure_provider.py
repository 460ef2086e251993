"""AzureOpenAIProvider against FakeAzureOpenAI over real loopback HTTP: both routes, api-key and
Entra ID auth, Azure's stream dialect (the prompt-filter chunk first), content filtering of
the prompt (400) and of the answer (finish content_filter), deployments in discovery, and the
catalogue facts and prices a deployment takes from the model it runs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker import errors
from broker.catalog import Catalog
from broker.config import ConfigError, ProviderConfig, settings_from_dict
from broker.providers.azure_openai import AzureOpenAIProvider
from broker.providers.azure_openai_wire import is_entra_token
from broker.registry import Registry
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    EndEvent,
    FinishReason,
    Message,
    Role,
    StartEvent,
    TextDeltaEvent,
    TextPart,
    Tool,
    ToolCallDeltaEvent,
)
from tests.fakes.azure_upstream import API_KEY, FakeAzureOpenAI
from tests.fakes.script import Reply, weather_tool_reply
from tests.providers import collect, collect_until_error, started

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2NvZ25pdGl2ZXNlcnZpY2VzLmF6dXJlLmNvbSJ9.c2lnbmF0dXJl"


@pytest.fixture
async def fake() -> AsyncIterator[FakeAzureOpenAI]:
    async with FakeAzureOpenAI(token=TOKEN) as f:
        yield f


def make(fake: FakeAzureOpenAI, **extra: Any) -> AzureOpenAIProvider:
    kw: dict[str, Any] = {"api_key": API_KEY, "deployments": {"gpt-4o-prod": "gpt-4o"}, **extra}
    return AzureOpenAIProvider(ProviderConfig(name="azure", type="azure_openai", base_url=fake.url, **kw))


def ask(model: str = "gpt-4o-prod", **kw: Any) -> CompletionRequest:
    return CompletionRequest(
        model=model, messages=[Message(Role.USER, [TextPart("Hi")])], provider_type="azure_openai", **kw
    )


def text_of(events: list[CompletionEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDeltaEvent))


@pytest.mark.parametrize("api_version", ["2024-10-21", None])
async def test_both_routes_stream_the_answer(fake: FakeAzureOpenAI, api_version: str | None) -> None:
    fake.reply = Reply(text_chunks=["4200", " + 42", " = 4242."], input_tokens=14, output_tokens=9)
    async with started(make(fake, api_version=api_version)) as provider:
        events = await collect(provider, ask())
    assert isinstance(events[0], StartEvent) and text_of(events) == "4200 + 42 = 4242."
    end = events[-1]
    assert isinstance(end, EndEvent) and end.finish_reason is FinishReason.STOP
    assert (end.usage.input_tokens, end.usage.output_tokens) == (14, 9) and end.usage_reported
    req = fake.requests[-1]
    assert req.headers["api-key"] == API_KEY and "authorization" not in req.headers
    if api_version:
        assert (req.path, req.query) == (
            "/openai/deployments/gpt-4o-prod/chat/completions",
            "api-version=2024-10-21",
        )
    else:
        assert (req.path, req.query) == ("/openai/v1/chat/completions", "")
    assert req.json()["model"] == "gpt-4o-prod" and req.json()["stream_options"] == {"include_usage": True}


async def test_an_entra_id_token_goes_as_bearer(fake: FakeAzureOpenAI) -> None:
    assert is_entra_token(TOKEN) and not is_entra_token(API_KEY)
    async with started(make(fake, api_key=TOKEN)) as provider:
        await collect(provider, ask())
        await provider.health_check()
    assert (
        fake.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
        and "api-key" not in fake.requests[0].headers
    )


async def test_a_wrong_key_is_an_auth_failure(fake: FakeAzureOpenAI) -> None:
    async with started(make(fake, api_key="ffffffffffffffffffffffffffffffff")) as provider:
        _, err = await collect_until_error(provider, ask())
    assert isinstance(err, errors.UpstreamAuthFailed) and "ffffffffffffffff" not in err.message


async def test_tool_calls(fake: FakeAzureOpenAI) -> None:
    fake.reply = weather_tool_reply()
    tool = Tool("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}}})
    async with started(make(fake, api_version="2024-10-21")) as provider:
        events = await collect(provider, ask(tools=[tool]))
    calls = [e for e in events if isinstance(e, ToolCallDeltaEvent)]
    assert calls[0].id == "call_w1" and json.loads("".join(c.arguments_delta for c in calls)) == {
        "city": "Paris"
    }
    assert isinstance(events[-1], EndEvent) and events[-1].finish_reason is FinishReason.TOOL_CALLS


async def test_a_filtered_answer_ends_content_filter_with_the_category(fake: FakeAzureOpenAI) -> None:
    fake.reply = Reply(text_chunks=["Here is", " how"])
    fake.filtered = "self_harm"
    async with started(make(fake)) as provider:
        events = await collect(provider, ask())
    end = events[-1]
    assert text_of(events) == "Here is"
    assert isinstance(end, EndEvent) and end.finish_reason is FinishReason.CONTENT_FILTER
    assert end.refusal is not None and end.refusal.category == "self_harm:medium"


async def test_a_blocked_prompt_is_content_filtered_with_the_category(fake: FakeAzureOpenAI) -> None:
    fake.prompt_blocked = "violence"
    async with started(make(fake, api_version="2024-10-21")) as provider:
        _, err = await collect_until_error(provider, ask())
    assert (
        isinstance(err, errors.ContentFiltered) and err.code.name == "INVALID_ARGUMENT" and not err.retryable
    )
    assert "content management policy" in err.message and "(filtered: violence:medium)" in err.message
    assert err.metadata["categories"] == "violence:medium"


@pytest.mark.parametrize("api_version", ["2024-10-21", None])
async def test_an_unknown_deployment_is_not_found_on_either_route(
    fake: FakeAzureOpenAI, api_version: str | None
) -> None:
    async with started(make(fake, api_version=api_version)) as provider:
        _, err = await collect_until_error(provider, ask(model="nope"))
    assert isinstance(err, errors.ModelNotFound), err
    assert ("deployments route" if api_version else "/openai/v1/ route") in err.message


async def test_discovery_is_the_configured_deployments(fake: FakeAzureOpenAI) -> None:
    async with started(make(fake, deployments={"gpt-4o-prod": "gpt-4o", "mini": "gpt-4o-mini"})) as provider:
        assert [m.name for m in await provider.list_models()] == ["gpt-4o-prod", "mini"]
    assert fake.requests == []  # the data plane cannot list deployments: nothing asked


def test_a_deployment_takes_its_models_facts_and_openais_prices() -> None:
    settings = settings_from_dict(
        {
            "providers": [
                {"name": "azure", "type": "azure_openai", "base_url": "https://my-resource.openai.azure.com",
                 "api_key": API_KEY, "deployments": {"gpt-4o-prod": "gpt-4o"}},
                {"name": "proxy", "type": "azure_openai", "base_url": "https://gateway.example.com", "api_key": API_KEY},
            ]
        },
        env={},
    )  # fmt: skip
    registry = Registry(settings, Catalog.load())
    azure, proxy = registry.providers
    spec = registry.spec(azure, "gpt-4o-prod")
    openai = Catalog.load().lookup("openai", "gpt-4o")
    assert openai is not None and spec.name == "gpt-4o-prod" and spec.context_window == openai.context_window
    assert (
        spec.pricing is not None and spec.pricing.input_micro_usd_per_mtok == openai.input_micro_usd_per_mtok
    )
    # Not Azure's own host: the facts, but no price (what a gateway charges is unknown).
    assert registry.spec(proxy, "gpt-4o").context_window == openai.context_window
    assert registry.spec(proxy, "gpt-4o").pricing is None


@pytest.mark.parametrize(
    ("provider", "problem"),
    [
        ({"type": "bedrock"}, "providers[0]: region: required for type bedrock"),
        (
            {"type": "bedrock", "region": "Mars-1"},
            "providers[0].region: must be an AWS region such as us-east-1",
        ),
        ({"type": "openai", "region": "us-east-1"}, "providers[0]: region: only type bedrock takes a region"),
        ({"type": "azure_openai"}, "providers[0]: base_url: required for type azure_openai"),
        (
            {"type": "azure_openai", "base_url": "https://r.openai.azure.com", "api_version": "v1"},
            "providers[0].api_version: must be an Azure OpenAI api-version such as 2024-10-21",
        ),
        (
            {
                "type": "azure_openai",
                "base_url": "https://r.openai.azure.com",
                "deployments": {"a b": "gpt-4o"},
            },
            "providers[0].deployments: 'a b': a deployment name is letters",
        ),
        (
            {"type": "anthropic", "deployments": {"x": "y"}},
            "providers[0]: deployments: only type azure_openai",
        ),
    ],
)
def test_cloud_fields_are_validated_naming_the_field(provider: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"providers": [{"name": "p", **provider}]}, env={})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems
