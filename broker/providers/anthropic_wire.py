"""Anthropic Messages API <-> neutral types: pure mapping, no I/O.

`build_body` (from anthropic_request) turns a CompletionRequest into a `POST /v1/messages`
body; `StreamParser` turns the SSE events of the answer into neutral events (`message_events`
does the same for a whole, non-streamed message); `parse_error_body` and `models_page` read
the error and model-listing documents. Field rules are in PROTOCOLS.md section B and PROTOCOLS-2026 (thinking, structured
outputs, caching, documents, refusals); the model-dependent rules for thinking and structured
outputs are in anthropic_rules.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from broker import errors
from broker.providers import checks
from broker.providers.anthropic_request import (  # re-exported: the request half of this wire
    FALLBACK_MAX_TOKENS,
    PROVIDER_TYPE,
    RESERVED_OPTIONS,
    build_body,
    forced_json_tool,
)
from broker.providers.base import UpstreamErrorInfo, classify_error
from broker.redact import redact
from broker.types import (
    Capability,
    CompletionEvent,
    DiscoveredModel,
    EndEvent,
    FinishReason,
    ProgressEvent,
    ReasoningDeltaEvent,
    Refusal,
    TextDeltaEvent,
    ToolCallDeltaEvent,
    Usage,
)

__all__ = [
    "API_VERSION",
    "FALLBACK_MAX_TOKENS",
    "PROVIDER_TYPE",
    "RESERVED_OPTIONS",
    "StreamParser",
    "build_body",
    "finish_reason",
    "forced_json_tool",
    "message_events",
    "models_page",
    "models_path",
    "parse_error_body",
    "stream_error",
    "usage_from",
]

API_VERSION = "2023-06-01"
MODELS_PAGE_LIMIT = 1000

# The usage fields that are token counts (checked: integers in range, else a protocol error),
# and the nested ones, kept under their own names (output_tokens_details.thinking_tokens,
# cache_creation.ephemeral_1h_input_tokens).
_COUNT_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
_NESTED_COUNTS = {
    "output_tokens_details": ("thinking_tokens",),
    "cache_creation": ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"),
}
# A thinking signature or a redacted block's data: opaque, a few hundred bytes to some KB.
MAX_SIGNATURE_CHARS = 1 << 20
# A refusal's explanation and category as the API gives them (a few hundred characters).
MAX_REFUSAL_CHARS = 8192
# content_block_* events without an `index`: keyed here, never a real block's index.
_NO_INDEX = -1


# --- streamed answer -------------------------------------------------------------------------

_FINISH = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "pause_turn": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.REFUSAL,
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


# One instance for every ping and empty delta: they carry no size.
_ALIVE = ProgressEvent()


def finish_reason(stop_reason: str | None) -> FinishReason:
    return _FINISH.get(stop_reason or "", FinishReason.OTHER)


@dataclass(slots=True)
class _ToolBlock:
    index: int  # the neutral index: tool_use blocks counted from 0
    got_arguments: bool = False
    # The forced tool of a JSON-schema answer: its input is the answer's text.
    as_text: bool = False


class StreamParser:
    """Messages API stream events -> deltas and, at `message_stop`, the one EndEvent.

    StartEvent is the caller's to send when the 200 arrives. `finished` says whether
    message_stop came, so a stream that just stops can be told from a complete one.
    `json_tool` names the forced tool of a JSON-schema answer (`forced_json_tool`): its
    input streams out as text and the answer ends STOP, not TOOL_CALLS.
    Raises BrokerError for `event: error` and for anything that is not the protocol.
    """

    def __init__(self, *, provider: str, model: str, json_tool: str | None = None) -> None:
        self.provider = provider
        self.model = model
        self.json_tool = json_tool
        self.started = False
        self.finished = False
        self._usage: dict[str, int] = {}
        self._stop_reason: str | None = None
        self._stop_details: Any = None
        self._tools: dict[int, _ToolBlock] = {}  # by the block's `index` in content[]
        self._answered_as_text = False
        # Block `index` -> the reasoning block's ordinal (thinking and redacted, from 0).
        self._reasoning: dict[int, int] = {}

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
        return self.feed_payload(event, payload)

    def feed_payload(self, event: str, payload: dict[str, Any]) -> list[CompletionEvent]:
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
        kind = block.get("type")
        if kind == "tool_use":
            return self._on_tool_start(payload, block)
        if kind == "text":
            return [TextDeltaEvent(str(block["text"]))] if block.get("text") else []
        if kind == "thinking":
            k = self._reasoning_ordinal(payload)
            text = str(block.get("thinking") or "")
            signature = self._signature(block.get("signature"))
            if not text and not signature:
                return [_ALIVE]  # the block opens empty; its deltas follow
            return [ReasoningDeltaEvent(k, text=text, signature=signature)]
        if kind == "redacted_thinking":
            # Arrives whole, with no deltas: the opaque data goes back upstream as it came.
            k = self._reasoning_ordinal(payload)
            data = self._signature(block.get("data"), what="a redacted_thinking block's data")
            return [ReasoningDeltaEvent(k, redacted_data=data)]
        # Server tools and their results: not carried by the neutral stream, but the model is
        # working (progress for the TTFT and stall timers).
        return [_ALIVE]

    def _on_tool_start(self, payload: Mapping[str, Any], block: Mapping[str, Any]) -> list[CompletionEvent]:
        where = {"provider": self.provider, "model": self.model}
        name = checks.text(
            block.get("name", ""), field="a tool_use name", limit=checks.MAX_TOOL_NAME_CHARS, **where
        )
        if self.json_tool is not None and name == self.json_tool:
            self._tools[self._block_index(payload)] = _ToolBlock(index=-1, as_text=True)
            self._answered_as_text = True
            return []
        if len(self._tools) >= checks.MAX_TOOL_CALLS:
            raise self._protocol_error(f"more than {checks.MAX_TOOL_CALLS} tool_use blocks")
        tool = _ToolBlock(index=sum(not t.as_text for t in self._tools.values()))
        self._tools[self._block_index(payload)] = tool
        call_id = checks.text(
            block.get("id", ""), field="a tool_use id", limit=checks.MAX_TOOL_CALL_ID_CHARS, **where
        )
        return [ToolCallDeltaEvent(index=tool.index, id=call_id, name=name)]

    def _on_block_delta(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        delta = payload.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [TextDeltaEvent(str(delta["text"]))]
        if kind == "input_json_delta":
            tool = self._tools.get(self._block_index(payload))
            fragment = str(delta.get("partial_json") or "")
            if tool is not None and fragment:
                tool.got_arguments = True
                if tool.as_text:
                    return [TextDeltaEvent(fragment)]
                return [ToolCallDeltaEvent(index=tool.index, arguments_delta=fragment)]
            # A server tool's input (server_tool_use, e.g. web search): the model is working.
            return [ProgressEvent(len(fragment))] if tool is None else []
        if kind == "thinking_delta":
            text = str(delta.get("thinking") or "")
            # An empty thinking_delta occurs (recording an-adaptive-thinking): progress only.
            return [ReasoningDeltaEvent(self._reasoning_ordinal(payload), text=text)] if text else [_ALIVE]
        if kind == "signature_delta":
            signature = self._signature(delta.get("signature"))
            k = self._reasoning_ordinal(payload)
            return [ReasoningDeltaEvent(k, signature=signature)] if signature else [_ALIVE]
        if kind == "citations_delta":
            return [_ALIVE]
        return []  # delta types newer than this code

    def _on_block_stop(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        tool = self._tools.get(self._block_index(payload))
        if tool is not None and not tool.got_arguments:
            # A tool without parameters streams no JSON at all; "{}" keeps arguments valid JSON.
            tool.got_arguments = True
            if tool.as_text:
                return [TextDeltaEvent("{}")]
            return [ToolCallDeltaEvent(index=tool.index, arguments_delta="{}")]
        return []

    def _on_message_delta(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        delta = payload.get("delta") or {}
        if delta.get("stop_reason"):
            self._stop_reason = str(delta["stop_reason"])
        if delta.get("stop_details") is not None:
            self._stop_details = delta["stop_details"]
        self._merge_usage(payload.get("usage"))
        return []

    def _on_message_stop(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        self.finished = True
        finish = finish_reason(self._stop_reason)
        if finish is FinishReason.TOOL_CALLS and self._answered_as_text:
            # The forced tool of a JSON-schema answer: its input was the answer, not a call.
            if not any(not t.as_text for t in self._tools.values()):
                finish = FinishReason.STOP
        refusal = self._refusal() if finish is FinishReason.REFUSAL else None
        usage = usage_from(self._usage)
        return [EndEvent(finish, usage, usage_reported=bool(self._usage), refusal=refusal)]

    def _refusal(self) -> Refusal:
        """stop_details {"type": "refusal", "category", "explanation"} (either may be null)."""
        details = self._stop_details if isinstance(self._stop_details, dict) else {}
        return Refusal(
            explanation=self._bounded(details.get("explanation"), "stop_details.explanation"),
            category=self._bounded(details.get("category"), "stop_details.category"),
        )

    def _bounded(self, value: Any, what: str) -> str:
        return checks.text(
            value, field=what, limit=MAX_REFUSAL_CHARS, provider=self.provider, model=self.model
        )

    def _merge_usage(self, usage: Any) -> None:
        # message_delta counts are cumulative: a later value replaces an earlier one.
        if not isinstance(usage, dict):
            return
        for key, value in usage.items():
            if key in _NESTED_COUNTS:
                if isinstance(value, dict):
                    for sub in _NESTED_COUNTS[key]:
                        if value.get(sub) is not None:
                            self._usage[sub] = self._count(value[sub], f"{key}.{sub}")
                continue
            if key in _COUNT_FIELDS and value is not None:
                # A count must be one (an integer in range), else the stream is not the protocol.
                value = self._count(value, key)
            if isinstance(value, int) and not isinstance(value, bool):
                self._usage[key] = value

    def _count(self, value: Any, field: str) -> int:
        return checks.count(value, field=field, provider=self.provider, model=self.model)

    def _reasoning_ordinal(self, payload: Mapping[str, Any]) -> int:
        """The reasoning block's ordinal for this content block, numbered as blocks open."""
        index = self._block_index(payload)
        if index not in self._reasoning:
            self._reasoning[index] = len(self._reasoning)
        return self._reasoning[index]

    def _signature(self, value: Any, *, what: str = "a thinking signature") -> str:
        return checks.text(
            value, field=what, limit=MAX_SIGNATURE_CHARS, provider=self.provider, model=self.model
        )

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


