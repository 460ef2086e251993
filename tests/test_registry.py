"""Registry: every provider module registered; resolution by prefix, type, bare id, alias."""

from __future__ import annotations

import pkgutil

import pytest

import broker.providers
from broker import errors
from broker.config import settings_from_dict
from broker.providers import PROTOCOL_MODULES, SUPPORT_MODULES, provider_types
from broker.providers.base import Provider
from broker.registry import Registry


def test_every_provider_module_is_registered() -> None:
    modules = {m.name for m in pkgutil.iter_modules(broker.providers.__path__)}
    protocol_modules = {m for m in modules if m not in SUPPORT_MODULES and not m.endswith("_wire")}
    assert protocol_modules == set(PROTOCOL_MODULES), (
        "a module in providers/ is missing from PROTOCOL_MODULES"
    )
    types = provider_types()
    assert set(types) == protocol_modules, "every protocol module must @register a class named by its type"
    for name, cls in types.items():
        assert issubclass(cls, Provider) and cls.type == name
        assert cls.__module__ == f"broker.providers.{name}"
        # and each protocol keeps its wire mapping beside it, free of I/O
        assert f"{name}_wire" in modules


def registry() -> Registry:
    settings = settings_from_dict(
        {
            "providers": [
                {
                    "name": "local",
                    "type": "ollama",
                    "base_url": "http://127.0.0.1:1",
                    "priority": 5,
                    "models": ["llama3.2", "shared-model"],
                },
                {
                    "name": "vllm",
                    "type": "openai",
                    "base_url": "http://127.0.0.1:2/v1",
                    "priority": 20,
                    "models": ["meta-llama/Llama-3.1-8B", "shared-model"],
                },
                {
                    "name": "openai",
                    "type": "openai",
                    "base_url": "https://api.openai.com/v1",
                    "priority": 10,
                    "api_key": "sk-test-registry-000000",
                },
            ],
            "aliases": {"fast": "openai/gpt-4o-mini", "chain": "fast", "local-default": "llama3.2"},
        },
        env={},
    )
    return Registry(settings)


def targets(ref: str) -> list[tuple[str, str]]:
    return [(t.state.name, t.model) for t in registry().resolve(ref)]


def test_priority_order() -> None:
    assert [s.name for s in registry().providers] == ["local", "openai", "vllm"]


def test_provider_prefix_passes_through_unlisted_models() -> None:
    assert targets("openai/gpt-9-preview") == [("openai", "gpt-9-preview")]
    assert targets("local/llama3.2") == [("local", "llama3.2")]


def test_bare_id_goes_to_every_provider_listing_it_by_priority() -> None:
    assert targets("shared-model") == [("local", "shared-model"), ("vllm", "shared-model")]
    # an id with a slash that is not a provider name is a bare id (vLLM style)
    assert targets("meta-llama/Llama-3.1-8B") == [("vllm", "meta-llama/Llama-3.1-8B")]


def test_vendor_endpoint_serves_its_catalogue_before_discovery() -> None:
    assert targets("gpt-4o-mini") == [("openai", "gpt-4o-mini")]


def test_aliases_chain() -> None:
    assert targets("fast") == [("openai", "gpt-4o-mini")]
    assert targets("chain") == [("openai", "gpt-4o-mini")]
    assert targets("local-default") == [("local", "llama3.2")]


def test_unknown_model_not_found_names_providers() -> None:
    with pytest.raises(errors.ModelNotFound) as e:
        registry().resolve("nonexistent-model")
    assert "nonexistent-model" in e.value.message and "local, openai, vllm" in e.value.message


def test_type_prefix_resolves_to_providers_of_that_type() -> None:
    assert targets("ollama/llama3.2") == [("local", "llama3.2")]
