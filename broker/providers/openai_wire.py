"""OpenAI Chat Completions wire format <-> neutral types. Pure functions, no I/O.

Also serves OpenAI-compatible servers (Ollama /v1, vLLM, llama.cpp, Groq, OpenRouter), so
every reader is lenient: unknown fields are ignored, optional fields may be missing or null,
and the error shapes of the common servers are all understood (PROTOCOLS.md section A).
The request body is built in `openai_request` (re-exported here); this module reads what
comes back: stream chunks (answer text, tool calls, reasoning, refusals, usage), errors,
model listings and embeddings.

Reasoning arrives as `delta.reasoning` (Groq, OpenRouter, vLLM, Ollama /v1) or
`delta.reasoning_content` (llama.cpp, DeepSeek, older vLLM), the same keys on a `message`:
one reasoning block, index 0 (PROTOCOLS-2026.md 1.4). OpenRouter's `reasoning_details`
(with an Anthropic signature in it) is ignored: the signature cannot be sent back through
Chat Completions by the broker, so keeping it would promise what the API cannot do.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from broker import errors
from broker.providers import checks
from broker.providers.base import UpstreamErrorInfo, classify_error
from broker.providers.openai_request import (
    AUTO,
    MAX_COMPLETION_TOKENS,
    MAX_TOKENS,
    WireTarget,
    build_body,
    is_reasoning_model_id,
    limit_field,
)
from broker.redact import redact
from broker.types import (
    CompletionEvent,
    DiscoveredModel,
    EmbedResult,
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
    "AUTO",
    "MAX_COMPLETION_TOKENS",
    "MAX_REFUSAL_CHARS",
    "MAX_TOKENS",
    "ChunkParser",
    "WireTarget",
    "build_body",
    "build_embed_body",
    "error_from_payload",
    "is_reasoning_model_id",
    "limit_field",
    "parse_embeddings",
    "parse_error",
    "parse_models",
    "usage_from",
]

# Bound on an upstream's nested error detail (OpenRouter's error.metadata.raw) in a message.
_RAW_DETAIL_CHARS = 500

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
    "function_call": FinishReason.TOOL_CALLS,  # the deprecated name of the same thing
}
# Once per stream, but `FinishReason.STOP` is a slow lookup in Python 3.11 (EnumType's
# __getattr__ hook, ~1k instructions): module constants (see openai_request).
_STOP, _OTHER, _REFUSAL, _TOOL_CALLS = (
    FinishReason.STOP,
    FinishReason.OTHER,
    FinishReason.REFUSAL,
    FinishReason.TOOL_CALLS,
)
_SNIPPET = 200
# A refusal's explanation is kept up to this many characters (the fragments are concatenated;
# a refusal is a sentence or two, and the rest would only grow the answer).
MAX_REFUSAL_CHARS = 16384


# --- streaming response ----------------------------------------------------------------------


class ChunkParser:
    """Turns decoded `data:` payloads of one stream into neutral events.

    Feed every JSON object in order; call `end()` after `[DONE]` for the one EndEvent.
    Raises the mapped BrokerError when a payload is an error (mid-stream failure).
    """

    def __init__(self, *, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        self._finish: FinishReason | None = None
        self._usage: Usage | None = None  # made at the end if no chunk carried usage
        self._content = False  # any answer text or tool call seen
        # The refusal's fragments (delta.refusal), concatenated for the EndEvent.
        self._refusal: list[str] = []
        self._refusal_chars = 0
        # Upstream tool-call index -> (id sent, name sent); ids keep index-less servers keyed.
        self._calls: dict[int, tuple[bool, bool]] = {}
        self._ids: dict[str, int] = {}
        self._last_index = 0
        self._with_arguments: set[int] = set()

    def feed(self, payload: Any) -> list[CompletionEvent]:
        if not isinstance(payload, dict):
            raise self._protocol(f"a stream chunk is not a JSON object: {_snip(json.dumps(payload))}")
        get = payload.get
        if get("error") is not None:
            raise error_from_payload(payload["error"], provider=self.provider, model=self.model)
        usage = get("usage")
        if usage is not None and isinstance(usage, dict):  # null on every chunk but the last
            self._usage = usage_from(usage, provider=self.provider, model=self.model)
        events: list[CompletionEvent] = []
        for choice in get("choices") or ():
            # n is never sent, so only choice 0 exists; ignore anything else defensively.
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            # `message` is the whole-answer shape (a server that answers a stream in one piece).
            delta = choice.get("delta") or choice.get("message")
            if delta and isinstance(delta, dict):
                text = delta.get("content")
                if len(delta) == 1 and text is not None:
                    # Only `content` (nearly every chunk of an answer): nothing else to look for.
                    if isinstance(text, str) and text:
                        self._content = True
                        events.append(TextDeltaEvent(text))
                else:
                    self._delta(delta, text, events)
            reason = choice.get("finish_reason")
            if reason and isinstance(reason, str):
                self._finish = _FINISH.get(reason, _OTHER)
                events.extend(self._close_empty_calls())
        return events

    def _close_empty_calls(self) -> list[CompletionEvent]:
        """A call to a tool without parameters may stream `"arguments": ""` and nothing else;
        "{}" keeps its arguments valid JSON for the caller (Anthropic's mapping does the same)."""
        empty = [i for i in sorted(self._calls) if i not in self._with_arguments]
        self._with_arguments.update(empty)
        return [ToolCallDeltaEvent(index=i, arguments_delta="{}") for i in empty]

    def _delta(self, delta: dict[str, Any], text: Any, events: list[CompletionEvent]) -> None:
        """The events of one `delta` (or `message`; `text` its content), appended to `events`."""
        get = delta.get
        # Reasoning first: a server that sends reasoning and content in one chunk thought first.
        # `reasoning ?? reasoning_content`: the current name first (vLLM renamed it), then the
        # DeepSeek-style one; OpenRouter sends `"reasoning": null` beside its details.
        reasoning = get("reasoning")
        if not (reasoning and isinstance(reasoning, str)):
            reasoning = get("reasoning_content")
        if reasoning and isinstance(reasoning, str):
            events.append(ReasoningDeltaEvent(0, text=reasoning))
        if text and isinstance(text, str):
            self._content = True
            events.append(TextDeltaEvent(text))
        # `refusal` is the model declining (OpenAI; the stream then ends with finish "stop"):
        # not answer text, so kept for the EndEvent; meanwhile the model is working, which is
        # progress for the time-to-first-token and stall timers.
        refusal = get("refusal")
        if refusal and isinstance(refusal, str):
            room = MAX_REFUSAL_CHARS - self._refusal_chars
            if room > 0:
                self._refusal.append(refusal[:room])
                self._refusal_chars += min(len(refusal), room)
            events.append(ProgressEvent(len(refusal)))
        for call in get("tool_calls") or ():
            if isinstance(call, dict) and (ev := self._tool_delta(call)) is not None:
                self._content = True
                events.append(ev)

    def _tool_delta(self, call: dict[str, Any]) -> ToolCallDeltaEvent | None:
        where = {"provider": self.provider, "model": self.model}
        call_id = checks.text(
            _str(call.get("id")), field="a tool call id", limit=checks.MAX_TOOL_CALL_ID_CHARS, **where
        )
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        name = checks.text(
            _str(fn.get("name")), field="a tool call name", limit=checks.MAX_TOOL_NAME_CHARS, **where
        )
        raw_args = fn.get("arguments")
        if isinstance(raw_args, dict):  # a few servers send parsed arguments
            raw_args = json.dumps(raw_args, separators=(",", ":"))
        args = _str(raw_args)
        index = call.get("index")
        if index is None:
            # `index` is required by the spec; without it, a new id starts a new call.
            if call_id and call_id not in self._ids:
                index = max(self._calls, default=-1) + 1
            else:
                index = self._ids.get(call_id, self._last_index)
        index = checks.index(index, field="a tool call index", limit=checks.MAX_TOOL_CALLS, **where)
        self._last_index = index
        id_sent, name_sent = self._calls.get(index, (False, False))
        # Some servers repeat id and name on every fragment: pass them on once only.
        out_id = call_id if call_id and not id_sent else ""
        out_name = name if name and not name_sent else ""
        self._calls[index] = (id_sent or bool(out_id), name_sent or bool(out_name))
        if call_id:
            self._ids.setdefault(call_id, index)
        if args:
            self._with_arguments.add(index)
        if not (out_id or out_name or args):
            return None
        return ToolCallDeltaEvent(index=index, id=out_id, name=out_name, arguments_delta=args)

    def end(self) -> EndEvent:
        """The one EndEvent, after `[DONE]`.

        [DONE] with no finish_reason (llama-cpp-python's server): `[DONE]` is the server's
        own word that the answer is complete, and a server that cut it at a limit would say
        "length"; so an answer with content ends as "stop" (tool_calls when it called
        tools), and one with nothing in it as "other". A refusal ends as REFUSAL with its
        explanation (a content_filter finish stays that, with the refusal attached). Without a
        usage chunk `usage_reported` is False: zeros are not counts.
        """
        reason = self._finish
        refusal = Refusal(explanation="".join(self._refusal)) if self._refusal else None
        if refusal is not None and reason in (None, _STOP):
            reason = _REFUSAL
        elif reason is None:
            reason = _STOP if self._content else _OTHER
        if reason == _STOP and self._calls:
            # Some compatible servers report "stop" after tool calls; callers loop on tool_calls.
            reason = _TOOL_CALLS
        usage = self._usage
        return EndEvent(
            finish_reason=reason,
            usage=usage if usage is not None else Usage(),
            usage_reported=usage is not None,
            refusal=refusal,
        )

    def _protocol(self, message: str) -> errors.UpstreamProtocolError:
        return errors.UpstreamProtocolError(
            f"{self.provider}: {message}", provider=self.provider, model=self.model
        )


def usage_from(u: dict[str, Any], *, provider: str = "", model: str = "") -> Usage:
    """The usage object; every count an integer in range (checks.count), else a protocol error.

    `completion_tokens_details.reasoning_tokens` are inside completion_tokens (billed once, as
    output); `prompt_tokens_details.cache_write_tokens` (GPT-5.6 and later) where present."""
    details = u.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    out_details = u.get("completion_tokens_details")
    out_details = out_details if isinstance(out_details, dict) else {}
    cached = details.get("cached_tokens")
    written = details.get("cache_write_tokens")
    reasoning = out_details.get("reasoning_tokens")
    count = checks.count  # provider/model spelled out: `**where` would merge a dict per call
    # An absent detail is 0 without a call (most usage objects carry only the two counts).
    return Usage(
        input_tokens=count(u.get("prompt_tokens"), field="prompt_tokens", provider=provider, model=model),
        output_tokens=count(
            u.get("completion_tokens"), field="completion_tokens", provider=provider, model=model
        ),
        cached_input_tokens=0
        if cached is None
        else count(cached, field="prompt_tokens_details.cached_tokens", provider=provider, model=model),
        cache_write_input_tokens=0
        if written is None
        else count(written, field="prompt_tokens_details.cache_write_tokens", provider=provider, model=model),
        reasoning_tokens=0
        if reasoning is None
        else count(
            reasoning, field="completion_tokens_details.reasoning_tokens", provider=provider, model=model
        ),
    )


def error_from_payload(err: Any, *, provider: str, model: str) -> errors.BrokerError:
    """A top-level `error` inside a 200 stream (OpenAI, vLLM, Groq, OpenRouter): the same table
    as HTTP errors, so an invalid request (Groq's `tool_use_failed`, `status_code` 400) is the
    caller's error and not retried, while a `server_error` is transient."""
    info = _info_from_error(err)
    status = _payload_status(err)
    if status is None:
        words = [info.kind]
        if isinstance(err, dict):
            words += [w for k in ("type", "code") if isinstance(w := err.get(k), str)]
        status = _status_for_kind(" ".join(words))
    message = f"{provider} failed mid-stream: {redact(info.message) or 'no message'}"
    kw: dict[str, Any] = {"provider": provider, "model": model, "upstream_status": status}
    return classify_error(status, info, message, {}, kw)


def _payload_status(err: Any) -> int | None:
    """The HTTP status an in-stream error states: `status_code` (Groq), `status`, or an integer
    `code` (OpenRouter, vLLM)."""
    if not isinstance(err, dict):
        return None
    for key in ("status_code", "status", "code"):
        value = err.get(key)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
            return value
    return None


def _status_for_kind(kind: str) -> int:
    """No HTTP status in the payload: infer one from the vendor's type/code words."""
    k = kind.lower()
    if "rate_limit" in k or "quota" in k:
        return 429
    if "context_length" in k or "invalid_request" in k:
        return 400
    if "auth" in k or "api_key" in k:
        return 401
    if "not_found" in k:
        return 404
    return 500  # server_error and anything unknown: transient, like a 5xx


# --- other documents ---------------------------------------------------------------------------


def parse_error(status: int, body: bytes) -> UpstreamErrorInfo:
    """Read an error body: OpenAI's `{"error":{...}}`, old vLLM's top level, or plain text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        # orjson: no NaN, no lone surrogates (which no proto string could carry), bounded depth.
        doc = orjson.loads(text) if text else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        if doc.get("error") is not None:
            return _info_from_error(doc["error"])
        if doc.get("object") == "error" or "message" in doc:
            return _info_from_error(doc)
        if isinstance(doc.get("detail"), str):  # FastAPI-based servers
            return UpstreamErrorInfo(message=doc["detail"])
    # HTML from a gateway, or anything else: a short snippet says enough to debug.
    return UpstreamErrorInfo(message=_snip(" ".join(text.split())))


def _info_from_error(err: Any) -> UpstreamErrorInfo:
    if isinstance(err, str):
        return UpstreamErrorInfo(message=err)
    if not isinstance(err, dict):
        return UpstreamErrorInfo(message=_snip(json.dumps(err)))
    message = err.get("message")
    message = message if isinstance(message, str) else ""
    code, etype, param = err.get("code"), err.get("type"), err.get("param")
    # The code is the more specific word (insufficient_quota, context_length_exceeded).
    kind = code if isinstance(code, str) and code else etype if isinstance(etype, str) else ""
    detail = _raw_detail(err.get("metadata"))
    if detail:
        message = f"{message}: {detail}" if message else detail
    return UpstreamErrorInfo(message=message, kind=kind, param=param if isinstance(param, str) else "")


def _raw_detail(metadata: Any) -> str:
    """OpenRouter's `error.metadata`: `raw` is what the provider behind it said (the useful
    part of "Provider returned error"), `provider_name` who said it. Bounded; the caller redacts."""
    if not isinstance(metadata, dict):
        return ""
    raw = metadata.get("raw")
    if raw is None or raw == "":
        return ""
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
    text = redact(" ".join(text[:65536].split()))  # redact, then cut
    if len(text) > _RAW_DETAIL_CHARS:
        text = text[:_RAW_DETAIL_CHARS] + "..."
    who = metadata.get("provider_name")
    return f"{who} said: {text}" if isinstance(who, str) and who else f"upstream said: {text}"


def parse_models(doc: Any, *, provider: str) -> list[DiscoveredModel]:
    """GET /models: `{"object":"list","data":[{"id":...}]}`."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise errors.UpstreamProtocolError(
            f"{provider}: GET models answered without a data list: {_snip(json.dumps(doc))}",
            provider=provider,
        )
    models = []
    for entry in data:
        # An id no caller could send (too long, not text) is skipped, never passed on.
        if isinstance(entry, dict) and (name := checks.listed_model_id(entry.get("id"))) is not None:
            # vLLM reports the context it serves with; OpenAI and others say nothing.
            ctx = checks.listed_tokens(entry.get("max_model_len"))
            models.append(DiscoveredModel(name=name, context_window=ctx))
    return models


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _snip(text: str) -> str:
    text = redact(text)
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


