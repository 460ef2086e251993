"""What the fake Anthropic API rejects in a `POST /v1/messages` body, in the API's words.

The field checks the real API makes cheaply (required and unknown fields, temperature range,
tool_use/tool_result pairing) and the 2026 rules of PROTOCOLS-2026: thinking's budget and
max_tokens, sampling and forced tools while thinking, a tool loop that must carry its signed
thinking back unmodified, at most four cache_control breakpoints and none on thinking, 1h
before 5m, output_config's shape. Error texts are the API's where one was recorded or quoted
(PROTOCOLS-2026 marks them [3p]); the top_p, TTL-order and output_config texts are the
fake's own (the API's were not found). `Signatures` is the fake's memory of the thinking it signed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
from typing import Any

# Top-level fields the Messages API accepts; anything else is "Extra inputs are not permitted".
KNOWN_FIELDS = {
    "model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k", "stop_sequences",
    "stream", "metadata", "tools", "tool_choice", "thinking", "service_tier", "container",
    "mcp_servers", "context_management", "output_config", "inference_geo", "cache_control",
}  # fmt: skip
_TOOL_RESULT_MESSAGE = (
    "messages.{i}: Messages following tool_use blocks must begin with a matching number of tool_result blocks"
)
_NO_THINKING_BLOCK = (
    "messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `tool_use`. "
    "When `thinking` is enabled, a final `assistant` message must start with a thinking block "
    "(preceeding the lastmost set of `tool_use` and `tool_result` blocks). To avoid this requirement, "
    "disable `thinking`."
)
_MODIFIED = (
    "messages.{i}.content.{j}: The `thinking` blocks in the latest assistant message cannot be modified. "
    "These blocks must remain as they were in the original response."
)
_EFFORTS = {"low", "medium", "high", "xhigh", "max"}
_SCHEMA_KEYS = {"type", "schema"}


class Signatures:
    """The thinking this fake signed and the redacted blocks it made, to check them coming back."""

    def __init__(self) -> None:
        self._key = b"fake-anthropic-thinking-key"
        self._thinking: dict[str, str] = {}  # signature -> the exact thinking text it covers
        self._redacted: set[str] = set()
        self._ids = itertools.count(1)

    def sign(self, thinking: str, signature: str | None = None) -> str:
        """A signature for `thinking` (one given is remembered as is): base64 as the API's."""
        if signature is None:
            mac = hmac.new(self._key, thinking.encode(), hashlib.sha256).digest()
            signature = base64.b64encode(b"\x12\x08fake" + mac + mac[:17]).decode()
        self._thinking[signature] = thinking
        return signature

    def redacted(self, data: str | None = None) -> str:
        if data is None:
            raw = hmac.new(self._key, b"redacted-%d" % next(self._ids), hashlib.sha512).digest()
            data = base64.b64encode(b"\x12\x09redacted" + raw).decode()
        self._redacted.add(data)
        return data

    def problem(self, block: dict[str, Any], i: int, j: int) -> str | None:
        if block.get("type") == "redacted_thinking":
            if block.get("data") not in self._redacted:
                return f"messages.{i}.content.{j}: Invalid `data` in `redacted_thinking` block"
            return None
        signature = block.get("signature")
        if not isinstance(signature, str) or signature not in self._thinking:
            return f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
        if block.get("thinking") != self._thinking[signature]:
            return _MODIFIED.format(i=i, j=j)
        return None


def validate(body: dict[str, Any], signatures: Signatures) -> str | None:
    """The first problem the real API would report, in its words, or None."""
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            return f"{name}: Field required"
    for name in body:
        if name not in KNOWN_FIELDS:
            return f"{name}: Extra inputs are not permitted"
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not 0 <= temperature <= 1:
        return "temperature: Input should be less than or equal to 1"
    messages = body["messages"]
    for check in (_pairing, _thinking, _cache_control, _output_config):
        problem = check(body, messages, signatures)
        if problem:
            return problem
    return None


