"""Gemini's model-dependent request rules: thinking, schemas and thought signatures.

Which Gemini models think with a token budget (2.5) or a level (3 and later), the budget
ranges Google documents per model, which models take plain JSON Schema
(`parametersJsonSchema`, `responseJsonSchema`) and which only Google's OpenAPI-subset
`Schema` (1.x and 2.0, converted here), and which reject a replayed function call without a
thought signature (3 and later). Pure functions; gemini_request calls them while it builds a
body, so every refusal here is an InvalidRequest raised before any upstream call.

Model families are read from the id (`gemini_version`): the request carries no capability
table of its own. An id that is not a Gemini name (a tuned model, Gemma on the Gemini API,
`gemini-flash-latest`) is treated as current: JSON Schema, budgeted thinking, no checks.
Sources: PROTOCOLS-CLOUD.md A3 (thinkingConfig, budgets as third-party docs summarise
Google's page), Google's thought-signatures page as quoted by the SDKs that inject its
documented bypass value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from broker import errors
from broker.types import CompletionRequest, ReasoningEffort

# Budgets an effort asks of a budgeted (2.5) model: inside every 2.5 model's range (Pro
# 128-32768, Flash 0-24576, Flash-Lite 512-24576), each step roughly quadrupling the room.
EFFORT_BUDGETS = {
    ReasoningEffort.MINIMAL: 512,
    ReasoningEffort.LOW: 2048,
    ReasoningEffort.MEDIUM: 8192,
    ReasoningEffort.HIGH: 24576,
}
# thinkingLevel on Gemini 3: Flash has all four; Pro has LOW and HIGH only.
_LEVELS = {
    ReasoningEffort.MINIMAL: "MINIMAL",
    ReasoningEffort.LOW: "LOW",
    ReasoningEffort.MEDIUM: "MEDIUM",
    ReasoningEffort.HIGH: "HIGH",
}
_PRO_LEVELS = {
    ReasoningEffort.MINIMAL: "LOW",
    ReasoningEffort.LOW: "LOW",
    ReasoningEffort.MEDIUM: "HIGH",
    ReasoningEffort.HIGH: "HIGH",
}
# (lowest budget that thinks, highest, whether 0 turns thinking off) per 2.5 tier.
_BUDGET_RANGES = {"pro": (128, 32768, False), "flash": (1, 24576, True), "flash-lite": (512, 24576, True)}
# The value Google documents for a function call whose signature is unavailable (a history
# from another model): it tells Gemini 3 not to validate the missing signature.
SKIP_SIGNATURE = "skip_thought_signature_validator"

_GEMINI = re.compile(r"gemini-(\d{1,2})(?:\.(\d{1,2}))?(?:-(pro|flash-lite|flash))?")


@dataclass(slots=True, frozen=True)
class GeminiVersion:
    major: int
    minor: int
    tier: str  # "pro", "flash", "flash-lite" or "" (an experimental or other name)


def gemini_version(model: str) -> GeminiVersion | None:
    """The version in a Gemini model id (`gemini-2.5-flash-lite-preview-09-2025`,
    `publishers/google/models/gemini-3-pro-preview`), or None for other names."""
    found = _GEMINI.search(model.lower())
    if found is None:
        return None
    return GeminiVersion(int(found.group(1)), int(found.group(2) or 0), found.group(3) or "")


def thinks_by_level(model: str) -> bool:
    """Gemini 3 and later: `thinkingLevel` (a budget is still accepted there)."""
    v = gemini_version(model)
    return v is not None and v.major >= 3


def needs_signatures(model: str) -> bool:
    """Gemini 3 and later reject a replayed function call turn without its thought signature."""
    return thinks_by_level(model)


def takes_json_schema(model: str) -> bool:
    """`parametersJsonSchema` / `responseJsonSchema` (plain JSON Schema): Gemini 2.5 and later;
    1.x and 2.0 take only the OpenAPI-subset `parameters` / `responseSchema`."""
    v = gemini_version(model)
    return v is None or (v.major, v.minor) >= (2, 5)


def _has_thinking(model: str) -> bool:
    v = gemini_version(model)
    return v is None or (v.major, v.minor) >= (2, 5)


@dataclass(slots=True, frozen=True)
class Thinking:
    config: dict[str, Any] | None  # generationConfig.thinkingConfig; None: not sent
    note: str = ""  # what the broker chose instead of what was asked, for a debug log


def thinking_for(request: CompletionRequest) -> Thinking:
    """generationConfig.thinkingConfig for the request's ReasoningConfig. Thought summaries are
    asked for (`includeThoughts`) whenever thinking is, so they reach the caller as reasoning."""
    r = request.params.reasoning
    if r is None:
        return Thinking(None)  # the model's default (2.5 and 3 think, summaries not returned)
    model = request.model
    v = gemini_version(model)
    if not _has_thinking(model):
        if r.disabled:
            return Thinking(None)  # it never thinks
        raise errors.InvalidRequest(
            [("params.reasoning", f"{model} does not think (thinking arrived with Gemini 2.5)")]
        )
    tier = v.tier if v is not None else ""
    if thinks_by_level(model):
        levels = _PRO_LEVELS if tier == "pro" else _LEVELS
        if r.disabled:
            level = levels[ReasoningEffort.MINIMAL]
            return Thinking({"thinkingLevel": level}, f"{model} cannot turn thinking off: level {level} sent")
        if r.budget_tokens is not None:
            return Thinking({"thinkingBudget": r.budget_tokens, "includeThoughts": True})
        effort = r.effort or ReasoningEffort.MEDIUM
        return Thinking({"thinkingLevel": levels[effort], "includeThoughts": True})
    low, high, can_disable = _BUDGET_RANGES.get(tier, (1, 32768, True))
    if r.disabled:
        if can_disable:
            return Thinking({"thinkingBudget": 0})
        return Thinking({"thinkingBudget": low}, f"{model} cannot turn thinking off: the minimum budget sent")
    if r.budget_tokens is not None:
        budget = r.budget_tokens
        if not low <= budget <= high and v is not None and tier in _BUDGET_RANGES:
            raise errors.InvalidRequest(
                [
                    (
                        "params.reasoning.budget_tokens",
                        f"{model} takes a thinking budget of {low} to {high} tokens, got {budget}",
                    )
                ]
            )
    else:
        budget = min(max(EFFORT_BUDGETS[r.effort or ReasoningEffort.MEDIUM], low), high)
    return Thinking({"thinkingBudget": budget, "includeThoughts": True})


# --- JSON Schema -> Google's OpenAPI-subset Schema (1.x and 2.0 models) -------------------

# The Schema fields those models take; anything else in a JSON Schema is dropped.
_SCHEMA_KEYS = frozenset(
    {
        "format", "title", "description", "nullable", "enum", "maxItems", "minItems", "required",
        "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example",
        "propertyOrdering", "default", "minimum", "maximum",
    }
)  # fmt: skip
_MAX_DEPTH = 32


def openapi_schema(schema: dict[str, Any], where: str) -> dict[str, Any]:
    """A JSON Schema as Google's `Schema`: upper-case types, `nullable` for a null in the type,
    local `$ref`s inlined; a recursive schema cannot be expressed there (InvalidRequest)."""
    defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    return _convert(schema, defs, where, 0, ())


def _convert(
    node: Any, defs: dict[str, Any], where: str, depth: int, seen: tuple[str, ...]
) -> dict[str, Any]:
    if not isinstance(node, dict):
        return {}
    if depth > _MAX_DEPTH:
        raise errors.InvalidRequest([(where, f"nested deeper than {_MAX_DEPTH} levels")])
    ref = node.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if not ref.startswith("#/") or name not in defs:
            raise errors.InvalidRequest([(where, f"$ref {ref[:80]!r} is not a local definition")])
        if name in seen:
            raise errors.InvalidRequest(
                [
                    (
                        where,
                        f"recursive schema ($ref {name!r}): this Gemini model takes none (2.5 and later do)",
                    )
                ]
            )
        return _convert(defs[name], defs, where, depth + 1, (*seen, name))
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _SCHEMA_KEYS}
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) < len(kind):
            out["nullable"] = True
        kind = kinds[0] if len(kinds) == 1 else None
        if len(kinds) > 1:
            out["anyOf"] = [{"type": k.upper()} for k in kinds if isinstance(k, str)]
    if isinstance(kind, str):
        out["type"] = kind.upper()
    if "const" in node:
        out["enum"] = [node["const"]]
    props = node.get("properties")
    if isinstance(props, dict):
        out["properties"] = {
            k: _convert(v, defs, f"{where}.properties.{k}", depth + 1, seen) for k, v in props.items()
        }
    if isinstance(node.get("items"), dict):
        out["items"] = _convert(node["items"], defs, f"{where}.items", depth + 1, seen)
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list):
            converted = [_convert(o, defs, f"{where}.{key}", depth + 1, seen) for o in options]
            nulls = [c for c in converted if c.get("type") == "NULL"]
            rest = [c for c in converted if c.get("type") != "NULL"]
            if nulls:
                out["nullable"] = True
            out["anyOf"] = rest
    return out