# --- embeddings: POST /v1/embeddings (PROTOCOLS-2026.md 7.1) ---------------------------------


def build_embed_body(
    model: str, inputs: tuple[str, ...], dimensions: int | None, *, base64: bool = False
) -> dict[str, Any]:
    """An array of strings, always (never a bare string); vectors as JSON floats, or with
    `base64` as base64 float32 (api.openai.com documents both; other servers may not)."""
    body: dict[str, Any] = {
        "model": model,
        "input": list(inputs),
        "encoding_format": "base64" if base64 else "float",
    }
    if dimensions is not None:
        body["dimensions"] = dimensions
    return body


def mean_pooled(rows: list[Any], *, field: str, provider: str, model: str) -> tuple[float, ...]:
    """Per-token vectors (llama-cpp-python's server for a model without pooling, e.g. Gemma 3
    270M, answers one vector per token) -> their mean, L2-normalised as servers that pool do."""
    tokens = [
        checks.vector(r, field=f"{field}[{t}]", provider=provider, model=model) for t, r in enumerate(rows)
    ]
    dims = len(tokens[0])
    if any(len(t) != dims for t in tokens):
        raise checks.protocol_error(provider, model, f"{field}: per-token vectors of different lengths")
    # Column sums through zip: the same additions in the same order as a loop per dimension.
    mean = [total / len(tokens) for total in map(sum, zip(*tokens, strict=True))]
    norm = math.sqrt(sum(x * x for x in mean)) or 1.0
    return tuple(x / norm for x in mean)


