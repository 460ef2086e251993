"""Anthropic's model-dependent request rules: thinking, effort and structured outputs.

Which Claude models think adaptively or only with a token budget, which have native
structured outputs (PROTOCOLS-2026 sections 1.2 and 2.2), and how a neutral request's
ReasoningConfig and JSON-schema format become `thinking`, `output_config` and `max_tokens`,
with the restrictions the API puts on sampling and tool_choice while thinking. Pure functions;
anthropic_wire calls them while it builds a body, so every refusal here is an InvalidRequest
raised before any upstream call.

Model families are read from the model id by name (`claude_version`), since the request
carries no capability table of its own. An id that is not a Claude name (an
Anthropic-compatible server's own model) is treated as an older model: budgeted thinking,
structured outputs by a forced tool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from broker import errors
from broker.types import (
    CompletionRequest,
    ReasoningEffort,
    ResponseFormat,
    ToolChoiceMode,
)

# Anthropic's smallest `thinking.budget_tokens` (the SDK's documented minimum).
MIN_BUDGET_TOKENS = 1024
# The budget an effort asks of a model that only thinks with a budget (Sonnet 4.5 and
# older). Chosen to match the effort ladder adaptive models use: minimal is the API's floor,
# each step up roughly quadruples or doubles the room to think.
EFFORT_BUDGETS = {
    ReasoningEffort.MINIMAL: 1024,
    ReasoningEffort.LOW: 2048,
    ReasoningEffort.MEDIUM: 8192,
    ReasoningEffort.HIGH: 16384,
}
# output_config.effort on adaptive models: the API has low/medium/high (and xhigh/max, not
# neutral); minimal has no equivalent and asks the least there is.
ADAPTIVE_EFFORT = {
    ReasoningEffort.MINIMAL: "low",
    ReasoningEffort.LOW: "low",
    ReasoningEffort.MEDIUM: "medium",
    ReasoningEffort.HIGH: "high",
}
# Families with no numbered predecessor: adaptive only, structured outputs native.
_NEW_FAMILIES = frozenset({"fable", "mythos"})
_CLAUDE = re.compile(r"claude-([a-z0-9.@:_-]+)")
_VERSION_PART = re.compile(r"\d{1,2}")


@dataclass(slots=True, frozen=True)
class ClaudeVersion:
    family: str  # "opus", "sonnet", "haiku", "fable", ...
    major: int  # 0 when the name carries no number (claude-mythos-preview)
    minor: int


def claude_version(model: str) -> ClaudeVersion | None:
    """The family and version in a Claude model id, or None for a name that is not Claude's.

    Both namings: `claude-sonnet-4-5[-20250929]` (family first, Claude 4 on) and
    `claude-3-5-sonnet-20241022` (version first); provider prefixes and suffixes
    (`anthropic.`, `@20251001`, `-v1:0`) are ignored, and a date is never a version."""
    found = _CLAUDE.search(model.lower())
    if found is None:
        return None
    parts = re.split(r"[-@:_.]", found.group(1))
    family_first = parts[0].isalpha()
    rest = parts[1:] if family_first else parts
    numbers: list[int] = []
    for part in rest[:2]:
        if not _VERSION_PART.fullmatch(part):
            break  # a date (8 digits), a word: the version is over
        numbers.append(int(part))
    if family_first:
        family = parts[0]
    else:
        after = rest[len(numbers)] if len(numbers) < len(rest) else ""
        family = after if after.isalpha() and numbers else ""
    if not family:
        return None
    major, minor = [*numbers, 0, 0][:2]
    return ClaudeVersion(family, major, minor)


def adaptive_thinking(model: str) -> bool:
    """Takes `thinking: {"type": "adaptive"}` and output_config.effort: Opus and Sonnet 4.6
    and later, every Claude 5 model, Fable and Mythos."""
    v = claude_version(model)
    if v is None:
        return False
    if v.family in _NEW_FAMILIES or v.major >= 5:
        return True
    return v.family in ("opus", "sonnet") and (v.major, v.minor) >= (4, 6)


def adaptive_only(model: str) -> bool:
    """Rejects `thinking.type: enabled` (a budget): Opus 4.7 and later, Claude 5, Fable, Mythos."""
    v = claude_version(model)
    if v is None:
        return False
    if v.family in _NEW_FAMILIES or v.major >= 5:
        return True
    return v.family == "opus" and (v.major, v.minor) >= (4, 7)


def native_structured_outputs(model: str) -> bool:
    """Has output_config.format json_schema: Sonnet, Opus and Haiku 4.5 and later."""
    v = claude_version(model)
    if v is None:
        return False
    if v.family in _NEW_FAMILIES or v.major >= 5:
        return True
    return v.family in ("opus", "sonnet", "haiku") and (v.major, v.minor) >= (4, 5)


# --- thinking ------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Thinking:
    """What a request's reasoning becomes on the wire."""

    config: dict[str, Any] | None = None  # the `thinking` field; None: not sent
    effort: str | None = None  # output_config.effort (adaptive models)
    budget: int | None = None  # thinking.budget_tokens: max_tokens must exceed it
    # Thinking was asked for but is not sent: the history's last tool-calling assistant turn
    # carries no signed block (PROTOCOLS-2026 1.2, "disable thinking for that request").
    withheld: bool = False

    @property
    def on(self) -> bool:
        return self.config is not None


