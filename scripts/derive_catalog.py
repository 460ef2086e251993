"""Derive broker/catalog/models.json from LiteLLM's model_prices_and_context_window.json.

Usage (from the repo root):
    .venv/bin/python scripts/derive_catalog.py [SOURCE] [--output PATH] [--date YYYY-MM-DD] [--check]

SOURCE defaults to ../shared/data/model_prices_and_context_window.json (relative to the repo
root). The output is deterministic (sorted keys, entries sorted by provider type then model,
two-space indent, trailing newline): re-running on the same source gives no diff, and
`--check` exits 1 when the committed file is stale. To refresh prices, update the source and
SOURCE_VERSION, pass --date (or edit DATE), re-run, and review the diff.

models.json schema (version 1):
    {
      "schema": 1,
      "models": [ENTRY, ...]        # sorted by (provider_type, model)
    }
    ENTRY = {
      "provider_type": "openai" | "anthropic" | "ollama" | "bedrock" | ...,
      "model": str,                 # the id callers send, e.g. "claude-sonnet-4-5"
      "context_window": int | null, # most input tokens accepted (LiteLLM max_input_tokens)
      "max_output_tokens": int | null,
      "vision": bool, "tools": bool, "json_mode": bool,
      "reasoning": bool,            # a reasoning model (LiteLLM supports_reasoning; see below)
      "structured_outputs": bool,   # JSON-schema formats / strict tools (see below)
      "documents": bool,            # PDF input (LiteLLM supports_pdf_input)
      # Prices: integer micro-USD per million tokens (1 USD/Mtok = 1_000_000), exact.
      "input_micro_usd_per_mtok": int | null,
      "output_micro_usd_per_mtok": int | null,
      "cached_input_micro_usd_per_mtok": int | null,       # cache reads; null = no separate price
      "cache_write_input_micro_usd_per_mtok": int | null,  # Anthropic cache creation (recorded only)
      "deprecation_date": "YYYY-MM-DD" | null,             # as the source states it
      "source": "litellm model_prices_and_context_window.json v1.80.0 key <original key>",
      "note": str | null,           # why facts came from a key other than the model's own
      "date": "YYYY-MM-DD",         # when the facts were taken
      "kind": "chat" | "embedding", # which RPC serves it (StreamComplete/Complete or Embed)
      "dimensions": int | null      # an embedding model's native vector size (LiteLLM output_vector_size)
    }

Field choices (why):
- context_window is max_input_tokens, not max_tokens: max_tokens is LiteLLM's legacy field
  (sometimes the output limit) and the broker's check is "does the prompt fit".
- A capability flag the source omits counts as absent: for OpenAI/Anthropic the source states
  every flag a model has (o1-mini omits tools and is right to).
- json_mode: the source has no "JSON object mode" flag. OpenAI: structured outputs
  (supports_response_schema) or function calling implies response_format json_object
  (both arrived with the 1106 models); the pre-1106 gpt-4 snapshots are the exception.
  Anthropic: supports_response_schema as stated. Ollama: always, since the server enforces
  `format: "json"` for every model.
- reasoning: LiteLLM's supports_reasoning (hidden reasoning tokens, billed as output and
  counted against the output limit). For OpenAI it decides the output-limit field: reasoning
  models (o-series, gpt-5 family) reject `max_tokens` and take `max_completion_tokens`. The
  source omits the flag for o1-mini, an o-series model that rejects `max_tokens` like the
  others; OPENAI_REASONING_GAPS sets it (named in the entry's note).
- structured_outputs: OpenAI: supports_response_schema. Anthropic: function calling (the
  broker uses native output_config.format where the model has it and a forced tool where it
  does not, so every tool-calling Claude can answer to a schema). Ollama: always (the server
  constrains `format: <schema>` for every model). documents: supports_pdf_input (Ollama:
  never, it takes no documents). The REASONING capability is the reasoning flag.
- Anthropic aliases (claude-sonnet-4-5, claude-3-5-haiku-latest, ...) point at a snapshot, so
  they take the snapshot's facts: the source's own alias keys sometimes disagree with the
  snapshot (claude-3-5-haiku-latest at $1/$5 vs $0.80/$4). LiteLLM's claude-4-opus-20250514
  and claude-4-sonnet-20250514 are not API ids and are left out.
- Bedrock (provider_type "bedrock"): LiteLLM's own Bedrock chat keys (litellm_provider bedrock
  or bedrock_converse) for Claude, Nova and Llama, model id == key, cross-region inference
  profiles included (`us.`, `eu.`, `apac.`, `global.`, `jp.`, `au.` prefixes: priced by the
  source per profile, regional ones often 10% above the base id). Selected by BEDROCK_CHAT
  (a pattern over the source's keys, minus BEDROCK_NOT_MODELS); flags as for Anthropic
  (structured outputs: Claude by its tools, others by supports_response_schema). Embeddings:
  Titan and Cohere by BEDROCK_EMBEDDING.
- Gemini (provider_type "gemini", the Gemini API): LiteLLM's `gemini/` keys (GEMINI);
  vision, tools, reasoning and documents as the source flags them (supports_vision,
  supports_function_calling, supports_reasoning, supports_pdf_input), json_mode and
  structured_outputs by supports_response_schema (responseMimeType / responseJsonSchema).
  Embeddings: gemini-embedding-001. Vertex AI (provider_type "vertex"): Gemini by the
  source's Vertex keys (VERTEX_GEMINI: litellm_provider vertex_ai-language-models, priced
  apart from the Gemini API's), and Claude on Vertex by the Anthropic snapshot's key
  (VERTEX_CLAUDE: Vertex's `@` ids at Anthropic's prices and facts, as type anthropic; the
  source's own vertex_ai/ key is compared and a difference named in the note). Long-context
  tiers: a Pricing holds one price per kind, so rows whose source key has
  *_above_200k_tokens prices keep the base tier and name the higher one in the note (a
  prompt over 200k tokens is then under-billed unless config sets a price).
- Azure OpenAI has no rows of its own: a deployment takes the OpenAI row of the model it runs
  (config `deployments`, ProviderConfig.catalog_key), so Azure is at OpenAI's prices unless
  config sets others.
- Ollama: local, so prices are 0. The source lists few Ollama models; for the common families
  it lacks, facts come from the same open weights at another host (named in source and note).
  Ollama's own /api/show, at discovery, overrides these for capabilities and context.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "model_prices_and_context_window.json"
DEFAULT_OUTPUT = REPO_ROOT / "broker" / "catalog" / "models.json"
SOURCE_VERSION = "v1.80.0"
SOURCE_PREFIX = f"litellm model_prices_and_context_window.json {SOURCE_VERSION} key "
DATE = "2026-11-25"
SCHEMA_VERSION = 1
MICRO_PER_UNIT = Decimal(1_000_000)

# OpenAI: model id == source key. Dated snapshots are listed because the broker never falls
# back from a snapshot to its family (prices differ: gpt-4o-2024-05-13 is twice gpt-4o).
# o1-mini-2024-09-12 is left out: retired, and the source prices it unlike its own alias.
OPENAI = [
    "gpt-3.5-turbo", "gpt-3.5-turbo-0125", "gpt-3.5-turbo-1106",
    "gpt-4", "gpt-4-0613", "gpt-4-turbo", "gpt-4-turbo-2024-04-09", "gpt-4-turbo-preview",
    "gpt-4-0125-preview", "gpt-4-1106-preview",
    "gpt-4o", "gpt-4o-2024-05-13", "gpt-4o-2024-08-06", "gpt-4o-2024-11-20",
    "gpt-4o-mini", "gpt-4o-mini-2024-07-18",
    "gpt-4.1", "gpt-4.1-2025-04-14", "gpt-4.1-mini", "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano", "gpt-4.1-nano-2025-04-14",
    "o1", "o1-2024-12-17", "o1-mini", "o3", "o3-2025-04-16", "o3-mini", "o3-mini-2025-01-31",
    "o4-mini", "o4-mini-2025-04-16",
    "gpt-5", "gpt-5-2025-08-07", "gpt-5-mini", "gpt-5-mini-2025-08-07",
    "gpt-5-nano", "gpt-5-nano-2025-08-07", "gpt-5.1", "gpt-5.1-2025-11-13",
]  # fmt: skip
OPENAI_NO_JSON_MODE = {"gpt-4", "gpt-4-0613"}  # pre-1106: no response_format json_object
# o-series models the source does not flag supports_reasoning (see the module doc).
OPENAI_REASONING_GAPS = {"o1-mini"}

# Anthropic: model id -> source key (the snapshot, for aliases).
ANTHROPIC = {
    "claude-3-haiku-20240307": "claude-3-haiku-20240307",
    "claude-3-opus-20240229": "claude-3-opus-20240229",
    "claude-3-opus-latest": "claude-3-opus-20240229",
    "claude-3-5-sonnet-20240620": "claude-3-5-sonnet-20240620",
    "claude-3-5-sonnet-20241022": "claude-3-5-sonnet-20241022",
    "claude-3-5-sonnet-latest": "claude-3-5-sonnet-20241022",
    "claude-3-5-haiku-20241022": "claude-3-5-haiku-20241022",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
    "claude-3-7-sonnet-20250219": "claude-3-7-sonnet-20250219",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-sonnet-4-20250514": "claude-sonnet-4-20250514",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-opus-4-20250514": "claude-opus-4-20250514",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-opus-4-1-20250805": "claude-opus-4-1-20250805",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-sonnet-4-5-20250929": "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5-20251001": "claude-haiku-4-5-20251001",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
}

# Ollama: library name -> source key. Borrowed keys are the size Ollama's default tag pulls
# where the source has it, and one that states the tools/vision flags.
OLLAMA = {
    "llama3": "ollama/llama3",
    "llama3.1": "ollama/llama3.1",
    "llama3.2": "watsonx/meta-llama/llama-3-2-3b-instruct",
    "llama3.3": "watsonx/meta-llama/llama-3-3-70b-instruct",
    "gemma2": "groq/gemma2-9b-it",
    "gemma3": "gemini/gemma-3-27b-it",
    "mistral": "ollama/mistral",
    "mixtral": "ollama/mixtral-8x7B-Instruct-v0.1",
    "qwen2.5": "together_ai/Qwen/Qwen2.5-7B-Instruct-Turbo",
    "phi3": "azure_ai/Phi-3-mini-4k-instruct",
    "phi4": "azure_ai/Phi-4",
}

# Embedding models. OpenAI: model id == source key (mode "embedding"). Ollama: the source has
# none of these, so the facts are the library page's (name -> context, dimensions); local, free.
OPENAI_EMBEDDING = ["text-embedding-3-large", "text-embedding-3-small", "text-embedding-ada-002"]
OLLAMA_EMBEDDING = {
    "all-minilm": (512, 384),
    "mxbai-embed-large": (512, 1024),
    "nomic-embed-text": (8192, 768),
}


# Bedrock: the source's own chat keys for Claude, Nova and Llama (optionally behind a
# cross-region inference profile prefix); the model id is the key.
BEDROCK_CHAT = re.compile(
    r"^((us|eu|apac|global|jp|au)\.)?"
    r"(anthropic\.claude-(3|sonnet|opus|haiku)[a-z0-9.\-]*-v\d+:\d+"
    r"|amazon\.nova-(micro|lite|pro|premier)-v1:0"
    r"|meta\.llama[0-9a-z.\-]*-instruct-v1:0)$"
)
# Keys the source has that are no Bedrock model id (there is no Claude 3.7 Sonnet of 2024-06).
BEDROCK_NOT_MODELS = {"anthropic.claude-3-7-sonnet-20240620-v1:0"}
BEDROCK_PROVIDERS = ("bedrock", "bedrock_converse")
BEDROCK_EMBEDDING = [
    "amazon.titan-embed-text-v1",
    "amazon.titan-embed-text-v2:0",
    "cohere.embed-english-v3",
    "cohere.embed-multilingual-v3",
]


def bedrock_keys(source: dict[str, Any]) -> list[str]:
    """The Bedrock chat keys BEDROCK_CHAT selects, in the source's order."""
    return [
        k
        for k, v in source.items()
        if isinstance(v, dict)
        and v.get("litellm_provider") in BEDROCK_PROVIDERS
        and v.get("mode") == "chat"
        and BEDROCK_CHAT.match(k)
        and k not in BEDROCK_NOT_MODELS
    ]


