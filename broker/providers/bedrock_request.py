"""Bedrock Converse request bodies: a neutral CompletionRequest -> `POST /model/{id}/converse-stream`.

Pure mapping, no I/O (PROTOCOLS-CLOUD.md C3); re-exported by bedrock_wire. Every request
Converse could not take is an errors.InvalidRequest raised here, before any upstream call.

- Turns: `system` blocks; user and assistant turns merged so roles alternate; a tool
  message is a `toolResult` block (status success/error) opening the user turn after the call.
- Content: text, images (`image.source.bytes`, or an `s3://` URI), documents (PDF or plain
  text as `document` with a sanitised `name`), an assistant's reasoning sent back byte-exact
  as `reasoningContent` before that turn's `toolUse` blocks (provider_type bedrock only).
- Cache breakpoints: a `cachePoint` block after the part, system block or tool that carries
  one (`ttl` for 5m/1h, none for the default), for the Claude and Nova models that cache.
- Reasoning: Claude on Bedrock only, as Anthropic's own `thinking` (and `output_config.effort`
  on adaptive models) in `additionalModelRequestFields`, by the same model rules as the
  anthropic type (anthropic_rules: budgets, max_tokens above the budget, sampling limits).
  Other models' reasoning fields are their vendors' own: provider_options. (Bedrock passes
  model-native fields through as given; that `output_config.effort` passes too is not among
  the checked wire facts, PROTOCOLS-CLOUD.md C3.)
- Structured outputs: `outputConfig.textFormat` json_schema (the schema as a string); strict
  tools: `toolSpec.strict`. JSON mode has no Converse field: left to the prompt.
- Left out: `seed` (no Converse field), request metadata (Converse's fields for it are not
  among the checked wire facts), tool_choice NONE with tools (Converse has no such choice).
- provider_options merge last (guardrailConfig, performanceConfig, serviceTier,
  additionalModelRequestFields such as top_k), never over what the broker set.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from broker import errors
from broker.providers import anthropic_rules as rules
from broker.providers import checks
from broker.providers.options import merge_options
from broker.types import (
    CacheTTL,
    CompletionRequest,
    DocumentPart,
    ImagePart,
    Message,
    ReasoningPart,
    ResponseFormat,
    Role,
    TextPart,
    Tool,
    ToolChoiceMode,
)

PROVIDER_TYPE = "bedrock"
Block = dict[str, Any]
RESERVED_OPTIONS = frozenset({"modelId", "messages", "system", "toolConfig"})
IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
DOCUMENT_FORMATS = {"application/pdf": "pdf", "text/plain": "txt"}
# Converse's document name: letters, digits, single spaces, hyphens, parentheses, brackets.
_NAME_DISALLOWED = re.compile(r"[^A-Za-z0-9\-()\[\] ]+")
_MAX_NAME_CHARS = 200


def build_body(request: CompletionRequest, notes: list[str] | None = None) -> dict[str, Any]:
    """The Converse body for `request` (the model id goes in the path, not here)."""
    own = request.provider_type or PROVIDER_TYPE
    system: list[Block] = []
    turns: list[_Turn] = []
    names = _DocumentNames()
    for i, msg in enumerate(request.messages):
        if msg.role == Role.SYSTEM:
            system += _system_blocks(msg, i)
            continue
        role = "assistant" if msg.role == Role.ASSISTANT else "user"
        results, blocks = _blocks(msg, i, names)
        if not results and not blocks:
            if msg.role == Role.ASSISTANT:
                continue  # an empty answer in history: Converse rejects empty content
            raise errors.InvalidRequest([(f"messages[{i}].content", "Bedrock rejects an empty message")])
        if not turns or turns[-1].role != role:
            turns.append(_Turn(role))
        turns[-1].results += results
        turns[-1].blocks += blocks
    body: dict[str, Any] = {"messages": [t.render() for t in turns]}
    if system:
        body["system"] = system
    tool_config = _tool_config(request, turns)
    if tool_config is not None:
        body["toolConfig"] = tool_config
    thinking = _thinking(request, turns, notes)
    inference = _inference_config(request, thinking)
    if inference:
        body["inferenceConfig"] = inference
    extra: dict[str, Any] = {}
    if thinking.config is not None:
        extra["thinking"] = thinking.config
    if thinking.effort is not None:
        extra["output_config"] = {"effort": thinking.effort}
    if extra:
        body["additionalModelRequestFields"] = extra
    output = _output_config(request)
    if output is not None:
        body["outputConfig"] = output
    return merge_options(body, request.provider_options, provider_type=own, reserved=RESERVED_OPTIONS)


@dataclass(slots=True)
class _Turn:
    role: str
    results: list[Block] = field(default_factory=list)  # toolResult blocks open a user turn
    blocks: list[Block] = field(default_factory=list)

    def render(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.results + self.blocks}


class _DocumentNames:
    """Converse wants each document named, within its charset, and the names distinct."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def name(self, title: str) -> str:
        base = " ".join(_NAME_DISALLOWED.sub(" ", title).split())[:_MAX_NAME_CHARS] or "Document"
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base} {k}"
        self.used.add(name)
        return name


