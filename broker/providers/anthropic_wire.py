"""Anthropic Messages API <-> neutral types: pure mapping, no I/O.

`build_body` turns a CompletionRequest into a `POST /v1/messages` body; `StreamParser` turns
the SSE events of the answer into neutral events; `parse_error_body` and `models_page` read
the error and model-listing documents. Field rules are in PROTOCOLS.md section B.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from broker import errors
from broker.providers import checks
from broker.providers.base import UpstreamErrorInfo, classify_error
from broker.redact import redact
from broker.types import (
    Capability,
    CompletionEvent,
    CompletionRequest,
    DiscoveredModel,
    EndEvent,
    FinishReason,
    ImagePart,
    Message,
    ProgressEvent,
    Role,
    TextDeltaEvent,
    TextPart,
    ToolCallDeltaEvent,
    ToolChoiceMode,
    Usage,
)

API_VERSION = "2023-06-01"
# Anthropic requires max_tokens on every request: sent when neither the caller nor the
# provider's `default_max_tokens` says, capped by the model's max output. Not the model's
# maximum (64,000 for claude-sonnet-4-5): that would reserve, and risk billing, far more
# than most answers need, and some clients time out on long non-streamed answers.
FALLBACK_MAX_TOKENS = 4096
MODELS_PAGE_LIMIT = 1000

Block = dict[str, Any]
# The usage fields that are token counts (checked: integers in range, else a protocol error).
_COUNT_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
# content_block_* events without an `index`: keyed here, never a real block's index.
_NO_INDEX = -1


# --- request ---------------------------------------------------------------------------------


def build_body(request: CompletionRequest) -> dict[str, Any]:
    """The Messages API body for `request` (always streamed). Raises errors.InvalidRequest."""
    system: list[str] = []
    turns: list[_Turn] = []
    for i, msg in enumerate(request.messages):
        if msg.role == Role.SYSTEM:
            system.append(_system_text(msg, i))
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

    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": _max_tokens(request),
        "messages": [t.render() for t in turns],
        "stream": True,
    }
    if system:
        body["system"] = "\n\n".join(system)
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
    if request.tools:
        body["tools"] = [
            {
                "name": t.name,
                **({"description": t.description} if t.description else {}),
                "input_schema": t.parameters or {"type": "object", "properties": {}},
            }
            for t in request.tools
        ]
    choice = _tool_choice(request)
    if choice is not None:
        body["tool_choice"] = choice
    return body


@dataclass(slots=True)
class _Turn:
    role: str
    # tool_result blocks must open the user turn that follows a tool_use turn.
    tool_results: list[Block] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)

    def render(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.tool_results + self.blocks}


def _max_tokens(request: CompletionRequest) -> int:
    wanted = request.params.max_tokens
    if wanted is not None and wanted < 1:
        raise errors.InvalidRequest([("params.max_tokens", f"must be at least 1, got {wanted}")])
    return request.output_limit(FALLBACK_MAX_TOKENS) or FALLBACK_MAX_TOKENS


def _system_text(msg: Message, i: int) -> str:
    for j, part in enumerate(msg.content):
        if isinstance(part, ImagePart):
            raise errors.InvalidRequest(
                [(f"messages[{i}].content[{j}]", "Anthropic accepts only text in system messages")]
            )
    return msg.text()


def _blocks(msg: Message, i: int) -> tuple[list[Block], list[Block]]:
    """(tool_result blocks, other blocks) for one non-system message."""
    content = [
        block
        for j, part in enumerate(msg.content)
        if (block := _content_block(part, f"messages[{i}].content[{j}]")) is not None
    ]
    if msg.role == Role.TOOL:
        if not msg.tool_call_id:
            raise errors.InvalidRequest([(f"messages[{i}].tool_call_id", "required on a tool message")])
        only_text = all(b["type"] == "text" for b in content)
        result: Block = {
            "type": "tool_result",
            "tool_use_id": msg.tool_call_id,
            # A plain string when it is all text, as the API documents; blocks when images are in it.
            "content": "".join(b["text"] for b in content) if only_text else content,
            "is_error": msg.is_error,
        }
        return [result], []
    if msg.role == Role.ASSISTANT:
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


def _content_block(part: TextPart | ImagePart, where: str) -> Block | None:
    if isinstance(part, TextPart):
        # The API rejects empty text blocks; an empty part carries nothing anyway.
        return {"type": "text", "text": part.text} if part.text else None
    if part.data is not None:
        if not part.media_type:
            raise errors.InvalidRequest([(f"{where}.media_type", "required with inline image bytes")])
        return _b64_image(part.media_type, base64.b64encode(part.data).decode("ascii"))
    if part.url:
        if part.url.startswith("data:"):
            # A data: URL is inline bytes in disguise; the API's url source fetches over HTTP only.
            return _data_url_image(part.url, where)
        return {"type": "image", "source": {"type": "url", "url": part.url}}
    raise errors.InvalidRequest([(where, "an image needs bytes or a URL")])


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
    where = f"messages[{i}].tool_calls[{j}].arguments"
    try:
        value = checks.strict_json(arguments) if arguments.strip() else {}
    except ValueError as exc:
        raise errors.InvalidRequest([(where, f"not valid JSON ({exc})")]) from None
    if not isinstance(value, dict):
        raise errors.InvalidRequest([(where, "must be a JSON object (Anthropic's tool input is an object)")])
    return value


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


# --- streamed answer -------------------------------------------------------------------------

_FINISH = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "pause_turn": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
}

# The HTTP status each error type comes with (PROTOCOLS.md B "Errors"), so an `event: error`
# after the 200 is classified by the same table as an HTTP error.
_STATUS_OF_ERROR_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


# One instance for every ping and signature: they carry no size.
_ALIVE = ProgressEvent()


def finish_reason(stop_reason: str | None) -> FinishReason:
    return _FINISH.get(stop_reason or "", FinishReason.OTHER)


@dataclass(slots=True)
class _ToolBlock:
    index: int  # the neutral index: tool_use blocks counted from 0
    got_arguments: bool = False


class StreamParser:
    """Messages API stream events -> deltas and, at `message_stop`, the one EndEvent.

    StartEvent is the caller's to send when the 200 arrives. `finished` says whether
    message_stop came, so a stream that just stops can be told from a complete one.
    Raises BrokerError for `event: error` and for anything that is not the protocol.
    """

    def __init__(self, *, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        self.started = False
        self.finished = False
        self._usage: dict[str, int] = {}
        self._stop_reason: str | None = None
        self._tools: dict[int, _ToolBlock] = {}  # by the block's `index` in content[]

    def feed(self, event: str, data: str) -> list[CompletionEvent]:
        if self.finished:
            return []
        payload = checks.decode_json(
            data,
            provider=self.provider,
            model=self.model,
            what=f"the stream ({errors.bound(event, 64) or 'event'})",
        )
        if not isinstance(payload, dict):
            raise self._protocol_error(f"event {event!r} carries {type(payload).__name__}, not an object")
        kind = str(payload.get("type") or event)
        if kind == "error" or event == "error":
            raise stream_error(payload, provider=self.provider, model=self.model)
        try:
            return self._dispatch(kind, payload)
        except (AttributeError, TypeError, ValueError, ArithmeticError) as exc:
            # Valid JSON of the wrong shape (a string where an object goes, say).
            raise self._protocol_error(
                f"malformed {errors.bound(kind, 64)} event ({errors.bound(str(exc), 200)})"
            ) from None

    def _dispatch(self, kind: str, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        if kind == "message_start":
            return self._on_start(payload)
        if kind == "ping":
            return [_ALIVE]  # may come anywhere; the upstream is alive and working
        handlers = {
            "content_block_start": self._on_block_start,
            "content_block_delta": self._on_block_delta,
            "content_block_stop": self._on_block_stop,
            "message_delta": self._on_message_delta,
            "message_stop": self._on_message_stop,
        }
        handler = handlers.get(kind)
        if handler is None:
            return []  # ping, and event types newer than this code
        if not self.started:
            raise self._protocol_error(f"{kind} before message_start")
        return handler(payload)

    def _on_start(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        if not self.started:
            self.started = True
            message = payload.get("message") or {}
            self._merge_usage(message.get("usage"))
        return []

    def _on_block_start(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        block = payload.get("content_block") or {}
        if block.get("type") == "tool_use":
            where = {"provider": self.provider, "model": self.model}
            if len(self._tools) >= checks.MAX_TOOL_CALLS:
                raise self._protocol_error(f"more than {checks.MAX_TOOL_CALLS} tool_use blocks")
            tool = _ToolBlock(index=len(self._tools))
            self._tools[self._block_index(payload)] = tool
            call_id = checks.text(
                block.get("id", ""), field="a tool_use id", limit=checks.MAX_TOOL_CALL_ID_CHARS, **where
            )
            name = checks.text(
                block.get("name", ""), field="a tool_use name", limit=checks.MAX_TOOL_NAME_CHARS, **where
            )
            return [ToolCallDeltaEvent(index=tool.index, id=call_id, name=name)]
        if block.get("type") == "text" and block.get("text"):
            return [TextDeltaEvent(str(block["text"]))]
        if block.get("type") == "text":
            return []
        # thinking, redacted_thinking, server tools and their results: not carried by the
        # neutral stream, but the model is working (progress for the TTFT and stall timers).
        return [ProgressEvent(len(str(block.get("thinking") or "")))]

    def _on_block_delta(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        delta = payload.get("delta") or {}
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [TextDeltaEvent(str(delta["text"]))]
        if delta.get("type") == "input_json_delta":
            tool = self._tools.get(self._block_index(payload))
            fragment = str(delta.get("partial_json") or "")
            if tool is not None and fragment:
                tool.got_arguments = True
                return [ToolCallDeltaEvent(index=tool.index, arguments_delta=fragment)]
            # A server tool's input (server_tool_use, e.g. web search): the model is working.
            return [ProgressEvent(len(fragment))] if tool is None else []
        if delta.get("type") == "thinking_delta":
            return [ProgressEvent(len(str(delta.get("thinking") or "")))]
        if delta.get("type") in ("signature_delta", "citations_delta"):
            return [_ALIVE]
        return []  # delta types newer than this code

    def _on_block_stop(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        tool = self._tools.get(self._block_index(payload))
        if tool is not None and not tool.got_arguments:
            # A tool without parameters streams no JSON at all; "{}" keeps arguments valid JSON.
            tool.got_arguments = True
            return [ToolCallDeltaEvent(index=tool.index, arguments_delta="{}")]
        return []

    def _on_message_delta(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        delta = payload.get("delta") or {}
        if delta.get("stop_reason"):
            self._stop_reason = str(delta["stop_reason"])
        self._merge_usage(payload.get("usage"))
        return []

    def _on_message_stop(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        self.finished = True
        return [
            EndEvent(
                finish_reason(self._stop_reason), usage_from(self._usage), usage_reported=bool(self._usage)
            )
        ]

    def _merge_usage(self, usage: Any) -> None:
        # message_delta counts are cumulative: a later value replaces an earlier one.
        if isinstance(usage, dict):
            for key, value in usage.items():
                if key in _COUNT_FIELDS and value is not None:
                    # A count must be one (an integer in range), else the stream is not the protocol.
                    value = checks.count(value, field=key, provider=self.provider, model=self.model)
                if isinstance(value, int) and not isinstance(value, bool):
                    self._usage[key] = value

    def _block_index(self, payload: Mapping[str, Any]) -> int:
        """A content block's `index`: an integer in range; absent is _NO_INDEX (no block)."""
        value = payload.get("index")
        if value is None:
            return _NO_INDEX
        return checks.index(
            value,
            field="a content block index",
            limit=checks.MAX_BLOCK_INDEX,
            provider=self.provider,
            model=self.model,
        )

    def _protocol_error(self, what: str) -> errors.UpstreamProtocolError:
        return errors.UpstreamProtocolError(
            f"{self.provider}: unexpected Messages stream: {what}", provider=self.provider, model=self.model
        )