def _bedrock_entry(model: str, raw: dict[str, Any]) -> dict[str, Any]:
    # The anthropic rules read the flags and all four prices as the source states them.
    entry = _entry("anthropic", model, model, raw)
    entry["provider_type"] = "bedrock"
    if ".anthropic." not in f".{model}":
        entry["structured_outputs"] = raw.get("supports_response_schema") is True
        entry["json_mode"] = raw.get("supports_response_schema") is True
    entry["note"] = None
    return entry


def bedrock_entries(source: dict[str, Any], date: str, problems: list[str]) -> list[dict[str, Any]]:
    """Claude, Nova and Llama on Bedrock (chat) and the Titan and Cohere embedding models."""
    out = [_bedrock_entry(k, source[k]) | {"date": date} for k in bedrock_keys(source)]
    if not out:
        problems.append("bedrock: no source key matches BEDROCK_CHAT")
    return out + vendor_embedding_entries("bedrock", BEDROCK_EMBEDDING, source, date, problems)


def vendor_embedding_entries(
    provider_type: str, models: Iterable[str], source: dict[str, Any], date: str, problems: list[str]
) -> list[dict[str, Any]]:
    """Embedding rows for models the source lists under their own id as the vendor's
    embedding entries; a key that is missing or is anything else is a problem, not a row."""
    out = []
    for model in models:
        raw = source.get(model)
        if (
            not isinstance(raw, dict)
            or raw.get("litellm_provider") != provider_type
            or raw.get("mode") != "embedding"
        ):
            problems.append(
                f"{provider_type}/{model}: source key {model!r} is no {provider_type} embedding entry"
            )
            continue
        out.append(_embedding_entry(provider_type, model, raw) | {"date": date})
    return out


