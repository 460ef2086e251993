"""Anthropic Messages API request bodies: a neutral CompletionRequest -> `POST /v1/messages`.

The turns (roles merged so they alternate, tool_result blocks first in the user turn), text,
image and document blocks, reasoning sent back byte-exact before tool_use, cache breakpoints
with their TTL and order, tools (strict, cached), tool_choice, thinking and output_config (by
anthropic_rules), metadata.user_id, and last the caller's provider_options. Pure mapping, no
I/O; every request the API could not take is an errors.InvalidRequest raised here, before
any upstream call. Re-exported by anthropic_wire.
"""

from __future__ import annotations

import base64
import binascii
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
    Role,
    TextPart,
    Tool,
    ToolChoiceMode,
)

# Anthropic requires max_tokens on every request: sent when neither the caller nor the
# provider's `default_max_tokens` says, capped by the model's max output. Not the model's
# maximum (64,000 for claude-sonnet-4-5): that would reserve, and risk billing, far more
# than most answers need, and some clients time out on long non-streamed answers.
FALLBACK_MAX_TOKENS = 4096
Block = dict[str, Any]

# Top-level fields the broker sets or owns: provider_options may not set them even when this
# request leaves them out (`thinking` is asked for through params.reasoning).
RESERVED_OPTIONS = frozenset(
    {"model", "messages", "stream", "system", "tools", "tool_choice", "thinking", "max_tokens"}
)
PROVIDER_TYPE = "anthropic"


def build_body(
    request: CompletionRequest, notes: list[str] | None = None, *, anthropic_version: str | None = None
) -> dict[str, Any]:
    """The Messages API body for `request` (always streamed). Raises errors.InvalidRequest.
    `notes`, when given, collects what the broker chose not to send and why (for a debug log).
    `anthropic_version` (Claude on Vertex, "vertex-2023-10-16"): the body carries the API
    version and no `model` (the URL names it), as rawPredict/streamRawPredict take it."""
    own_type = request.provider_type or PROVIDER_TYPE
    system: list[Block] = []
    cached_system = False
    turns: list[_Turn] = []
    for i, msg in enumerate(request.messages):
        if msg.role == Role.SYSTEM:
            blocks = _system_blocks(msg, i)
            cached_system = cached_system or any("cache_control" in b for b in blocks)
            system += blocks
            continue
        role = "assistant" if msg.role == Role.ASSISTANT else "user"
        results, blocks = _blocks(msg, i)
        if not results and not blocks:
            if msg.role == Role.ASSISTANT:
                # An empty assistant turn in history (a model that said nothing) is valid
                # elsewhere; Anthropic rejects empty content, and leaving the turn out says
                # the same thing (the user turns around it merge into one).
                continue
            raise errors.InvalidRequest([(f"messages[{i}].content", "Anthropic rejects an empty message")])
        # Anthropic wants alternating roles: consecutive same-role turns become one turn.
        if not turns or turns[-1].role != role:
            turns.append(_Turn(role))
        turns[-1].tool_results += results
        turns[-1].blocks += blocks
    _check_cache_order(request)

    thinking = rules.thinking_for(request, signed_tool_turn=_signed_tool_turn(turns))
    if thinking.withheld and notes is not None:
        notes.append(
            "thinking not sent: the last assistant turn with tool calls has no signed thinking block"
        )
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": rules.max_tokens_for(request, thinking, FALLBACK_MAX_TOKENS),
        "messages": [t.render() for t in turns],
        "stream": True,
    }
    if system:
        # The plain string unless a breakpoint needs blocks (cache_control sits on a block).
        body["system"] = system if cached_system else "\n\n".join(_system_strings(request))
    if thinking.config is not None:
        body["thinking"] = thinking.config
    p = request.params
    if p.temperature is not None:
        if not 0.0 <= p.temperature <= 1.0:
            raise errors.InvalidRequest(
                [("params.temperature", f"Anthropic accepts 0 to 1, got {p.temperature:g}")]
            )
        body["temperature"] = p.temperature
    if p.top_p is not None:
        body["top_p"] = p.top_p
    if p.stop:
        body["stop_sequences"] = list(p.stop)
    # No `seed` (the API has none) and no JSON mode: the Messages API has no response_format
    # field and rejects unknown ones, so ResponseFormat.JSON is left to the prompt.
    schema_format, json_tool = rules.structured_output(request, thinking)
    output_config: dict[str, Any] = {}
    if thinking.effort is not None:
        output_config["effort"] = thinking.effort
    if schema_format is not None:
        output_config["format"] = schema_format
    if output_config:
        body["output_config"] = output_config
    if request.tools:
        body["tools"] = [_tool(t) for t in request.tools]
    if json_tool is not None:
        body["tools"] = [json_tool]
        body["tool_choice"] = {"type": "tool", "name": json_tool["name"]}
    choice = _tool_choice(request)
    if choice is not None:
        body["tool_choice"] = choice
    if request.metadata.end_user_id:
        # Anthropic's one metadata field; the tags stay in the broker's log line and traces.
        body["metadata"] = {"user_id": request.metadata.end_user_id}
    reserved: frozenset[str] = RESERVED_OPTIONS
    if anthropic_version is not None:
        del body["model"]
        body["anthropic_version"] = anthropic_version
        reserved = RESERVED_OPTIONS | {"anthropic_version"}
    return merge_options(body, request.provider_options, provider_type=own_type, reserved=reserved)