def cache_point(ttl: CacheTTL) -> Block:
    point: Block = {"type": "default"}
    if ttl is not CacheTTL.DEFAULT:
        point["ttl"] = ttl.value
    return {"cachePoint": point}


def _with_cache(block: Block, ttl: CacheTTL | None) -> list[Block]:
    return [block] if ttl is None else [block, cache_point(ttl)]


def _system_blocks(msg: Message, i: int) -> list[Block]:
    out: list[Block] = []
    for j, part in enumerate(msg.content):
        if not isinstance(part, TextPart):
            raise errors.InvalidRequest(
                [(f"messages[{i}].content[{j}]", "Bedrock takes only text in system messages")]
            )
        if part.text:
            out += _with_cache({"text": part.text}, part.cache)
        elif part.cache is not None:
            out.append(cache_point(part.cache))
    return out


def _blocks(msg: Message, i: int, names: _DocumentNames) -> tuple[list[Block], list[Block]]:
    content: list[Block] = []
    for j, part in enumerate(msg.content):
        where = f"messages[{i}].content[{j}]"
        if isinstance(part, ReasoningPart):
            # Only this type's reasoning is here: CompletionCall.upstream dropped the rest.
            if msg.role != Role.ASSISTANT:
                raise errors.InvalidRequest([(where, "reasoning parts belong in assistant messages")])
            block = _reasoning_block(part, where)
            if block is not None:
                content.append(block)
        elif isinstance(part, TextPart):
            if part.text:
                content += _with_cache({"text": part.text}, part.cache)
            elif part.cache is not None:
                content.append(cache_point(part.cache))
        elif isinstance(part, ImagePart):
            if msg.role == Role.ASSISTANT:
                raise errors.InvalidRequest([(where, "images are only accepted in user and tool messages")])
            content += _with_cache({"image": _image(part, where)}, part.cache)
        else:
            if msg.role == Role.ASSISTANT:
                raise errors.InvalidRequest(
                    [(where, "documents are only accepted in user and tool messages")]
                )
            content += _with_cache({"document": _document(part, where, names)}, part.cache)
    if msg.role == Role.TOOL:
        if not msg.tool_call_id:
            raise errors.InvalidRequest([(f"messages[{i}].tool_call_id", "required on a tool message")])
        # Cache points inside a toolResult are not Converse's: they follow the result block.
        inner = [b for b in content if "cachePoint" not in b] or [{"text": ""}]
        result: Block = {
            "toolResult": {
                "toolUseId": msg.tool_call_id,
                "content": inner,
                "status": "error" if msg.is_error else "success",
            }
        }
        return [result, *(b for b in content if "cachePoint" in b)], []
    if msg.role == Role.ASSISTANT:
        for j, call in enumerate(msg.tool_calls):
            content.append(
                {
                    "toolUse": {
                        "toolUseId": call.id,
                        "name": call.name,
                        "input": _tool_input(call.arguments, i, j),
                    }
                }
            )
    return [], content


