"""Registry: every provider module registered and declared; a new protocol is one module plus
one declaration, a compatible vendor one data row; resolution by prefix, type, bare id, alias."""

from __future__ import annotations

import pkgutil
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

import broker.providers
from broker import errors
from broker.catalog import Catalog, parse_entries
from broker.config import ConfigError, settings_from_dict, settings_from_env
from broker.providers import SUPPORT_MODULES, is_part_of_a_protocol, kinds, provider_types, register
from broker.providers.base import Provider
from broker.registry import Registry
from broker.types import Pricing
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import Daemon, broker_settings, stub


def test_every_provider_module_is_registered() -> None:
    modules = {m.name for m in pkgutil.iter_modules(broker.providers.__path__)}
    declared = {k.module.removeprefix("broker.providers.") for k in kinds.KINDS.values()}
    protocol_modules = {
        m for m in modules if m not in SUPPORT_MODULES and not is_part_of_a_protocol(m, declared)
    }
    declared_modules = {k.module.removeprefix("broker.providers.") for k in kinds.KINDS.values()}
    assert protocol_modules == set(declared_modules), (
        "a module in providers/ is missing from the declarations in providers/kinds.py"
    )
    types = provider_types()
    assert set(types) == protocol_modules, "every protocol module must @register a class named by its type"
    for name, cls in types.items():
        assert issubclass(cls, Provider) and cls.type == name
        assert cls.__module__ == f"broker.providers.{name}"
        assert kinds.kind(name).module == cls.__module__  # declared for the module that registers it
        # and each protocol keeps its wire mapping beside it, free of I/O
        assert f"{name}_wire" in modules


def test_every_declaration_is_what_config_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    for kind in kinds.KINDS.values():
        if kind.host_env:
            monkeypatch.delenv(kind.host_env, raising=False)
        if not kind.default_base_url:
            # A type with an endpoint per customer resource (azure_openai) has no default.
            with pytest.raises(ConfigError, match="base_url: required"):
                settings_from_dict({"providers": [{"name": "p", "type": kind.name}]}, env={})
            continue
        # A regional type (bedrock) needs its region; its default URL is the default region's.
        extra: dict[str, str] = {"region": "us-east-1"} if kind.regional_base_url else {}
        if kind.name == "vertex":
            extra = {"project": "my-project"}  # its default URL is the global location's
        raw = {"providers": [{"name": "p", "type": kind.name, **extra}]}
        config = settings_from_dict(raw, env={}).providers[0]
        assert config.kind is kind and config.resolved_base_url() == kind.default_base_url
    for vendor in kinds.VENDORS.values():
        assert vendor.name not in kinds.KINDS and kinds.kind(vendor.kind) and vendor.facts


def test_register_refuses_a_class_its_declaration_does_not_name() -> None:
    class Stray(Provider):
        type = "stray"

    class Impostor(Provider):
        type = "openai"

    with pytest.raises(
        TypeError, match=re.escape("provider type 'stray' is not declared in broker/providers/kinds.py")
    ):
        register(Stray)
    with pytest.raises(TypeError, match=re.escape("'openai' is declared for broker.providers.openai")):
        register(Impostor)
    assert provider_types()["openai"].__module__ == "broker.providers.openai"


# --- a new wire protocol: one module plus one declaration -------------------------------------------

# The whole protocol module, as a new provider would write it (no other file changes).
TOY_MODULE = '''"""A toy wire protocol (written by tests/test_registry.py): echoes the last message."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from broker.providers import register
from broker.providers.base import Provider, UpstreamErrorInfo
from broker.types import (
    CompletionEvent,
    CompletionRequest,
    DiscoveredModel,
    EndEvent,
    FinishReason,
    StartEvent,
    TextDeltaEvent,
    Usage,
)


@register
class ToyProvider(Provider):
    type = "toy"

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[CompletionEvent, None]:
        yield StartEvent(model=request.model)
        yield TextDeltaEvent(text="echo: " + request.messages[-1].text())
        yield EndEvent(FinishReason.STOP, Usage(input_tokens=3, output_tokens=2))

    async def list_models(self) -> list[DiscoveredModel]:
        return [DiscoveredModel(name="echo-1")]

    async def health_check(self) -> None:
        return None

    def parse_error(self, status: int, body: bytes) -> UpstreamErrorInfo:
        return UpstreamErrorInfo(message=body.decode("utf-8", "replace"))
'''

# ...and its one declaration (a row of kinds.KINDS for a built-in protocol).
TOY = kinds.ProviderKind(
    name="toy",
    module="toy_protocol",
    default_base_url="http://toy.invalid:7070",
    carries=frozenset(),
    key_env="TOY_API_KEY",
    host_env="TOY_HOST",
    vendor_hosts=frozenset({"toy.invalid"}),
)

TOY_CATALOGUE = {
    "schema": 1,
    "models": [
        {
            "provider_type": "toy",
            "model": "echo-1",
            "context_window": 4096,
            "max_output_tokens": 512,
            "vision": False,
            "tools": False,
            "json_mode": False,
            "reasoning": False,
            "input_micro_usd_per_mtok": 100_000,
            "output_micro_usd_per_mtok": 200_000,
            "source": "test",
            "date": "2026-01-01",
        }
    ],
}


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[kinds.ProviderKind]:
    """The toy protocol's module on sys.path and its declaration; undone after the test."""
    (tmp_path / "toy_protocol.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TOY_HOST", raising=False)
    monkeypatch.setattr(kinds, "KINDS", dict(kinds.KINDS))
    monkeypatch.setattr(broker.providers, "_TYPES", dict(broker.providers._TYPES))
    with pytest.raises(ValueError, match="bad or duplicate provider_type"):
        parse_entries(TOY_CATALOGUE)  # before its declaration the catalogue refuses the type
    yield kinds.declare(TOY)
    sys.modules.pop("toy_protocol", None)


