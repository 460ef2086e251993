"""The model catalogue: models.json (derived by scripts/derive_catalog.py) plus config overrides.

Entries are per provider TYPE ("openai/gpt-4o-mini" facts apply to every openai-type provider
serving that id); overrides are per provider NAME ("vllm/my-model"). How facts merge into a
ModelSpec, highest precedence first:

  1. config (`models:` in the YAML): the operator's word beats everything, field by field;
  2. discovered facts (e.g. Ollama's /api/show capabilities and context length, Anthropic's
     /v1/models max_input_tokens and max_tokens, the max output), where the provider's
     listing carried them: the server actually serving the model knows best;
  3. the catalogue entry.

Prices from the catalogue apply only at the vendor's own endpoint (`vendor_endpoint=True`).
An openai-type provider pointing at vLLM, a proxy or a gateway serving "gpt-4o-mini" gets
the model's capabilities (same model id, same model) but pricing None: what that host
charges is not OpenAI's list price, and "unknown" is honest where a wrong number is not.
Config can set a price for it. Local providers (`local=True`, Ollama) are free unless config
sets a price. models.json may hold rows for any declared provider type, and only those.

Lookup is exact, with one tolerance: for types whose ids carry tags (Ollama's, as its
declaration in broker/providers/kinds.py says), "llama3.2:3b" and "llama3.2:latest" fall
back to the untagged family ("llama3.2"). Dated OpenAI/Anthropic ids do NOT fall back to
their family: snapshots are priced separately (gpt-4o-2024-05-13 costs twice gpt-4o), so an
unknown snapshot reports unknown cost rather than a guessed one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from broker.catalog.cost import micro_usd_from_usd
from broker.config import ConfigError, ModelOverride
from broker.providers import kinds
from broker.types import Capability, DiscoveredModel, ModelSpec, Pricing

SCHEMA_VERSION = 1


@dataclass(slots=True, frozen=True)
class CatalogEntry:
    """One row of models.json; prices are integer micro-USD per million tokens."""

    provider_type: str
    model: str
    context_window: int | None
    max_output_tokens: int | None
    vision: bool
    tools: bool
    json_mode: bool
    # A reasoning model: for OpenAI, it takes max_completion_tokens, not max_tokens.
    reasoning: bool
    input_micro_usd_per_mtok: int | None
    output_micro_usd_per_mtok: int | None
    cached_input_micro_usd_per_mtok: int | None
    cache_write_input_micro_usd_per_mtok: int | None
    deprecation_date: str | None
    source: str
    note: str | None
    date: str
    kind: str = "chat"  # "chat" or "embedding"
    dimensions: int | None = None
    structured_outputs: bool = False
    documents: bool = False

    @property
    def capabilities(self) -> frozenset[Capability]:
        return _capabilities(
            vision=self.vision,
            tools=self.tools,
            json_mode=self.json_mode,
            reasoning=self.reasoning,
            structured_outputs=self.structured_outputs,
            documents=self.documents,
        )

    @property
    def pricing(self) -> Pricing | None:
        if self.input_micro_usd_per_mtok is None or self.output_micro_usd_per_mtok is None:
            return None
        return Pricing(
            self.input_micro_usd_per_mtok,
            self.output_micro_usd_per_mtok,
            self.cached_input_micro_usd_per_mtok,
            self.cache_write_input_micro_usd_per_mtok,
        )


@dataclass(slots=True, frozen=True)
class _Override:
    """A config entry with prices already in integer micro-USD; None = not stated."""

    context_window: int | None
    max_output_tokens: int | None
    vision: bool | None
    tools: bool | None
    json_mode: bool | None
    reasoning: bool | None
    structured_outputs: bool | None
    documents: bool | None
    input: int | None
    output: int | None
    cached_input: int | None

    @classmethod
    def from_config(cls, o: ModelOverride) -> _Override:
        def micro(usd: float | None) -> int | None:
            return None if usd is None else micro_usd_from_usd(usd)

        return cls(
            o.context_window,
            o.max_output_tokens,
            o.vision,
            o.tools,
            o.json_mode,
            o.reasoning,
            o.structured_outputs,
            o.documents,
            micro(o.input_usd_per_mtok),
            micro(o.output_usd_per_mtok),
            micro(o.cached_input_usd_per_mtok),
        )

    @property
    def states_capabilities(self) -> bool:
        return any(getattr(self, c.value) is not None for c in Capability)


def _capabilities(**flags: bool) -> frozenset[Capability]:
    """Capabilities from flags named as their values (vision=..., structured_outputs=...)."""
    return frozenset(Capability(name) for name, on in flags.items() if on)


def _untagged(provider_type: str, model: str) -> str | None:
    """ "llama3.2:3b" -> "llama3.2" where the type's ids carry tags (case-insensitive, as Ollama's)."""
    kind = kinds.find(provider_type)
    return model.partition(":")[0].lower() if kind is not None and kind.tagged_models else None


# --- parsing models.json ---------------------------------------------------------------------


def _field(raw: Mapping[str, Any], name: str, kind: type, where: str, *, nullable: bool = False) -> Any:
    value = raw.get(name)
    if value is None and nullable:
        return None
    # bool is an int subclass: an int field must not accept true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"models.json {where}: {name!r} must be {kind.__name__}, got {value!r}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"models.json {where}: {name!r} must be >= 0, got {value}")
    return value


def parse_entries(document: Any) -> tuple[CatalogEntry, ...]:
    """Validate a parsed models.json; a malformed file fails loudly at start, not mid-request."""
    if not isinstance(document, dict) or document.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"models.json: expected an object with schema {SCHEMA_VERSION}")
    rows = document.get("models")
    if not isinstance(rows, list):
        raise ValueError("models.json: 'models' must be a list")
    entries: list[CatalogEntry] = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(rows):
        where = f"models[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"models.json {where}: must be an object")
        ints = {
            n: _field(raw, n, int, where, nullable=True)
            for n in (
                "context_window",
                "max_output_tokens",
                "input_micro_usd_per_mtok",
                "output_micro_usd_per_mtok",
                "cached_input_micro_usd_per_mtok",
                "cache_write_input_micro_usd_per_mtok",
            )
        }
        entry = CatalogEntry(
            provider_type=_field(raw, "provider_type", str, where),
            model=_field(raw, "model", str, where),
            vision=_field(raw, "vision", bool, where),
            tools=_field(raw, "tools", bool, where),
            json_mode=_field(raw, "json_mode", bool, where),
            reasoning=_field(raw, "reasoning", bool, where),
            deprecation_date=_field(raw, "deprecation_date", str, where, nullable=True),
            source=_field(raw, "source", str, where),
            note=_field(raw, "note", str, where, nullable=True),
            date=_field(raw, "date", str, where),
            kind=_field(raw, "kind", str, where) if "kind" in raw else "chat",
            dimensions=_field(raw, "dimensions", int, where, nullable=True),
            structured_outputs=_field(raw, "structured_outputs", bool, where)
            if "structured_outputs" in raw
            else False,
            documents=_field(raw, "documents", bool, where) if "documents" in raw else False,
            **ints,
        )
        if entry.kind not in ("chat", "embedding"):
            raise ValueError(f"models.json {where}: 'kind' must be chat or embedding, got {entry.kind!r}")
        key = (entry.provider_type, entry.model)
        if kinds.find(entry.provider_type) is None or not entry.model or key in seen:
            raise ValueError(f"models.json {where}: bad or duplicate provider_type/model {key}")
        seen.add(key)
        entries.append(entry)
    return tuple(entries)


@lru_cache(maxsize=1)
def _packaged_entries() -> tuple[CatalogEntry, ...]:
    # Parsed once per process; entries are frozen, so every Catalog can share them.
    text = resources.files("broker.catalog").joinpath("models.json").read_text(encoding="utf-8")
    return parse_entries(json.loads(text))


# --- the catalogue -----------------------------------------------------------------------------


class Catalog:
    """Catalogue entries by (provider type, model) and config overrides by (provider name, model)."""

    def __init__(self, entries: Iterable[CatalogEntry]) -> None:
        self._entries: dict[tuple[str, str], CatalogEntry] = {(e.provider_type, e.model): e for e in entries}
        by_type: dict[str, set[str]] = {}
        for pt, m in self._entries:
            by_type.setdefault(pt, set()).add(m)
        self._by_type = {t: frozenset(models) for t, models in by_type.items()}
        self._overrides: dict[tuple[str, str], _Override] = {}

    @classmethod
    def load(cls) -> Catalog:
        """The catalogue shipped in the package (broker/catalog/models.json), no overrides."""
        return cls(_packaged_entries())

    def entries(self) -> list[CatalogEntry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def models_for(self, provider_type: str) -> frozenset[str]:
        """The catalogue's model ids for a provider type (what a vendor endpoint serves)."""
        return self._by_type.get(provider_type, frozenset())

    def lookup(self, provider_type: str, model: str) -> CatalogEntry | None:
        entry = self._entries.get((provider_type, model))
        if entry is None and (family := _untagged(provider_type, model)) is not None:
            entry = self._entries.get((provider_type, family))
        return entry

    # --- config overrides ---------------------------------------------------------------------

    def apply_overrides(self, overrides: Sequence[ModelOverride], provider_types: Mapping[str, str]) -> None:
        """Install config entries (replacing any installed before), keyed "provider_name/model".

        provider_types maps each configured provider name to its type. An id whose prefix is
        not a configured provider is a config error (most likely a typo), as is the same id twice.
        """
        problems: list[str] = []
        installed: dict[tuple[str, str], _Override] = {}
        first_index: dict[tuple[str, str], int] = {}
        for i, o in enumerate(overrides):
            name, _, model = o.id.partition("/")
            if name not in provider_types:
                known = ", ".join(sorted(provider_types)) or "none configured"
                problems.append(f"models[{i}].id: no provider named {name!r} (providers: {known})")
                continue
            if (name, model) in installed:
                problems.append(f"models[{i}].id: {o.id!r} repeats models[{first_index[(name, model)]}]")
                continue
            installed[(name, model)] = _Override.from_config(o)
            first_index[(name, model)] = i
        if problems:
            raise ConfigError(problems)
        self._overrides = installed

    def override_models(self, provider_name: str) -> frozenset[str]:
        """Model ids config names for this provider (added or overridden)."""
        return frozenset(m for (p, m) in self._overrides if p == provider_name)

    def _override(self, provider_name: str, provider_type: str, model: str) -> _Override | None:
        found = self._overrides.get((provider_name, model))
        if found is None and (family := _untagged(provider_type, model)) is not None:
            found = self._overrides.get((provider_name, family))
        return found

    # --- merged facts -------------------------------------------------------------------------

    def spec_for(
        self,
        provider_name: str,
        provider_type: str,
        model: str,
        discovered: DiscoveredModel | None = None,
        *,
        vendor_endpoint: bool = True,
        local: bool = False,
        catalog_key: tuple[str, str] | None = None,
    ) -> ModelSpec:
        """Everything known about `model` at this provider, merged as the module doc says.

        vendor_endpoint: the provider is the vendor's own API (api.openai.com, ...), so the
        catalogue's prices apply. local: tokens cost nothing unless config sets a price.
        catalog_key: the (provider type, model) row that describes `model` when it is not its
        own (an Azure deployment name -> the OpenAI model it runs); overrides stay by `model`.
        """
        entry = self.lookup(*(catalog_key or (provider_type, model)))
        ov = self._override(provider_name, provider_type, model)
        source = "unknown"

        caps: frozenset[Capability] = frozenset()
        caps_known = False
        context = max_out = None
        reasoning: bool | None = None
        kind, dimensions = "", None
        prices: list[int | None] = [None, None, None, None]  # input, output, cached input, cache write
        if entry is not None:
            source = "catalogue"
            caps, caps_known = entry.capabilities, True
            context, max_out = entry.context_window, entry.max_output_tokens
            reasoning = entry.reasoning
            kind, dimensions = entry.kind, entry.dimensions
            if vendor_endpoint:
                prices = [
                    entry.input_micro_usd_per_mtok,
                    entry.output_micro_usd_per_mtok,
                    entry.cached_input_micro_usd_per_mtok,
                    entry.cache_write_input_micro_usd_per_mtok,
                ]
        if discovered is not None:
            said = (discovered.capabilities, discovered.context_window, discovered.max_output_tokens)
            if any(fact is not None for fact in said) or entry is None:
                source = "discovered"
            if discovered.capabilities is not None:
                caps, caps_known = discovered.capabilities, True
            if discovered.context_window is not None:
                context = discovered.context_window
            if discovered.max_output_tokens is not None:
                max_out = discovered.max_output_tokens
        if local:
            prices[0] = 0 if prices[0] is None else prices[0]
            prices[1] = 0 if prices[1] is None else prices[1]
        if ov is not None:
            source = "config"
            if ov.states_capabilities:
                # A config entry that states any capability states them all: for a model
                # nothing else knows, unstated ones are absent; otherwise they are kept.
                base = caps if caps_known else frozenset()
                stated = {c.value: getattr(ov, c.value) for c in Capability}
                caps = _capabilities(
                    **{name: (Capability(name) in base if on is None else on) for name, on in stated.items()}
                )
                caps_known = True
            context = ov.context_window if ov.context_window is not None else context
            max_out = ov.max_output_tokens if ov.max_output_tokens is not None else max_out
            for i, price in enumerate((ov.input, ov.output, ov.cached_input)):
                if price is not None:
                    prices[i] = price

        inp, out, cached, cache_write = prices
        # Both input and output prices or none: half a price is not a known cost.
        pricing = None if inp is None or out is None else Pricing(inp, out, cached, cache_write)
        return ModelSpec(
            provider=provider_name,
            name=model,
            capabilities=caps if caps_known else frozenset(),
            capabilities_known=caps_known,
            context_window=context,
            max_output_tokens=max_out,
            pricing=pricing,
            reasoning=reasoning,
            source=source,
            discovered=discovered is not None,
            kind=kind,
            dimensions=dimensions,
        )
