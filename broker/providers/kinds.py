"""What the daemon knows about each provider type, declared once: one `ProviderKind` per wire protocol.

Everything outside a protocol's own module that depends on the type reads it from here:

  config     the allowed `type:` values and their error message, the default base_url,
             `settings_from_env` (which env vars make a provider, and its base URL);
  providers  which module implements the type (`provider_types()` imports it; `@register`
             refuses a class whose type is not declared for its module);
  registry   `local` (tokens cost nothing) and the vendor hosts where catalogue prices apply;
  catalog    which `provider_type` rows models.json may hold, and the Ollama-style tag fallback.

A new wire protocol is its module (plus its `_wire` mapping) and one `ProviderKind` in `KINDS`
below. An OpenAI-compatible vendor (a hosted API or a local server speaking Chat Completions)
is no new type: it is one `CompatibleVendor` row in `VENDORS`, used as `type: openai` plus
`vendor: <name>` in config.

This module imports nothing from the daemon but the neutral `Capability`, so config can read it
without importing any provider (which would import config back).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlparse

from broker.types import Capability


@dataclass(frozen=True, slots=True)
class ProviderKind:
    """One provider type (`type:` in config), and what the rest of the daemon needs to know of it."""

    # The `type:` value, the `type/model` prefix, and models.json's `provider_type`.
    name: str
    # The module whose `@register` class implements it (its `type` is `name`).
    module: str
    # Used when a provider sets no base_url; follows the vendor's SDK (OpenAI's includes /v1).
    default_base_url: str
    # What its wire protocol can express. Declared, not enforced: the catalogue's Claude rows
    # say json_mode although the Messages API has no field for it (the prompt carries it).
    carries: frozenset[Capability]
    # `settings_from_env`: a provider named like the type appears when key_env is set, or (unless
    # needs_key) when base_url_env or host_env is; base_url_env gives its base URL as is.
    key_env: str | None = None
    # Read when key_env is unset, in order (the vendor SDK's other names for the key).
    more_key_envs: tuple[str, ...] = ()
    base_url_env: str | None = None
    needs_key: bool = False
    # `host`, `host:port` or a URL (the default port is default_base_url's), read by
    # `settings_from_env` and, as the vendor's own CLI does, for providers without base_url.
    host_env: str | None = None
    # Local models: tokens cost nothing unless config sets a price.
    local: bool = False
    # The vendor's own endpoints: only there are catalogue prices billed by default.
    vendor_hosts: frozenset[str] = frozenset()
    # Model ids carry `:tag`s ("llama3.2:3b") that fall back to the untagged family in the catalogue.
    tagged_models: bool = False
    # The vendor's endpoints as patterns (whole host, case-insensitive), for vendors with a
    # host per region or per customer resource (bedrock-runtime.us-east-1.amazonaws.com,
    # my-resource.openai.azure.com).
    vendor_host_patterns: tuple[str, ...] = ()
    # The base URL for a provider's `region` (config), when the type's host is regional.
    regional_base_url: str = ""

    def is_vendor_host(self, host: str) -> bool:
        """`host` is one of the vendor's own endpoints (where catalogue prices apply)."""
        host = host.lower().rstrip(".")
        return host in self.vendor_hosts or any(re.fullmatch(p, host) for p in self.vendor_host_patterns)

    def url_from_host(self, value: str) -> str:
        """`host`, `host:port` or a URL (as the ollama CLI reads OLLAMA_HOST) -> a base URL."""
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            value = "http://" + value
        if not re.search(r":\d+$", value.split("//", 1)[1]):
            default = urlparse(self.default_base_url)
            value += f":{default.port or (443 if default.scheme == 'https' else 80)}"
        return value


@dataclass(frozen=True, slots=True)
class CompatibleVendor:
    """A server speaking an existing type's protocol (most often `openai`), as one data row."""

    name: str  # `vendor:` in config
    kind: str  # the `type:` it speaks
    base_url: str  # the provider's base_url when config sets none
    # `settings_from_env` adds a provider named like the vendor when this variable is set.
    key_env: str | None = None
    local: bool = False  # a local server: tokens cost nothing unless config sets a price
    facts: str = ""  # where the row's facts were checked


_ALL = frozenset(Capability)