# Gemini API: model id -> LiteLLM key.
GEMINI = {
    "gemini-2.5-pro": "gemini/gemini-2.5-pro",
    "gemini-2.5-flash": "gemini/gemini-2.5-flash",
    "gemini-2.5-flash-lite": "gemini/gemini-2.5-flash-lite",
    "gemini-2.5-flash-preview-09-2025": "gemini/gemini-2.5-flash-preview-09-2025",
    "gemini-2.5-flash-lite-preview-09-2025": "gemini/gemini-2.5-flash-lite-preview-09-2025",
    "gemini-2.0-flash": "gemini/gemini-2.0-flash",
    "gemini-2.0-flash-001": "gemini/gemini-2.0-flash-001",
    "gemini-2.0-flash-lite": "gemini/gemini-2.0-flash-lite",
}
GEMINI_EMBEDDING = {"gemini-embedding-001": "gemini/gemini-embedding-001"}
# Vertex AI's Gemini: model id -> LiteLLM's Vertex key (the bare id).
VERTEX_GEMINI = {
    m: m
    for m in (
        "gemini-2.5-pro",
        "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
        "gemini-2.0-flash",
        "gemini-2.0-flash-lite",
    )
}
VERTEX_GEMINI_EMBEDDING = {"gemini-embedding-001": "gemini-embedding-001"}
# Claude on Vertex: the Vertex model id -> the Anthropic snapshot whose facts and prices apply.
VERTEX_CLAUDE = {
    "claude-3-haiku@20240307": "claude-3-haiku-20240307",
    "claude-3-5-haiku@20241022": "claude-3-5-haiku-20241022",
    "claude-3-5-sonnet-v2@20241022": "claude-3-5-sonnet-20241022",
    "claude-3-7-sonnet@20250219": "claude-3-7-sonnet-20250219",
    "claude-sonnet-4@20250514": "claude-sonnet-4-20250514",
    "claude-opus-4@20250514": "claude-opus-4-20250514",
    "claude-opus-4-1@20250805": "claude-opus-4-1-20250805",
    "claude-sonnet-4-5@20250929": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5@20251001": "claude-haiku-4-5-20251001",
}
_GOOGLE_CHAT = {"gemini": "gemini", "vertex": "vertex_ai-language-models"}
_GOOGLE_EMBEDDING = {"gemini": "gemini", "vertex": "vertex_ai-embedding-models"}