def _reasoning_block(part: ReasoningPart, where: str) -> Block | None:
    """As the model produced it (the signature covers the text); unsigned text is dropped."""
    if part.redacted_data:
        if part.text or part.signature:
            raise errors.InvalidRequest(
                [(f"{where}.redacted_data", "a redacted block has no text or signature")]
            )
        return {"reasoningContent": {"redactedContent": part.redacted_data}}
    if not part.signature:
        return None
    return {"reasoningContent": {"reasoningText": {"text": part.text, "signature": part.signature}}}


def _decode_data_url(url: str, where: str) -> tuple[str, bytes]:
    head, sep, data = url.partition(",")
    media_type = head.removeprefix("data:").removesuffix(";base64")
    if not sep or not head.endswith(";base64") or not media_type:
        raise errors.InvalidRequest([(f"{where}.url", "a data: URL must be data:<media type>;base64,<data>")])
    try:
        return media_type, base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise errors.InvalidRequest([(f"{where}.url", "the data: URL is not valid base64")]) from None


def _image(part: ImagePart, where: str) -> Block:
    media_type, data = part.media_type, part.data
    if data is None and part.url and part.url.startswith("data:"):
        media_type, data = _decode_data_url(part.url, where)
    fmt = IMAGE_FORMATS.get(media_type.lower())
    if data is not None:
        if fmt is None:
            raise errors.InvalidRequest(
                [
                    (
                        f"{where}.media_type",
                        f"Bedrock takes png, jpeg, gif or webp images, not {media_type or 'none'}",
                    )
                ]
            )
        return {"format": fmt, "source": {"bytes": base64.b64encode(data).decode("ascii")}}
    if part.url and part.url.startswith("s3://"):
        guessed = fmt or IMAGE_FORMATS.get("image/" + part.url.rsplit(".", 1)[-1].lower())
        if guessed is None:
            raise errors.InvalidRequest([(f"{where}.media_type", "an s3:// image needs its media_type")])
        return {"format": guessed, "source": {"s3Location": {"uri": part.url}}}
    if part.url:
        raise errors.InvalidRequest(
            [(f"{where}.url", "Bedrock fetches no image URLs: send the image's bytes (data) or an s3:// URI")]
        )
    raise errors.InvalidRequest([(where, "an image needs bytes or a URL")])


def _document(part: DocumentPart, where: str, names: _DocumentNames) -> Block:
    media_type = part.media_type or "application/pdf"
    fmt = DOCUMENT_FORMATS.get(media_type)
    if fmt is None:
        raise errors.InvalidRequest(
            [
                (
                    f"{where}.media_type",
                    f"{media_type!r} is not a document type here (application/pdf, text/plain)",
                )
            ]
        )
    if part.data is not None:
        source: Block = {"bytes": base64.b64encode(part.data).decode("ascii")}
    elif part.url and part.url.startswith("s3://"):
        source = {"s3Location": {"uri": part.url}}
    elif part.url:
        raise errors.InvalidRequest(
            [
                (
                    f"{where}.url",
                    "Bedrock fetches no document URLs: send the document's bytes (data) or an s3:// URI",
                )
            ]
        )
    else:
        raise errors.InvalidRequest([(where, "a document needs bytes or a URL")])
    return {"format": fmt, "name": names.name(part.title), "source": source}


def _tool_input(arguments: str, i: int, j: int) -> dict[str, Any]:
    return checks.tool_arguments(arguments, i, j, vendor_says="Converse's toolUse input is an object")


def _tool_spec(t: Tool) -> list[Block]:
    spec: Block = {"name": t.name}
    if t.description:
        spec["description"] = t.description
    spec["inputSchema"] = {"json": t.parameters or {"type": "object", "properties": {}}}
    if t.strict:
        spec["strict"] = True
    return _with_cache({"toolSpec": spec}, t.cache)


def _history_has_tools(turns: list[_Turn]) -> bool:
    return any(t.results or any("toolUse" in b for b in t.blocks) for t in turns)