def parse_embeddings(
    doc: Any, expected: int, *, provider: str, model: str, base64: bool = False
) -> EmbedResult:
    """`{"data":[{"index":i,"embedding":[...]}...],"usage":{"prompt_tokens":n}}`, put in index order.
    With `base64` (the body asked for it) an embedding may also be a base64 string."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise checks.protocol_error(provider, model, "the embeddings answer has no data list")
    vectors: list[tuple[float, ...] | None] = [None] * expected
    for k, item in enumerate(data):
        if not isinstance(item, dict):
            raise checks.protocol_error(provider, model, f"data[{k}] is not an object")
        i = checks.index(
            item.get("index", k), field=f"data[{k}].index", limit=expected, provider=provider, model=model
        )
        if vectors[i] is not None:
            raise checks.protocol_error(provider, model, f"data[{k}].index {i} appears twice")
        raw = item.get("embedding")
        where = f"data[{k}].embedding"
        if base64 and isinstance(raw, str):
            vectors[i] = checks.base64_vector(raw, field=where, provider=provider, model=model)
        elif isinstance(raw, list) and raw and isinstance(raw[0], list):
            vectors[i] = mean_pooled(raw, field=where, provider=provider, model=model)
        else:
            vectors[i] = checks.vector(raw, field=where, provider=provider, model=model)
    missing = [i for i, v in enumerate(vectors) if v is None]
    if missing:
        raise checks.protocol_error(
            provider, model, f"asked for {expected} embeddings, got {expected - len(missing)}"
        )
    usage = doc.get("usage")
    reported = isinstance(usage, dict) and usage.get("prompt_tokens") is not None
    tokens = (
        checks.count(usage.get("prompt_tokens"), field="prompt_tokens", provider=provider, model=model)
        if reported and isinstance(usage, dict)
        else 0
    )
    return EmbedResult(tuple(v for v in vectors if v is not None), tokens, reported)