def usage_from(usage: Mapping[str, Any]) -> Usage:
    """Anthropic's input_tokens excludes cached tokens; the neutral input count includes them."""
    cache_read = int(usage.get("cache_read_input_tokens") or 0)
    cache_write = int(usage.get("cache_creation_input_tokens") or 0)
    return Usage(
        input_tokens=int(usage.get("input_tokens") or 0) + cache_read + cache_write,
        output_tokens=int(usage.get("output_tokens") or 0),
        cached_input_tokens=cache_read,
        cache_write_input_tokens=cache_write,
    )


# --- errors ----------------------------------------------------------------------------------


def parse_error_body(body: bytes) -> UpstreamErrorInfo:
    """`{"type":"error","error":{"type","message"},"request_id"}`; anything else kept as text."""
    try:
        # orjson: no NaN, no lone surrogates (which no proto string could carry), bounded depth.
        doc = orjson.loads(body)
    except ValueError:
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        # Proxies in front of the API (Cloudflare's 413, gateways' 502) answer in HTML or text.
        # Redact, then cut: a key straddling the cut must not leave its head behind.
        return UpstreamErrorInfo(message=redact(body[:65536].decode("utf-8", "replace")).strip()[:300])
    kind = str(err.get("type") or "")
    message = str(err.get("message") or "")
    lowered = message.lower()
    if "credit balance" in lowered:
        # An empty prepaid balance comes as a 400 invalid_request_error; it is a billing state.
        kind = "billing_error"
    elif "prompt is too long" in lowered or "exceed context limit" in lowered:
        kind = "context_length_exceeded"
    request_id = doc.get("request_id") if isinstance(doc, dict) else None
    if request_id:
        message = f"{message} (request id {request_id})"
    return UpstreamErrorInfo(message=message, kind=kind)