# Declaration order is also auto-config's priority order (10, 20, 30, ...). Read these tables
# as `kinds.KINDS` / `kinds.VENDORS` (never a copied reference): tests swap them for a test.
KINDS: dict[str, ProviderKind] = {
    k.name: k
    for k in (
        ProviderKind(
            name="openai",
            module="broker.providers.openai",
            default_base_url="https://api.openai.com/v1",
            carries=_ALL,
            key_env="OPENAI_API_KEY",
            # Compatible servers (vLLM, llama.cpp, Ollama's /v1) often run without a key.
            base_url_env="OPENAI_BASE_URL",
            vendor_hosts=frozenset({"api.openai.com"}),
        ),
        ProviderKind(
            name="anthropic",
            module="broker.providers.anthropic",
            default_base_url="https://api.anthropic.com",
            carries=frozenset({Capability.VISION, Capability.TOOLS}),
            key_env="ANTHROPIC_API_KEY",
            base_url_env="ANTHROPIC_BASE_URL",
            needs_key=True,
            vendor_hosts=frozenset({"api.anthropic.com"}),
        ),
        ProviderKind(
            name="ollama",
            module="broker.providers.ollama",
            default_base_url="http://localhost:11434",
            carries=_ALL,  # `format: "json"`, `images`, `tools` on /api/chat
            host_env="OLLAMA_HOST",
            local=True,
            tagged_models=True,
        ),
        ProviderKind(
            name="bedrock",
            module="broker.providers.bedrock",
            # The runtime host of the provider's `region` (regional_base_url); the control
            # plane (model listing) is bedrock.{region}.amazonaws.com. SigV4 credentials come
            # from the AWS chain (broker/providers/aws_auth.py), not from a key variable.
            default_base_url="https://bedrock-runtime.us-east-1.amazonaws.com",
            regional_base_url="https://bedrock-runtime.{region}.amazonaws.com",
            carries=_ALL,  # Converse: images, documents, toolConfig, reasoning, outputConfig
            vendor_host_patterns=(r"bedrock-runtime(-fips)?\.[a-z0-9-]+\.amazonaws\.com",),
        ),
        ProviderKind(
            name="azure_openai",
            module="broker.providers.azure_openai",
            # No default: each Azure resource has its own endpoint (base_url is required).
            default_base_url="",
            carries=_ALL,  # the OpenAI wire
            vendor_host_patterns=(r"[a-z0-9][a-z0-9-]*\.(openai|cognitiveservices)\.azure\.com",),
        ),
        ProviderKind(
            name="gemini",
            module="broker.providers.gemini",
            # As python-genai's base URL: the host; the API version (v1beta) is in each path.
            default_base_url="https://generativelanguage.googleapis.com",
            carries=_ALL,  # inlineData images/PDFs, tools, responseMimeType/responseJsonSchema, thinking
            # python-genai's names for the key: GOOGLE_API_KEY wins when both are set.
            key_env="GOOGLE_API_KEY",
            more_key_envs=("GEMINI_API_KEY",),
            needs_key=True,
            vendor_hosts=frozenset({"generativelanguage.googleapis.com"}),
        ),
        ProviderKind(
            name="vertex",
            module="broker.providers.vertex",
            # The host of location global; others: vertex_base_url(location). OAuth2 credentials
            # (a key file or ADC, broker/providers/google_auth.py), no key: never made from the env.
            default_base_url="https://aiplatform.googleapis.com",
            carries=_ALL,  # the Gemini wire, and Claude's Messages wire on rawPredict
            vendor_host_patterns=(
                r"([a-z]+-[a-z]+[0-9]+-)?aiplatform\.googleapis\.com",
                r"aiplatform\.(us|eu)\.rep\.googleapis\.com",
            ),
        ),
    )
}


def vertex_base_url(location: str) -> str:
    """Vertex AI's host for a location (PROTOCOLS-CLOUD.md B1): global and the multi-regions
    us/eu have their own names, every region is {location}-aiplatform.googleapis.com."""
    if location == "global":
        return "https://aiplatform.googleapis.com"
    if location in ("us", "eu"):
        return f"https://aiplatform.{location}.rep.googleapis.com"
    return f"https://{location}-aiplatform.googleapis.com"


# OpenAI-compatible vendors. Facts only where checked: the base URLs are the request URLs of
# the recorded traffic (shared/recordings/SOURCES.md); their key variables were not checked,
# so neither row auto-configures from the environment (config: `api_key: ${...}`).
VENDORS: dict[str, CompatibleVendor] = {
    v.name: v
    for v in (
        CompatibleVendor(
            name="groq",
            kind="openai",
            base_url="https://api.groq.com/openai/v1",
            facts="recordings oa-groq-reasoning, oa-groq-midstream-error",
        ),
        CompatibleVendor(
            name="openrouter",
            kind="openai",
            base_url="https://openrouter.ai/api/v1",
            facts="recordings oa-openrouter-reasoning, oa-openrouter-429, oa-openrouter-stream-error",
        ),
    )
}


def declare(kind: ProviderKind) -> ProviderKind:
    """Add a provider type (the built-in ones are the rows of `KINDS` above)."""
    if kind.name in KINDS:
        raise ValueError(f"provider type {kind.name!r} is declared already")
    KINDS[kind.name] = kind
    return kind


def declare_vendor(vendor: CompatibleVendor) -> CompatibleVendor:
    """Add an OpenAI-compatible (or other existing-protocol) vendor row."""
    if vendor.name in VENDORS or vendor.name in KINDS:
        raise ValueError(f"vendor {vendor.name!r} is declared already (as a vendor or a type)")
    kind(vendor.kind)  # the protocol it speaks must exist
    VENDORS[vendor.name] = vendor
    return vendor


def find(name: str) -> ProviderKind | None:
    return KINDS.get(name)


def kind(name: str) -> ProviderKind:
    found = KINDS.get(name)
    if found is None:
        raise KeyError(f"no provider type {name!r} (declared: {', '.join(KINDS)})")
    return found


def names() -> tuple[str, ...]:
    return tuple(KINDS)


def one_of(choices: Iterable[str]) -> str:
    """Pydantic's wording for a Literal, so a bad `type:` reads as it always has:
    "Input should be 'openai', 'anthropic' or 'ollama'"."""
    quoted = [repr(c) for c in choices]
    listed = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)
    return f"Input should be {listed}"
