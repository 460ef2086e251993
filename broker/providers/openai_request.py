"""The Chat Completions request body: a neutral CompletionRequest -> `POST chat/completions` JSON.

Pure functions, no I/O; `openai_wire` re-exports `build_body` and the limit rule. The body
differs by who serves the protocol (`WireTarget`): api.openai.com takes
`max_completion_tokens` whenever reasoning is asked for and calls the end user
`safety_identifier`; OpenRouter takes reasoning as an object (`"reasoning": {...}`), the
others as `reasoning_effort` (PROTOCOLS-2026.md 1.1, 1.4). Every request the protocol cannot
express is an `errors.InvalidRequest` naming the field, raised before any upstream call.

What is left out on purpose:
- ReasoningParts in history are dropped: Chat Completions carries no reasoning back, and Groq
  rejects `reasoning_content` on assistant messages. Gap: DeepSeek's thinking mode wants the
  `reasoning_content` of an assistant turn that called tools sent back (400 otherwise); a
  caller of DeepSeek can put it there through provider_options only for the whole request,
  not per message, so such a tool loop needs thinking turned off.
- Cache breakpoints are ignored: OpenAI and the compatible servers cache prefixes themselves.
- Tags of the request metadata are not sent (`metadata` needs `store: true` upstream).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from broker import errors, schema_rules
from broker.providers import kinds
from broker.providers.options import merge_options
from broker.types import (
    CompletionRequest,
    ContentPart,
    DocumentPart,
    ImagePart,
    Message,
    ReasoningConfig,
    ReasoningPart,
    ResponseFormat,
    Role,
    TextPart,
    Tool,
    ToolChoiceMode,
)

MAX_COMPLETION_TOKENS = "max_completion_tokens"
MAX_TOKENS = "max_tokens"
AUTO = "auto"  # decided per request by the model: see limit_field()
OPENROUTER = "openrouter"
PDF = "application/pdf"
PLAIN_TEXT = "text/plain"
# OpenAI's reasoning families by id, for models the catalogue does not know (a dated snapshot
# it lacks, a gateway's "openai/gpt-5"): o1, o3-mini, o4-mini-2025-04-16, gpt-5, gpt-5.1-codex...
_REASONING_ID = re.compile(r"^(?:o[1-9][0-9]*|gpt-5)(?:[-.:]|$)")
# What the broker always sets or owns for this protocol: provider_options may not set these
# even where the broker left them out (merge_options also refuses any key the body has).
RESERVED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "response_format",
        MAX_TOKENS,
        MAX_COMPLETION_TOKENS,
    }
)
# Enum members as module constants for the per-request code: in Python 3.11 an attribute of
# an Enum class goes through EnumType's __getattr__ hook (no attribute specialisation), about
# 1k instructions per `Role.USER`; a module global is a dict hit.
_USER, _SYSTEM, _ASSISTANT, _TOOL = Role.USER, Role.SYSTEM, Role.ASSISTANT, Role.TOOL
_CHOICE_TOOL, _CHOICE_DEFAULT = ToolChoiceMode.TOOL, ToolChoiceMode.DEFAULT
_FORMAT_DEFAULT, _FORMAT_JSON, _FORMAT_TEXT, _FORMAT_SCHEMA = (
    ResponseFormat.DEFAULT,
    ResponseFormat.JSON,
    ResponseFormat.TEXT,
    ResponseFormat.JSON_SCHEMA,
)
_BUDGET_ELSEWHERE = (
    "this provider takes a reasoning effort (minimal, low, medium, high), not a token budget; "
    "use provider_options for a server-specific budget such as vLLM's thinking_token_budget"
)


@dataclass(frozen=True, slots=True)
class WireTarget:
    """Who serves the protocol, where that changes the body."""

    # api.openai.com itself (the openai type's vendor_hosts in kinds.py).
    platform: bool = False
    # The CompatibleVendor row (kinds.VENDORS) the provider speaks to: "groq", "openrouter", "".
    vendor: str = ""

    @classmethod
    def of(cls, base_url: str, vendor: str | None = None) -> WireTarget:
        """The provider's configured `vendor:`, else the vendor row whose base URL has this host."""
        host = urlparse(base_url).hostname or ""
        platform = host in kinds.kind("openai").vendor_hosts
        if vendor is None:
            vendor = next(
                (
                    v.name
                    for v in kinds.VENDORS.values()
                    if v.kind == "openai" and urlparse(v.base_url).hostname == host
                ),
                "",
            )
        return cls(platform=platform, vendor=vendor)


def is_reasoning_model_id(model: str) -> bool:
    """An OpenAI reasoning family by its id (the last path segment, so "openai/gpt-5" counts)."""
    return bool(_REASONING_ID.match(model.rsplit("/", 1)[-1].lower()))


