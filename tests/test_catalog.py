"""The model catalogue: derivation, known facts, merging with config and discovery, and cost."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from broker.catalog import Catalog, compute_cost, micro_usd_from_usd, parse_entries
from broker.config import ConfigError, ModelOverride
from broker.providers import kinds
from broker.types import Capability, Cost, DiscoveredModel, Pricing, Usage

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "derive_catalog.py"
SOURCE = REPO.parent / "shared" / "data" / "model_prices_and_context_window.json"
COMMITTED = REPO / "broker" / "catalog" / "models.json"
# gpt-4o-mini: everything but reasoning (it is not a reasoning model).
ALL_CAPS = frozenset(Capability) - {Capability.REASONING}


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.load()


# --- derivation ------------------------------------------------------------------------------


@pytest.mark.skipif(not SOURCE.exists(), reason=f"source data not present at {SOURCE}")
def test_derive_is_deterministic_and_matches_committed_file(tmp_path: Path) -> None:
    outputs = []
    for name in ("a.json", "b.json"):
        out = tmp_path / name
        subprocess.run([sys.executable, str(SCRIPT), str(SOURCE), "--output", str(out)], check=True)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0].endswith(b"}\n")
    assert outputs[0] == COMMITTED.read_bytes(), "models.json is stale: run scripts/derive_catalog.py"
    check = subprocess.run([sys.executable, str(SCRIPT), str(SOURCE), "--check"], capture_output=True)
    assert check.returncode == 0, check.stderr


def test_every_entry_has_source_and_date(catalog: Catalog) -> None:
    entries = catalog.entries()
    counts = {t: sum(e.provider_type == t for e in entries) for t in ("openai", "anthropic", "ollama")}
    assert all(n > 0 for n in counts.values()), counts
    for e in entries:
        if e.kind == "embedding" and e.provider_type == "ollama":
            # Not in the LiteLLM source: the library page's facts (scripts/derive_catalog.py).
            assert e.source == f"ollama.com/library/{e.model}", e
        else:
            assert e.source.startswith("litellm model_prices_and_context_window.json v1.80.0 key "), e
        assert e.date == "2026-11-25", e
        if e.provider_type == "ollama":
            assert (e.input_micro_usd_per_mtok, e.output_micro_usd_per_mtok) == (0, 0), e


def test_the_issue_s_models_are_all_present(catalog: Catalog) -> None:
    wanted = {
        "openai": "gpt-3.5-turbo gpt-4 gpt-4-turbo gpt-4o gpt-4o-mini gpt-4.1 gpt-4.1-mini gpt-4.1-nano "
        "o1 o1-mini o3 o3-mini o4-mini",
        "anthropic": "claude-3-haiku-20240307 claude-3-opus-20240229 claude-3-5-sonnet-20241022 "
        "claude-3-5-haiku-20241022 claude-3-7-sonnet-20250219 claude-sonnet-4-20250514 "
        "claude-opus-4-20250514 claude-opus-4-1 claude-sonnet-4-5 claude-haiku-4-5",
        "ollama": "llama3 llama3.1 llama3.2 llama3.3 gemma2 gemma3 mistral qwen2.5 phi3 phi4",
    }
    for provider_type, models in wanted.items():
        missing = set(models.split()) - catalog.models_for(provider_type)
        assert not missing, (provider_type, missing)


def test_malformed_catalogue_fails_loudly() -> None:
    good = json.loads(COMMITTED.read_text())
    bad = json.loads(COMMITTED.read_text())
    bad["models"][0]["context_window"] = True
    with pytest.raises(ValueError, match="context_window"):
        parse_entries(bad)
    good["models"].append(good["models"][0])
    with pytest.raises(ValueError, match="duplicate"):
        parse_entries(good)


# --- known facts --------------------------------------------------------------------------------


def test_gpt_4o_mini_prices_and_window(catalog: Catalog) -> None:
    spec = catalog.spec_for("openai", "openai", "gpt-4o-mini", vendor_endpoint=True)
    assert spec.pricing == Pricing(150_000, 600_000, 75_000)  # $0.15 / $0.60 / $0.075 per Mtok
    assert spec.context_window == 128_000
    assert spec.capabilities_known and spec.capabilities == ALL_CAPS
    assert spec.source == "catalogue" and spec.id == "openai/gpt-4o-mini"


def test_claude_3_5_sonnet_context_and_vision(catalog: Catalog) -> None:
    for model in ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet-latest"):
        entry = catalog.lookup("anthropic", model)
        assert entry is not None
        assert entry.context_window == 200_000
        assert Capability.VISION in entry.capabilities
        assert entry.pricing == Pricing(3_000_000, 15_000_000, 300_000, 3_750_000)


def test_alias_takes_its_snapshot_s_facts(catalog: Catalog) -> None:
    alias, snapshot = (
        catalog.lookup("anthropic", "claude-3-5-haiku-latest"),
        catalog.lookup("anthropic", "claude-3-5-haiku-20241022"),
    )
    assert alias is not None and snapshot is not None
    assert alias.pricing == snapshot.pricing == Pricing(800_000, 4_000_000, 80_000, 1_000_000)
    assert alias.source == snapshot.source


def test_capability_flags_follow_the_source(catalog: Catalog) -> None:
    o1_mini, gpt4, o3_mini = (catalog.lookup("openai", m) for m in ("o1-mini", "gpt-4", "o3-mini"))
    # o1-mini: no tools or JSON mode (the source omits both); a reasoning model that reads PDFs.
    assert o1_mini is not None
    assert o1_mini.capabilities == {Capability.VISION, Capability.REASONING, Capability.DOCUMENTS}
    assert gpt4 is not None and Capability.JSON_MODE not in gpt4.capabilities
    assert o3_mini is not None and Capability.VISION not in o3_mini.capabilities


@pytest.mark.parametrize("model", ["llama3.2", "llama3.2:latest", "llama3.2:3b", "Llama3.2:1B"])
def test_ollama_tags_resolve_to_the_family_at_price_zero(catalog: Catalog, model: str) -> None:
    spec = catalog.spec_for("local", "ollama", model, vendor_endpoint=False, local=True)
    assert spec.source == "catalogue" and spec.name == model
    assert spec.capabilities_known and Capability.TOOLS in spec.capabilities
    assert spec.pricing == Pricing(0, 0, None)
    cost = compute_cost(spec.pricing, Usage(input_tokens=5_000, output_tokens=700), local=True)
    assert cost == Cost(known=True) and cost.total_micro_usd == 0


def test_rows_and_tag_fallback_follow_the_type_declarations(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert {e.provider_type for e in catalog.entries()} <= set(kinds.KINDS)
    row = {
        "provider_type": "tagged",
        "model": "fam",
        "context_window": 8,
        "max_output_tokens": 4,
        "vision": False,
        "tools": False,
        "json_mode": False,
        "reasoning": False,
        "input_micro_usd_per_mtok": None,
        "output_micro_usd_per_mtok": None,
        "source": "test",
        "date": "2026-01-01",
    }
    with pytest.raises(ValueError, match="bad or duplicate provider_type"):
        parse_entries({"schema": 1, "models": [row]})  # no such type
    monkeypatch.setattr(kinds, "KINDS", dict(kinds.KINDS))
    kinds.declare(
        kinds.ProviderKind(
            name="tagged", module="x", default_base_url="http://x:1", carries=frozenset(), tagged_models=True
        )
    )
    declared = Catalog(parse_entries({"schema": 1, "models": [row]}))
    tagged = declared.lookup("tagged", "FAM:latest")
    assert tagged is not None and tagged.model == "fam"


def test_dated_ids_do_not_fall_back_to_their_family(catalog: Catalog) -> None:
    dated = catalog.lookup("openai", "gpt-4o-2024-05-13")
    assert dated is not None and dated.pricing is not None
    assert dated.pricing.input_micro_usd_per_mtok == 5_000_000  # not gpt-4o's 2_500_000
    assert catalog.lookup("openai", "gpt-4o-2099-01-01") is None
    assert catalog.lookup("anthropic", "claude-sonnet-4-5-20990101") is None
    assert catalog.lookup("openai", "gpt-4o:latest") is None  # tags are an Ollama thing


# --- merging with discovery and the endpoint ------------------------------------------------------


def test_unknown_discovered_model_has_unknown_capabilities_and_price(catalog: Catalog) -> None:
    spec = catalog.spec_for("openai", "openai", "ft:gpt-x:acme::1", DiscoveredModel(name="ft:gpt-x:acme::1"))
    assert spec.discovered and spec.source == "discovered"
    assert not spec.capabilities_known and spec.capabilities == frozenset()
    assert spec.pricing is None and spec.context_window is None
    assert compute_cost(spec.pricing, Usage(10, 10)) == Cost(known=False)


def test_ollama_discovered_facts_win_over_the_catalogue(catalog: Catalog) -> None:
    found = DiscoveredModel(
        "gemma3:1b", capabilities=frozenset({Capability.JSON_MODE}), context_window=32_768
    )
    spec = catalog.spec_for("local", "ollama", "gemma3:1b", found, vendor_endpoint=False, local=True)
    assert spec.capabilities == {Capability.JSON_MODE} and spec.context_window == 32_768
    assert spec.source == "discovered" and spec.pricing == Pricing(0, 0, None)
    unknown = catalog.spec_for("local", "ollama", "my-finetune", DiscoveredModel("my-finetune"), local=True)
    assert not unknown.capabilities_known
    assert compute_cost(unknown.pricing, Usage(100, 100), local=True) == Cost(known=True)


def test_non_vendor_endpoint_gets_capabilities_but_no_price(catalog: Catalog) -> None:
    spec = catalog.spec_for("vllm", "openai", "gpt-4o-mini", vendor_endpoint=False)
    assert spec.capabilities_known and Capability.TOOLS in spec.capabilities
    assert spec.context_window == 128_000
    assert spec.pricing is None


# --- config overrides ----------------------------------------------------------------------------


def test_override_changes_a_price_and_adds_a_model(catalog: Catalog) -> None:
    catalog.apply_overrides(
        [
            ModelOverride(id="openai/gpt-4o-mini", input_usd_per_mtok=0.2),
            ModelOverride(
                id="vllm/qwen-coder",
                context_window=32_768,
                tools=True,
                input_usd_per_mtok=0.07,
                output_usd_per_mtok=0.28,
            ),
        ],
        {"openai": "openai", "vllm": "openai"},
    )
    mini = catalog.spec_for("openai", "openai", "gpt-4o-mini")
    assert mini.source == "config"
    assert mini.pricing == Pricing(200_000, 600_000, 75_000)  # only the input price changed
    assert mini.capabilities == ALL_CAPS and mini.context_window == 128_000
    other = catalog.spec_for("other-openai", "openai", "gpt-4o-mini")  # overrides are per provider
    assert other.pricing == Pricing(150_000, 600_000, 75_000)

    added = catalog.spec_for("vllm", "openai", "qwen-coder", vendor_endpoint=False)
    assert added.source == "config" and added.context_window == 32_768
    assert added.capabilities_known and added.capabilities == {Capability.TOOLS}  # unstated = absent
    assert added.pricing == Pricing(70_000, 280_000, None)
    assert catalog.override_models("vllm") == {"qwen-coder"}
    assert catalog.override_models("openai") == {"gpt-4o-mini"}


def test_override_price_on_a_non_vendor_endpoint(catalog: Catalog) -> None:
    catalog.apply_overrides([ModelOverride(id="gw/gpt-4o-mini", output_usd_per_mtok=1)], {"gw": "openai"})
    half = catalog.spec_for("gw", "openai", "gpt-4o-mini", vendor_endpoint=False)
    assert half.pricing is None  # an output price alone is not a known cost
    catalog.apply_overrides(
        [ModelOverride(id="gw/gpt-4o-mini", input_usd_per_mtok=0.5, output_usd_per_mtok=1)], {"gw": "openai"}
    )
    full = catalog.spec_for("gw", "openai", "gpt-4o-mini", vendor_endpoint=False)
    assert full.pricing == Pricing(500_000, 1_000_000, None)


def test_bad_overrides_are_config_errors(catalog: Catalog) -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.id: no provider named 'opneai'"):
        catalog.apply_overrides([ModelOverride(id="opneai/gpt-4o")], {"openai": "openai"})
    with pytest.raises(ConfigError, match=r"models\[1\]\.id: 'openai/x' repeats models\[0\]"):
        catalog.apply_overrides(
            [ModelOverride(id="openai/x"), ModelOverride(id="openai/x")], {"openai": "openai"}
        )


# --- cost ----------------------------------------------------------------------------------------


def test_a_million_tokens_at_fifteen_cents() -> None:
    cost = compute_cost(Pricing(150_000, 600_000), Usage(input_tokens=1_000_000, output_tokens=1_000_000))
    assert cost == Cost(known=True, input_micro_usd=150_000, output_micro_usd=600_000)
    assert cost.total_micro_usd == 750_000


def test_cached_input_is_billed_at_the_cached_price() -> None:
    pricing = Pricing(3_000_000, 15_000_000, 300_000)  # Claude Sonnet: $3 in, $0.30 cached
    usage = Usage(
        input_tokens=10_000, output_tokens=0, cached_input_tokens=8_000, cache_write_input_tokens=1_000
    )
    # 2_000 uncached (incl. 1_000 cache writes at the input price) * 3 + 8_000 * 0.3 = 8_400 micro-USD
    assert compute_cost(pricing, usage).input_micro_usd == 8_400
    # No cached price: cached tokens cost the input price.
    assert compute_cost(Pricing(3_000_000, 0), usage).input_micro_usd == 30_000
    # More cached than input (a confused upstream) never goes negative.
    assert compute_cost(pricing, Usage(input_tokens=10, cached_input_tokens=50)).input_micro_usd == 3


@pytest.mark.parametrize(
    ("tokens", "micro_per_mtok", "expected"),
    [
        (1, 150_000, 0),  # 0.15 micro-USD
        (10, 50_000, 1),  # exactly 0.5: half-up
        (3, 500_000, 2),  # 1.5
        (7, 1_000_000, 7),
        (1_234_567, 75_000, 92_593),  # 92_592.525
    ],
)
def test_rounding_is_half_up_once(tokens: int, micro_per_mtok: int, expected: int) -> None:
    assert compute_cost(Pricing(micro_per_mtok, 0), Usage(input_tokens=tokens)).input_micro_usd == expected


def test_cache_writes_billed_at_the_cache_write_price() -> None:
    # claude-3-5-sonnet: $3 input, $0.30 cache read, $3.75 cache write per Mtok.
    pricing = Pricing(3_000_000, 15_000_000, 300_000, 3_750_000)
    usage = Usage(input_tokens=10_000, cached_input_tokens=2_000, cache_write_input_tokens=4_000)
    # 4,000 plain x $3 + 2,000 read x $0.30 + 4,000 written x $3.75 = 12,000 + 600 + 15,000 micro-USD
    assert compute_cost(pricing, usage).input_micro_usd == 27_600
    # no cache-write price: writes bill at the input price
    assert compute_cost(Pricing(3_000_000, 0, 300_000), usage).input_micro_usd == 24_600


def test_unknown_and_local_costs() -> None:
    usage = Usage(input_tokens=100, output_tokens=100)
    assert compute_cost(None, usage) == Cost(known=False)
    assert compute_cost(None, usage, local=True) == Cost(known=True, input_micro_usd=0, output_micro_usd=0)
    # A price set for a local model (internal chargeback) is honoured.
    assert compute_cost(Pricing(1_000_000, 0), usage, local=True).input_micro_usd == 100


@pytest.mark.parametrize(
    ("usd", "micro"),
    [
        (0.15, 150_000),
        (0.07, 70_000),
        (2.675, 2_675_000),
        (1e-7, 0),
        (5e-7, 1),
        (Decimal("18.75"), 18_750_000),
    ],
)
def test_usd_converts_exactly(usd: float | Decimal, micro: int) -> None:
    assert micro_usd_from_usd(usd) == micro


def test_negative_price_is_rejected() -> None:
    with pytest.raises(ValueError):
        micro_usd_from_usd(-1.0)


def test_embedding_models_with_dimensions_and_prices(catalog: Catalog) -> None:
    got = {
        (e.provider_type, e.model): (e.dimensions, e.input_micro_usd_per_mtok, e.output_micro_usd_per_mtok)
        for e in catalog.entries()
        if e.kind == "embedding"
    }
    assert got == {
        ("openai", "text-embedding-3-small"): (1536, 20_000, 0),
        ("openai", "text-embedding-3-large"): (3072, 130_000, 0),
        ("openai", "text-embedding-ada-002"): (1536, 100_000, 0),
        ("ollama", "nomic-embed-text"): (768, 0, 0),
        ("ollama", "mxbai-embed-large"): (1024, 0, 0),
        ("ollama", "all-minilm"): (384, 0, 0),
        ("bedrock", "amazon.titan-embed-text-v1"): (1536, 100_000, 0),
        ("bedrock", "amazon.titan-embed-text-v2:0"): (1024, 200_000, 0),
        # The source states no vector size for Cohere v3 on Bedrock: unknown, not guessed.
        ("bedrock", "cohere.embed-english-v3"): (None, 100_000, 0),
        ("bedrock", "cohere.embed-multilingual-v3"): (None, 100_000, 0),
        ("gemini", "gemini-embedding-001"): (3072, 150_000, 0),
        ("vertex", "gemini-embedding-001"): (3072, 150_000, 0),
    }
    assert all(
        e.kind == "chat" and e.dimensions is None
        for e in catalog.entries()
        if (e.provider_type, e.model) not in got
    )