def test_a_new_wire_protocol_is_one_module_plus_one_declaration(toy: kinds.ProviderKind) -> None:
    # config: the type is accepted, and named among the allowed ones
    settings = settings_from_dict({"providers": [{"name": "t", "type": "toy"}]}, env={})
    with pytest.raises(ConfigError) as e:
        settings_from_dict({"providers": [{"name": "x", "type": "nope"}]}, env={})
    assert e.value.problems == [f"providers[0].type: {kinds.one_of(kinds.names())}"]
    assert e.value.problems[0].endswith("'ollama', 'bedrock', 'azure_openai', 'gemini', 'vertex' or 'toy'")

    # registry: builds it from the declared module (imported on first use), at the declared base URL
    assert "toy_protocol" not in sys.modules
    catalog = Catalog([*Catalog.load().entries(), *parse_entries(TOY_CATALOGUE)])
    reg = Registry(settings, catalog)
    state = reg.by_name["t"]
    assert type(state.provider).__module__ == "toy_protocol" and provider_types()["toy"] is type(
        state.provider
    )
    assert state.provider.base_url == "http://toy.invalid:7070"

    # catalogue: its rows parse, its vendor host bills them, `toy/model` resolves to it
    assert catalog.models_for("toy") == {"echo-1"}
    assert state.vendor_endpoint and not state.local
    [target] = reg.resolve("echo-1")
    assert (target.state.name, target.spec.context_window) == ("t", 4096)
    assert target.spec.pricing == Pricing(100_000, 200_000, None, None)
    assert [t.state.name for t in reg.resolve("toy/anything")] == ["t"]

    # auto-config: its declared variables make a provider, after the built-in types
    [p] = settings_from_env({"TOY_API_KEY": "toy-key-123456", "TOY_HOST": "127.0.0.1:7"}).providers
    after_builtins = 10 * len(kinds.KINDS)  # declared last: the lowest auto-config priority
    assert (p.name, p.type, p.priority, p.base_url) == ("toy", "toy", after_builtins, "http://127.0.0.1:7")
    assert p.resolved_api_key() == "toy-key-123456"


async def test_the_new_protocol_serves_through_the_daemon(
    toy: kinds.ProviderKind, daemon: Daemon, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    _, target = await daemon(
        broker_settings([{"name": "t", "type": "toy", "base_url": "http://127.0.0.1:9"}])
    )
    s = stub(channel_to(target))
    hi = pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])
    resp = await s.Complete(pb.CompleteRequest(model="t/echo-1", messages=[hi]), timeout=10)
    assert (resp.provider, resp.model, resp.message.content[0].text) == ("t", "echo-1", "echo: hi")
    assert resp.usage.input_tokens == 3 and resp.usage.output_tokens == 2
    listed = await s.ListProviders(pb.ListProvidersRequest(), timeout=10)
    assert [(p.name, p.type) for p in listed.providers] == [("t", "toy")]


# --- an OpenAI-compatible vendor: one data row ------------------------------------------------------


def test_an_openai_compatible_vendor_is_a_data_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kinds, "VENDORS", dict(kinds.VENDORS))
    # A test-only row (a local server's facts were not checkable); groq is a shipped row.
    kinds.declare_vendor(
        kinds.CompatibleVendor(
            name="lab-llama",
            kind="openai",
            base_url="http://127.0.0.1:8081/v1",
            key_env="LAB_LLAMA_KEY",
            local=True,
        )
    )
    settings = settings_from_dict(
        {
            "providers": [
                {"name": "lab", "type": "openai", "vendor": "lab-llama", "models": ["gpt-4o-mini"]},
                {"name": "groq", "type": "openai", "vendor": "groq", "models": ["gpt-4o-mini"]},
            ]
        },
        env={},
    )
    reg = Registry(settings)
    lab, groq = reg.by_name["lab"], reg.by_name["groq"]
    assert type(lab.provider) is type(groq.provider) is provider_types()["openai"]  # no new type
    assert lab.provider.base_url == "http://127.0.0.1:8081/v1"
    assert groq.provider.base_url == "https://api.groq.com/openai/v1"
    # a local server's tokens are free; a hosted vendor is not api.openai.com: no OpenAI list price
    assert lab.local and reg.spec(lab, "gpt-4o-mini").pricing == Pricing(0, 0, None, None)
    assert not groq.local and not groq.vendor_endpoint and reg.spec(groq, "gpt-4o-mini").pricing is None
    # auto-config reads the row's key variable, after every declared type
    [p] = settings_from_env({"LAB_LLAMA_KEY": "lab-key-123456"}).providers
    assert (p.name, p.type, p.vendor, p.resolved_base_url()) == (
        "lab-llama",
        "openai",
        "lab-llama",
        "http://127.0.0.1:8081/v1",
    )
    assert p.priority > 10 * len(kinds.KINDS)


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