def limit_field(request: CompletionRequest, setting: str = AUTO, target: WireTarget | None = None) -> str:
    """Which output-limit field to send for this request's model.

    OpenAI's reasoning models (o-series, gpt-5 family) reject `max_tokens` with a 400
    ("Unsupported parameter: 'max_tokens'"), wherever they are served (api.openai.com, Azure,
    a gateway), and take `max_completion_tokens`. Every other model, and every compatible
    server (Ollama /v1, vLLM, llama.cpp), takes `max_tokens`; Ollama silently drops
    `max_completion_tokens`, so the limit would vanish. The catalogue's `reasoning` flag
    decides; for a model it lacks, the id's family does; a request that asks for reasoning
    on api.openai.com is a reasoning request whatever the model. `setting` (the provider's
    `max_tokens_field`) other than "auto" overrides all of them.
    """
    if setting in (MAX_TOKENS, MAX_COMPLETION_TOKENS):
        return setting
    if target is not None and target.platform and request.params.reasoning is not None:
        return MAX_COMPLETION_TOKENS
    reasoning = request.reasoning_model
    if reasoning is None:
        reasoning = is_reasoning_model_id(request.model)
    return MAX_COMPLETION_TOKENS if reasoning else MAX_TOKENS


def build_body(
    request: CompletionRequest, *, max_tokens_field: str = AUTO, target: WireTarget | None = None
) -> dict[str, Any]:
    """The JSON body of POST chat/completions. Always streamed, always asking for usage.

    max_tokens_field: "auto" (by the model, see limit_field), "max_tokens" or "max_completion_tokens".
    target: who serves it (default: a compatible server that is no known vendor).
    """
    target = target or WireTarget()
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [_message(i, m) for i, m in enumerate(request.messages)],
    }
    if request.tools:
        body["tools"] = [_tool(i, t, target) for i, t in enumerate(request.tools)]
    choice = request.tool_choice
    if choice.mode == _CHOICE_TOOL:
        body["tool_choice"] = {"type": "function", "function": {"name": choice.tool_name}}
    elif choice.mode != _CHOICE_DEFAULT:
        body["tool_choice"] = choice.mode.value  # "auto" | "none" | "required"
    p = request.params
    if p.temperature is not None:
        body["temperature"] = p.temperature
    if p.top_p is not None:
        body["top_p"] = p.top_p
    # The caller's own limit, else the provider's configured default_max_tokens; with neither,
    # no limit (the server's own default), since a guessed one only risks a 400.
    limit = request.output_limit(None)
    if limit is not None:
        body[limit_field(request, max_tokens_field, target)] = limit
    if p.stop:
        body["stop"] = list(p.stop)
    if p.seed is not None:
        body["seed"] = p.seed
    fmt = p.response_format
    if fmt == _FORMAT_DEFAULT:
        pass
    elif fmt == _FORMAT_JSON:
        body["response_format"] = {"type": "json_object"}
    elif fmt == _FORMAT_TEXT:
        body["response_format"] = {"type": "text"}
    elif fmt == _FORMAT_SCHEMA:
        body["response_format"] = _json_schema(request, target)
    if p.reasoning is not None:
        body.update(_reasoning(p.reasoning, target))
    if request.metadata.end_user_id:
        # `user` is deprecated on api.openai.com (safety_identifier replaced it for abuse
        # detection); compatible servers know only `user` (vLLM and Ollama ignore it).
        key = "safety_identifier" if target.platform else "user"
        body[key] = request.metadata.end_user_id
    body["stream"] = True
    # Without this OpenAI sends no usage at all when streaming, and cost needs it.
    body["stream_options"] = {"include_usage": True}
    # Last: the caller's vendor parameters may add to the body, never change what is in it.
    if not request.provider_options:
        return body  # (merge_options would say so too, a call later)
    return merge_options(
        body, request.provider_options, provider_type=request.provider_type or "openai", reserved=RESERVED
    )


def _reasoning(r: ReasoningConfig, target: WireTarget) -> dict[str, Any]:
    if target.vendor == OPENROUTER:
        # OpenRouter's one object covers efforts, budgets (for Anthropic and Gemini behind it)
        # and turning reasoning off.
        if r.disabled:
            return {"reasoning": {"enabled": False}}
        if r.budget_tokens is not None:
            return {"reasoning": {"max_tokens": r.budget_tokens}}
        return {"reasoning": {"effort": r.effort.value}} if r.effort is not None else {}
    if r.disabled:
        # gpt-5.1 and later, vLLM, llama.cpp and Ollama /v1 take "none" as off; earlier
        # OpenAI reasoning models answer 400 (they cannot stop reasoning), which is the truth.
        return {"reasoning_effort": "none"}
    if r.budget_tokens is not None:
        raise errors.InvalidRequest([("params.reasoning.budget_tokens", _BUDGET_ELSEWHERE)])
    return {"reasoning_effort": r.effort.value} if r.effort is not None else {}