def forced_json_tool(request: CompletionRequest) -> str | None:
    """The tool a JSON-schema answer comes through on this model, if any (for StreamParser)."""
    return rules.forced_json_tool(request)


@dataclass(slots=True)
class _Turn:
    role: str
    # tool_result blocks must open the user turn that follows a tool_use turn.
    tool_results: list[Block] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)

    def render(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.tool_results + self.blocks}


def _signed_tool_turn(turns: list[_Turn]) -> bool:
    """False when the last assistant turn with tool_use blocks has no signed reasoning block:
    thinking must then stay off, or the API answers 400 ("a final assistant message must
    start with a thinking block")."""
    for turn in reversed(turns):
        if turn.role == "assistant" and any(b["type"] == "tool_use" for b in turn.blocks):
            return any(b["type"] in ("thinking", "redacted_thinking") for b in turn.blocks)
    return True


def _cache_control(ttl: CacheTTL | None) -> Block | None:
    if ttl is None:
        return None
    mark: Block = {"type": "ephemeral"}
    if ttl is not CacheTTL.DEFAULT:
        mark["ttl"] = ttl.value
    return mark


def _with_cache(block: Block, ttl: CacheTTL | None) -> Block:
    mark = _cache_control(ttl)
    if mark is not None:
        block["cache_control"] = mark
    return block


def _check_cache_order(request: CompletionRequest) -> None:
    """Breakpoints of one hour must all come before the five-minute ones in the order the API
    reads the prompt (tools, then system, then messages)."""
    marks: list[tuple[str, CacheTTL]] = [
        (f"tools[{i}].cache_control", t.cache) for i, t in enumerate(request.tools) if t.cache is not None
    ]
    system = [(i, m) for i, m in enumerate(request.messages) if m.role == Role.SYSTEM]
    others = [(i, m) for i, m in enumerate(request.messages) if m.role != Role.SYSTEM]
    for i, msg in system + others:
        for j, part in enumerate(msg.content):
            ttl = getattr(part, "cache", None)
            if ttl is not None:
                marks.append((f"messages[{i}].content[{j}].cache_control", ttl))
    short_seen = ""
    for where, ttl in marks:
        if ttl is not CacheTTL.ONE_HOUR:
            short_seen = short_seen or where
        elif short_seen:
            raise errors.InvalidRequest(
                [
                    (
                        where,
                        f"a 1h cache breakpoint must come before every 5m one (tools, then system, then "
                        f"messages), and {short_seen} is a 5m breakpoint before it",
                    )
                ]
            )


def _tool(t: Tool) -> Block:
    block: Block = {
        "name": t.name,
        **({"description": t.description} if t.description else {}),
        "input_schema": t.parameters or {"type": "object", "properties": {}},
    }
    if t.strict:
        block["strict"] = True
    return _with_cache(block, t.cache)


def _system_blocks(msg: Message, i: int) -> list[Block]:
    """A system message's text parts as blocks (used when a breakpoint needs the array form)."""
    blocks: list[Block] = []
    for j, part in enumerate(msg.content):
        if not isinstance(part, TextPart):
            raise errors.InvalidRequest(
                [(f"messages[{i}].content[{j}]", "Anthropic accepts only text in system messages")]
            )
        if part.text:
            blocks.append(_with_cache({"type": "text", "text": part.text}, part.cache))
    return blocks


def _system_strings(request: CompletionRequest) -> list[str]:
    return [m.text() for m in request.messages if m.role == Role.SYSTEM]


def _blocks(msg: Message, i: int) -> tuple[list[Block], list[Block]]:
    """(tool_result blocks, other blocks) for one non-system message."""
    content: list[Block] = []
    for j, part in enumerate(msg.content):
        where = f"messages[{i}].content[{j}]"
        if isinstance(part, ReasoningPart):
            # Only this type's reasoning is here: CompletionCall.upstream dropped the rest.
            if msg.role != Role.ASSISTANT:
                raise errors.InvalidRequest([(where, "reasoning parts belong in assistant messages")])
            block = _reasoning_block(part, where)
        elif isinstance(part, DocumentPart):
            if msg.role == Role.ASSISTANT:
                raise errors.InvalidRequest([(where, "Anthropic takes documents in user and tool messages")])
            block = _document_block(part, where)
        else:
            block = _content_block(part, where)
        if block is not None:
            content.append(block)
    if msg.role == Role.TOOL:
        if not msg.tool_call_id:
            raise errors.InvalidRequest([(f"messages[{i}].tool_call_id", "required on a tool message")])
        # A plain string when it is all text, as the API documents; blocks when images,
        # documents or cache breakpoints are in it.
        only_text = all(b["type"] == "text" and "cache_control" not in b for b in content)
        result: Block = {
            "type": "tool_result",
            "tool_use_id": msg.tool_call_id,
            "content": "".join(b["text"] for b in content) if only_text else content,
            "is_error": msg.is_error,
        }
        return [result], []
    if msg.role == Role.ASSISTANT:
        # After the text and thinking blocks, in that order: the API wants a tool-calling
        # turn replayed as it was received, thinking before tool_use.
        for j, call in enumerate(msg.tool_calls):
            content.append(
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.name,
                    "input": _tool_input(call.arguments, i, j),
                }
            )
    return [], content