def _tier_note(raw: dict[str, Any]) -> str | None:
    """The long-context prices the catalogue cannot hold, named for the reader."""
    tiers = [
        f"{name.removesuffix('_cost_per_token_above_200k_tokens').replace('_token_cost_above_200k_tokens', '')} "
        f"${(Decimal(raw[name]) * MICRO_PER_UNIT).normalize():f}"
        for name in sorted(raw)
        if name.endswith("above_200k_tokens")
    ]
    if not tiers:
        return None
    return (
        "over 200k prompt tokens the source prices per Mtok "
        + ", ".join(tiers)
        + ": the catalogue keeps the base tier (config can set a price)"
    )


def _gemini_entry(provider_type: str, model: str, key: str, raw: dict[str, Any]) -> dict[str, Any]:
    schema = raw.get("supports_response_schema") is True
    return {
        "provider_type": provider_type,
        "model": model,
        "context_window": _opt_int(raw.get("max_input_tokens")),
        "max_output_tokens": _opt_int(raw.get("max_output_tokens")),
        "vision": raw.get("supports_vision") is True,
        "tools": raw.get("supports_function_calling") is True,
        "json_mode": schema,
        "reasoning": raw.get("supports_reasoning") is True,
        "structured_outputs": schema,
        "documents": raw.get("supports_pdf_input") is True,
        "input_micro_usd_per_mtok": micro_usd_per_mtok(raw.get("input_cost_per_token")),
        "output_micro_usd_per_mtok": micro_usd_per_mtok(raw.get("output_cost_per_token")),
        "cached_input_micro_usd_per_mtok": micro_usd_per_mtok(raw.get("cache_read_input_token_cost")),
        # Gemini's explicit cache bills storage per hour, not a write price per token.
        "cache_write_input_micro_usd_per_mtok": None,
        "deprecation_date": raw.get("deprecation_date"),
        "source": SOURCE_PREFIX + key,
        "note": _tier_note(raw),
        "kind": "chat",
        "dimensions": None,
    }