def thinking_for(request: CompletionRequest, *, signed_tool_turn: bool) -> Thinking:
    """The thinking to send. `signed_tool_turn`: False when the last assistant turn with
    tool_use blocks has no thinking or redacted_thinking block (a history from another
    vendor after a fallback); the API would then reject thinking with a 400."""
    r = request.params.reasoning
    if r is None or r.disabled:
        return Thinking()  # Anthropic's default is off: nothing to send
    model = request.model
    if r.budget_tokens is not None:
        budget = r.budget_tokens
        if budget < MIN_BUDGET_TOKENS:
            raise errors.InvalidRequest(
                [
                    (
                        "params.reasoning.budget_tokens",
                        f"Anthropic's thinking budget is at least {MIN_BUDGET_TOKENS} tokens, got {budget}",
                    )
                ]
            )
        if adaptive_only(model):
            raise errors.InvalidRequest(
                [
                    (
                        "params.reasoning.budget_tokens",
                        f"{model} thinks adaptively only and takes no token budget; set an effort instead",
                    )
                ]
            )
        thinking = Thinking({"type": "enabled", "budget_tokens": budget}, budget=budget)
    elif r.effort is not None and adaptive_thinking(model):
        thinking = Thinking({"type": "adaptive"}, effort=ADAPTIVE_EFFORT[r.effort])
    elif r.effort is not None:
        budget = _effort_budget(request, r.effort)
        thinking = Thinking({"type": "enabled", "budget_tokens": budget}, budget=budget)
    else:
        return Thinking()
    if not signed_tool_turn:
        return Thinking(withheld=True)
    _check_sampling(request, thinking)
    return thinking


def _effort_budget(request: CompletionRequest, effort: ReasoningEffort) -> int:
    """The effort's budget, shrunk to half of a smaller ceiling (the caller's max_tokens, else
    the model's max output) so that thinking leaves room for the answer; never below the
    API's minimum (a ceiling that leaves no room is refused by max_tokens_for)."""
    budget = EFFORT_BUDGETS[effort]
    ceiling = request.params.max_tokens or request.max_output_tokens
    if ceiling is not None and budget >= ceiling:
        budget = max(MIN_BUDGET_TOKENS, ceiling // 2)
    return budget


def _check_sampling(request: CompletionRequest, thinking: Thinking) -> None:
    """The API's restrictions while thinking (PROTOCOLS-2026 1.2), all reported at once."""
    p = request.params
    v: list[tuple[str, str]] = []
    if p.temperature is not None and p.temperature != 1.0:
        v.append(
            (
                "params.temperature",
                f"must be 1 or unset while thinking (Anthropic rejects other values), got {p.temperature:g}",
            )
        )
    if p.top_p is not None and not 0.95 <= p.top_p <= 1.0:
        v.append(("params.top_p", f"must be 0.95 to 1 or unset while thinking, got {p.top_p:g}"))
    forced = request.tool_choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.TOOL)
    if forced and thinking.budget is not None:
        v.append(
            (
                "tool_choice",
                "Anthropic does not let a request think with a budget and force a tool; use AUTO, "
                "or an effort on a model with adaptive thinking",
            )
        )
    if v:
        raise errors.InvalidRequest(v)


def max_tokens_for(request: CompletionRequest, thinking: Thinking, fallback: int) -> int:
    """max_tokens: the caller's, else the usual default (`fallback` is the protocol's); with a
    thinking budget it must exceed the budget, so a default is the budget plus the usual
    output limit (capped by the model's max output, but always above the budget)."""
    wanted = request.params.max_tokens
    if wanted is not None and wanted < 1:
        raise errors.InvalidRequest([("params.max_tokens", f"must be at least 1, got {wanted}")])
    usual = request.output_limit(fallback) or fallback
    budget = thinking.budget
    if budget is None:
        return usual
    if wanted is not None:
        if wanted <= budget:
            raise errors.InvalidRequest(
                [
                    (
                        "params.max_tokens",
                        f"must be greater than the thinking budget (params.reasoning: {budget} tokens), "
                        f"got {wanted}: Anthropic counts thinking inside max_tokens",
                    )
                ]
            )
        return wanted
    total = budget + usual
    if request.max_output_tokens:
        total = min(total, request.max_output_tokens)
    return max(total, budget + 1)


# --- structured outputs --------------------------------------------------------------------


def forced_json_tool(request: CompletionRequest) -> str | None:
    """The name of the tool a JSON-schema answer is forced through on models without native
    structured outputs (its tool_use input is relayed as the answer's text), or None."""
    js = request.params.json_schema
    if request.params.response_format is not ResponseFormat.JSON_SCHEMA or js is None:
        return None
    return None if native_structured_outputs(request.model) else js.name


def structured_output(
    request: CompletionRequest, thinking: Thinking
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(output_config.format, the forced tool) for a JSON-schema answer; (None, None) without one."""
    p = request.params
    if p.response_format is not ResponseFormat.JSON_SCHEMA:
        return None, None
    js = p.json_schema
    if js is None:
        raise errors.InvalidRequest([("params.json_schema", "required with the JSON_SCHEMA response format")])
    if native_structured_outputs(request.model):
        return {"type": "json_schema", "schema": js.schema}, None
    # The forced-tool technique (PROTOCOLS-2026 2.2): the answer is the one tool's input.
    v: list[tuple[str, str]] = []
    why = f"{request.model} has no native structured outputs, so the schema is answered through a forced tool"
    if request.tools:
        v.append(("tools", f"cannot be combined with a JSON schema here: {why}"))
    if request.tool_choice.mode is not ToolChoiceMode.DEFAULT:
        v.append(("tool_choice", f"must be unset with a JSON schema here: {why}"))
    if thinking.budget is not None:
        v.append(("params.reasoning", f"thinking cannot be combined with a JSON schema here: {why}"))
    if v:
        raise errors.InvalidRequest(v)
    tool: dict[str, Any] = {"name": js.name}
    if js.description:
        tool["description"] = js.description
    tool["input_schema"] = js.schema
    return None, tool