def _reasoning_block(part: ReasoningPart, where: str) -> Block | None:
    """The thinking block as the model produced it, byte for byte (the signature covers it);
    never with cache_control (the API rejects it there)."""
    if part.redacted_data:
        if part.text or part.signature:
            raise errors.InvalidRequest(
                [(f"{where}.redacted_data", "a redacted block has no text or signature")]
            )
        return {"type": "redacted_thinking", "data": part.redacted_data}
    if not part.signature:
        # Unsigned thinking (text a caller kept without its signature) cannot be verified:
        # the API rejects it, and a thinking-less turn is what it would have to be.
        return None
    return {"type": "thinking", "thinking": part.text, "signature": part.signature}


def _document_block(part: DocumentPart, where: str) -> Block:
    if part.data is not None:
        if part.media_type == "application/pdf":
            data = base64.b64encode(part.data).decode("ascii")
            source: Block = {"type": "base64", "media_type": "application/pdf", "data": data}
        elif part.media_type == "text/plain":
            try:
                text = part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise errors.InvalidRequest(
                    [(f"{where}.data", "text/plain documents must be UTF-8")]
                ) from None
            source = {"type": "text", "media_type": "text/plain", "data": text}
        else:
            raise errors.InvalidRequest(
                [
                    (
                        f"{where}.media_type",
                        f"Anthropic takes PDF or text/plain documents, not {part.media_type}",
                    )
                ]
            )
    elif part.url:
        source = {"type": "url", "url": part.url}
    else:
        raise errors.InvalidRequest([(where, "a document needs bytes or a URL")])
    block: Block = {"type": "document", "source": source}
    if part.title:
        block["title"] = part.title
    return _with_cache(block, part.cache)


def _content_block(part: TextPart | ImagePart, where: str) -> Block | None:
    if isinstance(part, TextPart):
        # The API rejects empty text blocks; an empty part carries nothing anyway.
        return _with_cache({"type": "text", "text": part.text}, part.cache) if part.text else None
    if part.data is not None:
        if not part.media_type:
            raise errors.InvalidRequest([(f"{where}.media_type", "required with inline image bytes")])
        block = _b64_image(part.media_type, base64.b64encode(part.data).decode("ascii"))
    elif part.url and part.url.startswith("data:"):
        # A data: URL is inline bytes in disguise; the API's url source fetches over HTTP only.
        block = _data_url_image(part.url, where)
    elif part.url:
        block = {"type": "image", "source": {"type": "url", "url": part.url}}
    else:
        raise errors.InvalidRequest([(where, "an image needs bytes or a URL")])
    return _with_cache(block, part.cache)


def _b64_image(media_type: str, data: str) -> Block:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _data_url_image(url: str, where: str) -> Block:
    head, sep, data = url.partition(",")
    media_type = head.removeprefix("data:").removesuffix(";base64")
    if not sep or not head.endswith(";base64") or not media_type:
        raise errors.InvalidRequest([(f"{where}.url", "a data: URL must be data:<media type>;base64,<data>")])
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise errors.InvalidRequest([(f"{where}.url", "the data: URL is not valid base64")]) from None
    return _b64_image(media_type, data)


def _tool_input(arguments: str, i: int, j: int) -> dict[str, Any]:
    return checks.tool_arguments(arguments, i, j, vendor_says="Anthropic's tool input is an object")


def _tool_choice(request: CompletionRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    if choice.mode == ToolChoiceMode.DEFAULT:
        return None
    if not request.tools:
        if choice.mode in (ToolChoiceMode.AUTO, ToolChoiceMode.NONE):
            return None  # nothing to choose from: the same as not saying
        raise errors.InvalidRequest([("tool_choice", f"{choice.mode.value} needs at least one tool")])
    if choice.mode == ToolChoiceMode.AUTO:
        return {"type": "auto"}
    if choice.mode == ToolChoiceMode.REQUIRED:
        return {"type": "any"}
    if choice.mode == ToolChoiceMode.NONE:
        return {"type": "none"}
    if not choice.tool_name:
        raise errors.InvalidRequest([("tool_choice.tool_name", "required when the mode is tool")])
    return {"type": "tool", "name": choice.tool_name}