def _vertex_claude_entry(model: str, key: str, source: dict[str, Any]) -> dict[str, Any]:
    entry = _entry("anthropic", model, key, source[key])
    entry["provider_type"] = "vertex"
    notes = ["Anthropic's snapshot facts and prices"]
    own = source.get(f"vertex_ai/{model}")
    if isinstance(own, dict):
        fields = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost")
        differ = [f for f in fields if own.get(f) != source[key].get(f)]
        notes.append(
            f"the source's vertex_ai/{model} differs in {', '.join(differ)}"
            if differ
            else f"vertex_ai/{model} agrees"
        )
    tier = _tier_note(source[key])
    entry["note"] = "; ".join(notes + ([tier] if tier else []))
    return entry


def google_entries(source: dict[str, Any], date: str, problems: list[str]) -> list[dict[str, Any]]:
    """Gemini on the Gemini API and on Vertex AI, Claude on Vertex AI, their embedding models."""
    out: list[dict[str, Any]] = []
    for provider_type, table in (("gemini", GEMINI), ("vertex", VERTEX_GEMINI)):
        for model, key in table.items():
            raw = source.get(key)
            if (
                not isinstance(raw, dict)
                or raw.get("litellm_provider") != _GOOGLE_CHAT[provider_type]
                or raw.get("mode") != "chat"
            ):
                problems.append(
                    f"{provider_type}/{model}: source key {key!r} is no {_GOOGLE_CHAT[provider_type]} chat entry"
                )
                continue
            out.append(_gemini_entry(provider_type, model, key, raw) | {"date": date})
    for provider_type, table in (("gemini", GEMINI_EMBEDDING), ("vertex", VERTEX_GEMINI_EMBEDDING)):
        for model, key in table.items():
            raw = source.get(key)
            if (
                not isinstance(raw, dict)
                or raw.get("litellm_provider") != _GOOGLE_EMBEDDING[provider_type]
                or raw.get("mode") != "embedding"
            ):
                problems.append(f"{provider_type}/{model}: source key {key!r} is no embedding entry")
                continue
            entry = _embedding_entry(provider_type, model, raw)
            out.append(entry | {"source": SOURCE_PREFIX + key, "date": date})
    for model, key in VERTEX_CLAUDE.items():
        raw = source.get(key)
        if (
            not isinstance(raw, dict)
            or raw.get("litellm_provider") != "anthropic"
            or raw.get("mode") != "chat"
        ):
            problems.append(f"vertex/{model}: source key {key!r} is no anthropic chat entry")
            continue
        out.append(_vertex_claude_entry(model, key, source) | {"date": date})
    return out