def _openai_strict(schema: dict[str, Any], path: str, target: WireTarget) -> None:
    """api.openai.com's strict mode adds to the common rules convert checked: every property
    required, no allOf (schema_rules "openai"). Other servers keep their own rules."""
    if target.platform:
        problems = schema_rules.strict_problems(schema, path, "openai")
        if problems:
            raise errors.InvalidRequest(problems)


def _json_schema(request: CompletionRequest, target: WireTarget) -> dict[str, Any]:
    js = request.params.json_schema
    if js is None:
        raise errors.InvalidRequest(
            [("params.json_schema", "is required with response_format RESPONSE_FORMAT_JSON_SCHEMA")]
        )
    if js.strict:
        _openai_strict(js.schema, "params.json_schema.schema", target)
    spec: dict[str, Any] = {"name": js.name}
    if js.description:
        spec["description"] = js.description
    spec["schema"] = js.schema
    spec["strict"] = js.strict
    return {"type": "json_schema", "json_schema": spec}


def _message(i: int, m: Message) -> dict[str, Any]:
    role_in = m.role
    parts = m.content
    if role_in == _USER and len(parts) == 1 and type(parts[0]) is TextPart:
        # One text part (most user turns): what the general path below makes of it.
        return {"role": "user", "content": parts[0].text}
    if role_in != _USER and m.has_document():
        raise errors.InvalidRequest(
            [(f"messages[{i}].content", "documents are only accepted in user messages")]
        )
    if role_in == _TOOL:
        return {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.text()}
    if role_in != _USER and m.has_image():
        raise errors.InvalidRequest([(f"messages[{i}].content", "images are only accepted in user messages")])
    if role_in == _ASSISTANT:
        # m.text() is the answer text alone: reasoning parts are not sent back (module docstring).
        out: dict[str, Any] = {"role": "assistant", "content": m.text()}
        if m.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
            # The spec's shape for a pure tool-call turn: content is null, not "".
            out["content"] = out["content"] or None
        return out
    role = "system" if role_in == _SYSTEM else "user"
    content = [(j, p) for j, p in enumerate(m.content) if not isinstance(p, ReasoningPart)]
    plain = all(isinstance(p, TextPart) for _, p in content)
    if plain and (role == "system" or len(content) <= 1):
        # A plain string is what every OpenAI-compatible server accepts.
        return {"role": role, "content": m.text()}
    return {"role": role, "content": [_part(p, f"messages[{i}].content[{j}]") for j, p in content]}


def _part(part: ContentPart, where: str) -> dict[str, Any]:
    if isinstance(part, ImagePart):
        return {"type": "image_url", "image_url": {"url": _image_url(part, where)}}
    if isinstance(part, DocumentPart):
        return _document(part, f"{where}.document")
    assert isinstance(part, TextPart)
    return {"type": "text", "text": part.text}


def _image_url(part: ImagePart, where: str) -> str:
    if part.data is not None:
        if not part.media_type:
            raise errors.InvalidRequest([(where, "an inline image needs a media_type")])
        return f"data:{part.media_type};base64,{base64.b64encode(part.data).decode('ascii')}"
    if part.url:
        return part.url
    raise errors.InvalidRequest([(where, "an image needs data or a url")])


def _document(part: DocumentPart, where: str) -> dict[str, Any]:
    """A PDF as Chat Completions' `file` part (inline data only); plain text as a text part."""
    if part.data is None:
        if part.url:
            raise errors.InvalidRequest(
                [
                    (
                        f"{where}.url",
                        "Chat Completions takes no document URL; send the document's bytes (data)",
                    )
                ]
            )
        raise errors.InvalidRequest([(where, "a document needs data or a url")])
    media_type = part.media_type or PDF
    if media_type == PDF:
        data = base64.b64encode(part.data).decode("ascii")
        return {
            "type": "file",
            "file": {"filename": part.title or "document.pdf", "file_data": f"data:{PDF};base64,{data}"},
        }
    if media_type == PLAIN_TEXT:
        try:
            text = part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.InvalidRequest([(f"{where}.data", "a text/plain document must be UTF-8")]) from None
        return {"type": "text", "text": f"{part.title}\n\n{text}" if part.title else text}
    raise errors.InvalidRequest(
        [(f"{where}.media_type", f"{media_type!r} is not a document type here (application/pdf, text/plain)")]
    )


def _tool(i: int, t: Tool, target: WireTarget) -> dict[str, Any]:
    if t.strict and t.parameters:
        _openai_strict(t.parameters, f"tools[{i}].parameters", target)
    fn: dict[str, Any] = {"name": t.name}
    if t.description:
        fn["description"] = t.description
    if t.parameters:  # omitted means "takes no arguments" in the spec
        fn["parameters"] = t.parameters
    elif t.strict:
        # Strict mode needs a schema to hold the arguments to: the closed empty object.
        fn["parameters"] = {"type": "object", "properties": {}, "required": [], "additionalProperties": False}
    if t.strict:
        fn["strict"] = True
    return {"type": "function", "function": fn}