def message_events(
    doc: Any, *, provider: str, model: str, json_tool: str | None = None
) -> list[CompletionEvent]:
    """A whole (non-streamed) Message as the events its stream would have given: the same
    parser, fed the stream events the message stands for, so both paths map alike."""
    parser = StreamParser(provider=provider, model=model, json_tool=json_tool)
    if not isinstance(doc, dict) or doc.get("type") == "error":
        if isinstance(doc, dict):
            raise stream_error(doc, provider=provider, model=model)
        raise parser._protocol_error("a message that is not a JSON object")
    content = doc.get("content")
    if not isinstance(content, list):
        raise parser._protocol_error("a message without a content list")
    start = {
        key: value for key, value in doc.items() if key not in ("content", "stop_reason", "stop_details")
    }
    out = parser.feed_payload("message_start", {"type": "message_start", "message": start})
    for index, block in enumerate(content):
        if not isinstance(block, dict):
            raise parser._protocol_error(f"content[{index}] is not an object")
        out += parser.feed_payload(
            "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
        )
        if block.get("type") == "tool_use":
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out += parser.feed_payload(
                "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
            )
        out += parser.feed_payload("content_block_stop", {"type": "content_block_stop", "index": index})
    end: dict[str, Any] = {"stop_reason": doc.get("stop_reason"), "stop_details": doc.get("stop_details")}
    out += parser.feed_payload("message_delta", {"type": "message_delta", "delta": end})
    out += parser.feed_payload("message_stop", {"type": "message_stop"})
    return out


def usage_from(usage: Mapping[str, Any]) -> Usage:
    """Anthropic's input_tokens excludes cached tokens; the neutral input count includes them.
    Thinking tokens are part of output_tokens (Anthropic bills them there); the 1h cache
    writes are part of cache_creation_input_tokens."""
    cache_read = int(usage.get("cache_read_input_tokens") or 0)
    one_hour = int(usage.get("ephemeral_1h_input_tokens") or 0)
    five_minutes = int(usage.get("ephemeral_5m_input_tokens") or 0)
    cache_write = int(usage.get("cache_creation_input_tokens") or 0) or one_hour + five_minutes
    output = int(usage.get("output_tokens") or 0)
    return Usage(
        input_tokens=int(usage.get("input_tokens") or 0) + cache_read + cache_write,
        output_tokens=output,
        cached_input_tokens=cache_read,
        cache_write_input_tokens=cache_write,
        reasoning_tokens=min(int(usage.get("thinking_tokens") or 0), output),
        cache_write_1h_input_tokens=min(one_hour, cache_write),
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