def _embedding_entry(provider_type: str, model: str, raw: dict[str, Any] | None) -> dict[str, Any]:
    if raw is not None:
        context, dims = _opt_int(raw.get("max_input_tokens")), _opt_int(raw.get("output_vector_size"))
        prices = (micro_usd_per_mtok(raw.get("input_cost_per_token")), 0)
        source, note = SOURCE_PREFIX + model, None
    else:
        context, dims = OLLAMA_EMBEDDING[model]
        prices = (0, 0)
        source, note = (
            "ollama.com/library/" + model,
            "not in the source: context and dimensions from the library page; price 0 (local)",
        )
    return {
        "provider_type": provider_type,
        "model": model,
        "context_window": context,
        "max_output_tokens": None,
        "vision": False,
        "tools": False,
        "json_mode": False,
        "reasoning": False,
        "structured_outputs": False,
        "documents": False,
        "input_micro_usd_per_mtok": prices[0],
        "output_micro_usd_per_mtok": prices[1],
        "cached_input_micro_usd_per_mtok": None,
        "cache_write_input_micro_usd_per_mtok": None,
        "deprecation_date": None,
        "source": source,
        "note": note,
        "kind": "embedding",
        "dimensions": dims,
    }


def micro_usd_per_mtok(per_token: Any) -> int | None:
    """USD per token (exact Decimal from the JSON text) -> integer micro-USD per Mtok, half-up."""
    if per_token is None:
        return None
    scaled = Decimal(per_token) * MICRO_PER_UNIT * MICRO_PER_UNIT
    rounded = scaled.quantize(Decimal(1), rounding=ROUND_HALF_UP)
    if rounded != scaled:
        print(f"warning: {per_token} USD/token is not a whole micro-USD per Mtok", file=sys.stderr)
    return int(rounded)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _entry(provider_type: str, model: str, key: str, raw: dict[str, Any]) -> dict[str, Any]:
    vision = raw.get("supports_vision") is True
    tools = raw.get("supports_function_calling") is True
    schema = raw.get("supports_response_schema") is True
    reasoning = raw.get("supports_reasoning") is True
    documents = raw.get("supports_pdf_input") is True
    structured = schema if provider_type == "openai" else tools if provider_type == "anthropic" else True
    note: str | None = None
    cache_write = micro_usd_per_mtok(raw.get("cache_creation_input_token_cost"))
    if provider_type == "openai":
        json_mode = (schema or tools) and model not in OPENAI_NO_JSON_MODE
        if model in OPENAI_REASONING_GAPS and not reasoning:
            reasoning = True
            note = "reasoning: the source omits supports_reasoning for this o-series model"
        prices = (
            micro_usd_per_mtok(raw.get("input_cost_per_token")),
            micro_usd_per_mtok(raw.get("output_cost_per_token")),
            micro_usd_per_mtok(raw.get("cache_read_input_token_cost")),
        )
    elif provider_type == "anthropic":
        json_mode = schema
        prices = (
            micro_usd_per_mtok(raw.get("input_cost_per_token")),
            micro_usd_per_mtok(raw.get("output_cost_per_token")),
            micro_usd_per_mtok(raw.get("cache_read_input_token_cost")),
        )
        if key != model:
            note = f"alias of {key}: facts from the snapshot's key"
    else:
        json_mode = True
        prices, cache_write = (0, 0, None), None
        documents = False
        if not key.startswith("ollama/"):
            note = "the same open weights at another host: capabilities and context only; price 0 (local)"
    return {
        "provider_type": provider_type,
        "model": model,
        "context_window": _opt_int(raw.get("max_input_tokens")),
        "max_output_tokens": _opt_int(raw.get("max_output_tokens")),
        "vision": vision,
        "tools": tools,
        "json_mode": json_mode,
        "reasoning": reasoning,
        "structured_outputs": structured,
        "documents": documents,
        "input_micro_usd_per_mtok": prices[0],
        "output_micro_usd_per_mtok": prices[1],
        "cached_input_micro_usd_per_mtok": prices[2],
        "cache_write_input_micro_usd_per_mtok": cache_write,
        "deprecation_date": raw.get("deprecation_date"),
        "source": SOURCE_PREFIX + key,
        "note": note,
        "kind": "chat",
        "dimensions": None,
    }