def _tool_config(request: CompletionRequest, turns: list[_Turn]) -> dict[str, Any] | None:
    choice = request.tool_choice
    if not request.tools:
        if _history_has_tools(turns):
            raise errors.InvalidRequest(
                [
                    (
                        "tools",
                        "Bedrock needs the tool definitions whenever the history holds tool calls or results",
                    )
                ]
            )
        if choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.TOOL):
            raise errors.InvalidRequest([("tool_choice", f"{choice.mode.value} needs at least one tool")])
        return None
    config: dict[str, Any] = {"tools": [b for t in request.tools for b in _tool_spec(t)]}
    if choice.mode == ToolChoiceMode.AUTO:
        config["toolChoice"] = {"auto": {}}
    elif choice.mode == ToolChoiceMode.REQUIRED:
        config["toolChoice"] = {"any": {}}
    elif choice.mode == ToolChoiceMode.TOOL:
        if not choice.tool_name:
            raise errors.InvalidRequest([("tool_choice.tool_name", "required when the mode is tool")])
        config["toolChoice"] = {"tool": {"name": choice.tool_name}}
    elif choice.mode == ToolChoiceMode.NONE:
        raise errors.InvalidRequest(
            [("tool_choice", "Bedrock Converse has no 'none' tool choice: send no tools to forbid calls")]
        )
    return config


def _signed_tool_turn(turns: list[_Turn]) -> bool:
    """False when the last assistant turn with toolUse blocks has no signed reasoning block."""
    for turn in reversed(turns):
        if turn.role == "assistant" and any("toolUse" in b for b in turn.blocks):
            return any("reasoningContent" in b for b in turn.blocks)
    return True


def _thinking(request: CompletionRequest, turns: list[_Turn], notes: list[str] | None) -> rules.Thinking:
    r = request.params.reasoning
    if r is None or r.disabled:
        return rules.Thinking()
    if rules.claude_version(request.model) is None:
        raise errors.InvalidRequest(
            [
                (
                    "params.reasoning",
                    f"reasoning on Bedrock is mapped for Claude models only; set {request.model}'s own "
                    "fields through provider_options (additionalModelRequestFields)",
                )
            ]
        )
    thinking = rules.thinking_for(request, signed_tool_turn=_signed_tool_turn(turns))
    if thinking.withheld and notes is not None:
        notes.append(
            "thinking not sent: the last assistant turn with tool calls has no signed reasoning block"
        )
    return thinking


def _inference_config(request: CompletionRequest, thinking: rules.Thinking) -> dict[str, Any]:
    p = request.params
    config: dict[str, Any] = {}
    if thinking.budget is not None:
        # Anthropic's rule on Bedrock too: maxTokens above the thinking budget.
        config["maxTokens"] = rules.max_tokens_for(request, thinking, rules_fallback(request))
    else:
        limit = request.output_limit(None)
        if limit is not None:
            if limit < 1:
                raise errors.InvalidRequest([("params.max_tokens", f"must be at least 1, got {limit}")])
            config["maxTokens"] = limit
    if p.temperature is not None:
        config["temperature"] = p.temperature
    if p.top_p is not None:
        config["topP"] = p.top_p
    if p.stop:
        config["stopSequences"] = list(p.stop)
    return config


def rules_fallback(request: CompletionRequest) -> int:
    """The output limit a thinking request gets besides its budget when none is set (4096,
    as the anthropic type), capped by the model's max output."""
    return 4096 if not request.max_output_tokens else min(4096, request.max_output_tokens)


def _output_config(request: CompletionRequest) -> dict[str, Any] | None:
    p = request.params
    if p.response_format is not ResponseFormat.JSON_SCHEMA:
        return None
    js = p.json_schema
    if js is None:
        raise errors.InvalidRequest([("params.json_schema", "required with the JSON_SCHEMA response format")])
    spec: dict[str, Any] = {"name": js.name, "schema": json.dumps(js.schema, separators=(",", ":"))}
    if js.description:
        spec["description"] = js.description
    return {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": spec}}}