def stream_error(payload: Mapping[str, Any], *, provider: str, model: str) -> errors.BrokerError:
    """The BrokerError for an `event: error` that arrived after the HTTP 200."""
    info = parse_error_body(json.dumps(payload).encode())
    status = _STATUS_OF_ERROR_TYPE.get(info.kind, 500)  # unknown types: a server-side failure
    message = f"{provider}: error mid-stream: {info.kind or 'error'}: {info.message or 'no message'}"
    return classify_error(status, info, message, {}, {"provider": provider, "model": model})


# --- model listing ---------------------------------------------------------------------------


def models_path(after_id: str | None = None, *, limit: int = MODELS_PAGE_LIMIT) -> str:
    path = f"v1/models?limit={limit}"
    return f"{path}&after_id={urllib.parse.quote(after_id, safe='')}" if after_id else path


def models_page(doc: Any, *, provider: str) -> tuple[list[DiscoveredModel], str | None]:
    """One page of `GET /v1/models`: its models and the `after_id` of the next page, if any."""
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise errors.UpstreamProtocolError(
            f"{provider}: GET v1/models answered without a data list", provider=provider
        )
    models = []
    for item in doc["data"]:
        # An id no caller could send (too long, not text) is skipped, never passed on.
        if not isinstance(item, dict) or (name := checks.listed_model_id(item.get("id"))) is None:
            continue
        if item.get("lifecycle") == "retired":
            continue  # still listed as history, but requests naming it fail
        models.append(
            DiscoveredModel(
                name=name,
                capabilities=_capabilities(item.get("capabilities")),
                context_window=checks.listed_tokens(item.get("max_input_tokens")),
                # The listing's `max_tokens` is the model's maximum output (ModelInfo schema).
                max_output_tokens=checks.listed_tokens(item.get("max_tokens")),
            )
        )
    last_id = doc.get("last_id")
    more = bool(doc.get("has_more")) and isinstance(last_id, str) and bool(last_id)
    return models, (last_id if more else None)


def _capabilities(caps: Any) -> frozenset[Capability] | None:
    if not isinstance(caps, dict):
        return None  # older listings say nothing: unknown, not "none"
    found = {Capability.TOOLS}  # every Messages API model takes client tools
    image = caps.get("image_input")
    if isinstance(image, dict) and image.get("supported"):
        found.add(Capability.VISION)
    # No JSON_MODE: the broker sends no JSON mode field to this API (see build_body).
    return frozenset(found)