def derive(source: dict[str, Any], date: str) -> dict[str, Any]:
    """The catalogue document for a parsed source (floats parsed as Decimal)."""
    wanted = (
        [("openai", m, m) for m in OPENAI]
        + [("anthropic", m, k) for m, k in ANTHROPIC.items()]
        + [("ollama", m, k) for m, k in OLLAMA.items()]
    )
    problems: list[str] = []
    models: list[dict[str, Any]] = []
    for provider_type, model, key in wanted:
        raw = source.get(key)
        if not isinstance(raw, dict):
            problems.append(f"{provider_type}/{model}: source key {key!r} is missing")
            continue
        # Vendor keys must be the vendor's own chat entries; a renamed key must not slip in.
        vendor_chat = raw.get("litellm_provider") == provider_type and raw.get("mode") == "chat"
        if provider_type != "ollama" and not vendor_chat:
            problems.append(f"{provider_type}/{model}: source key {key!r} is no {provider_type} chat entry")
            continue
        models.append(_entry(provider_type, model, key, raw) | {"date": date})
    models += vendor_embedding_entries("openai", OPENAI_EMBEDDING, source, date, problems)
    for model in OLLAMA_EMBEDDING:
        models.append(_embedding_entry("ollama", model, None) | {"date": date})
    models += bedrock_entries(source, date, problems)
    models += google_entries(source, date, problems)
    if problems:
        raise SystemExit("cannot derive the catalogue:\n  " + "\n  ".join(problems))
    models.sort(key=lambda e: (e["provider_type"], e["model"]))
    return {"schema": SCHEMA_VERSION, "models": models}


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--date", default=DATE, help="the date recorded on every entry (YYYY-MM-DD)")
    parser.add_argument("--check", action="store_true", help="exit 1 if --output differs; write nothing")
    args = parser.parse_args(argv)
    # parse_float=Decimal: prices stay the exact decimal text of the source, never binary floats.
    source = json.loads(args.source.read_text(encoding="utf-8"), parse_float=Decimal)
    text = render(derive(source, args.date))
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: re-run scripts/derive_catalog.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    counts: dict[str, int] = {}
    for entry in json.loads(text)["models"]:
        counts[entry["provider_type"]] = counts.get(entry["provider_type"], 0) + 1
    print(f"wrote {args.output}: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