def _pairing(body: dict[str, Any], messages: list[Any], signatures: Signatures) -> str | None:
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if content in ("", []) and not (i + 1 == len(messages) and msg.get("role") == "assistant"):
            return (
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        if msg.get("role") != "assistant" or not isinstance(content, list):
            continue
        for j, block in enumerate(content):
            if block.get("type") in ("thinking", "redacted_thinking"):
                problem = signatures.problem(block, i, j)
                if problem:
                    return problem
        uses = [b.get("id") for b in content if b.get("type") == "tool_use"]
        if not uses or i + 1 == len(messages):
            continue  # a trailing assistant turn is a prefill, not a conversation yet
        following = messages[i + 1].get("content")
        following = following if isinstance(following, list) else []
        results = [b.get("tool_use_id") for b in following[: len(uses)] if b.get("type") == "tool_result"]
        if messages[i + 1].get("role") != "user" or sorted(results) != sorted(uses):
            return _TOOL_RESULT_MESSAGE.format(i=i + 1)
    return None


def _thinking(body: dict[str, Any], messages: list[Any], signatures: Signatures) -> str | None:
    thinking = body.get("thinking")
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return None
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int):
            return "thinking.enabled.budget_tokens: Field required"
        if budget < 1024:
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        if body["max_tokens"] <= budget:
            return "`max_tokens` must be greater than `thinking.budget_tokens`"
        choice = body.get("tool_choice") or {}
        if choice.get("type") in ("any", "tool"):
            return "Thinking may not be enabled when tool_choice forces tool use."
    elif kind != "adaptive":
        return (
            "thinking: Input tag does not match any of the expected tags: 'adaptive', 'disabled', 'enabled'"
        )
    if body.get("temperature", 1) != 1:
        return "`temperature` may only be set to 1 when thinking is enabled or in adaptive mode"
    top_p = body.get("top_p")
    if top_p is not None and not 0.95 <= top_p <= 1:
        return "`top_p` must be between 0.95 and 1 when thinking is enabled"  # the fake's words
    last = next(
        ((i, m) for i, m in reversed(list(enumerate(messages))) if m.get("role") == "assistant"), None
    )
    if last is not None and isinstance(last[1].get("content"), list):
        content = last[1]["content"]
        kinds = [b.get("type") for b in content]
        if "tool_use" in kinds:
            before = kinds[: kinds.index("tool_use")]
            if "thinking" not in before and "redacted_thinking" not in before:
                return _NO_THINKING_BLOCK.format(i=last[0])
    return None


def _cache_control(body: dict[str, Any], messages: list[Any], signatures: Signatures) -> str | None:
    marks: list[tuple[str, Any]] = []
    for i, tool in enumerate(body.get("tools") or []):
        if "cache_control" in tool:
            marks.append((f"tools.{i}", tool["cache_control"]))
    system = body.get("system")
    if isinstance(system, list):
        for i, block in enumerate(system):
            if "cache_control" in block:
                marks.append((f"system.{i}", block["cache_control"]))
    for i, msg in enumerate(messages):
        content = msg.get("content")
        for j, block in enumerate(content if isinstance(content, list) else []):
            where = f"messages.{i}.content.{j}"
            if block.get("type") in ("thinking", "redacted_thinking") and "cache_control" in block:
                return f"{where}.{block['type']}.cache_control: Extra inputs are not permitted"
            if "cache_control" in block:
                marks.append((where, block["cache_control"]))
            inner = block.get("content") if block.get("type") == "tool_result" else None
            for k, sub in enumerate(inner if isinstance(inner, list) else []):
                if "cache_control" in sub:
                    marks.append((f"{where}.content.{k}", sub["cache_control"]))
    if len(marks) > 4:
        return f"A maximum of 4 blocks with cache_control may be provided. Found {len(marks)}."
    seen_short = False
    for where, mark in marks:
        if not isinstance(mark, dict) or mark.get("type") != "ephemeral":
            return f"{where}.cache_control.type: Input should be 'ephemeral'"
        ttl = mark.get("ttl", "5m")
        if ttl not in ("5m", "1h"):
            return f"{where}.cache_control.ttl: Input should be '5m' or '1h'"
        if ttl == "5m":
            seen_short = True
        elif seen_short:
            return f"{where}.cache_control: a ttl='1h' cache_control block must not come after a ttl='5m' one"
    return None


def _output_config(body: dict[str, Any], messages: list[Any], signatures: Signatures) -> str | None:
    config = body.get("output_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        return "output_config: Input should be an object"
    for key in config:
        if key not in ("effort", "format"):
            return f"output_config.{key}: Extra inputs are not permitted"
    if "effort" in config and config["effort"] not in _EFFORTS:
        return "output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'"
    fmt = config.get("format")
    if fmt is not None:
        if (
            not isinstance(fmt, dict)
            or fmt.get("type") != "json_schema"
            or not isinstance(fmt.get("schema"), dict)
        ):
            return "output_config.format: Input should be a valid json_schema format"
        extra = set(fmt) - _SCHEMA_KEYS
        if extra:
            return f"output_config.format.{sorted(extra)[0]}: Extra inputs are not permitted"
    return None
