"""Gemini's responses <-> neutral types: pure mapping, no I/O (PROTOCOLS-CLOUD.md A4-A7).

`build_body` (from gemini_request) makes the request; `StreamParser` turns the
`GenerateContentResponse` chunks of `streamGenerateContent?alt=sse` (or a whole
`generateContent` answer, or the JSON array the method sends without `alt=sse`) into
neutral events; `Frames` cuts the SSE body, CRLF or LF, and also catches the bare JSON
`{"error": ...}` Google writes into a stream that fails after it started;
`error_from_body` reads google.rpc Status bodies (ErrorInfo reason, RetryInfo delay,
QuotaFailure ids); `models_page` reads the model listing; `embed_body` / `parse_embeddings`
are batchEmbedContents. Shared by type gemini and the Gemini half of type vertex.

The stream's events: thought summaries (`thought: true` parts) are reasoning blocks, one
per run of thought parts; a thoughtSignature on a thought part is that block's signature,
and one on an answer part (text or functionCall) is a reasoning block of its own, holding
only the signature, emitted just before the part so that history keeps it in front of the
part it belongs to (gemini_request puts it back there). Function calls arrive whole; a
call without an id gets one made here. usageMetadata is cumulative (the last one counts);
the candidate that carries finishReason ends the answer.
"""

from __future__ import annotations

import json
import re
import secrets
import urllib.parse
from collections.abc import Mapping
from typing import Any

import orjson

from broker import errors
from broker.providers import checks
from broker.providers.base import UpstreamErrorInfo, classify_error, retry_after_seconds
from broker.providers.gemini_request import PROVIDER_TYPE, RESERVED_OPTIONS, build_body
from broker.providers.sse import LineDecoder, SSEError
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
    "PROVIDER_TYPE",
    "RESERVED_OPTIONS",
    "Frames",
    "StreamParser",
    "build_body",
    "embed_body",
    "embed_path",
    "error_from_body",
    "error_info",
    "model_path",
    "models_page",
    "models_path",
    "parse_embeddings",
    "parse_status",
    "response_events",
    "stream_error",
    "stream_path",
    "usage_from",
]

API_VERSION = "v1beta"
MODELS_PAGE_SIZE = 1000
# A thought signature: opaque base64, a few hundred bytes to some KB.
MAX_SIGNATURE_CHARS = 1 << 20
MAX_REFUSAL_CHARS = 8192
# Bytes of bare (non-`data:`) JSON in an SSE body: a mid-stream error body, never an answer.
MAX_BARE_JSON = 64 * 1024

_FILTERED = frozenset(
    {
        "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
    }
)  # fmt: skip
_FINISH = {"STOP": FinishReason.STOP, "MAX_TOKENS": FinishReason.LENGTH}
_ALIVE = ProgressEvent()
_COUNTS = (
    "promptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "cachedContentTokenCount",
    "toolUsePromptTokenCount",
)


def finish_reason(reason: str) -> FinishReason:
    """STOP, MAX_TOKENS, the filters (CONTENT_FILTER), the rest OTHER (MALFORMED_FUNCTION_CALL,
    LANGUAGE, ...); a function call's STOP becomes TOOL_CALLS where the parts show one."""
    if reason in _FILTERED:
        return FinishReason.CONTENT_FILTER
    return _FINISH.get(reason, FinishReason.OTHER)


class Frames:
    """An SSE body cut into frames, a network read at a time: `data:` events (blank-line
    separated, CRLF or LF) and bare JSON documents outside any `data:` line (the error body
    Google writes when a stream fails after it started). Lines are capped (LineDecoder)."""

    def __init__(self, max_line: int) -> None:
        self._lines = LineDecoder(max_line)
        self._data: list[bytes] = []
        self._bare: list[bytes] = []
        self._bare_size = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        for line in self._lines.feed(chunk):
            if not line:
                if self._data:
                    out.append(b"\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value[:1] == b" " else value)
            elif line[:1] == b":" or line.startswith((b"event:", b"id:", b"retry:")):
                continue
            else:
                self._bare_line(line, out)
        return out

    def _bare_line(self, line: bytes, out: list[bytes]) -> None:
        self._bare.append(line)
        self._bare_size += len(line)
        if self._bare_size > MAX_BARE_JSON:
            raise SSEError(f"the stream carries over {MAX_BARE_JSON} bytes outside its events")
        text = b"\n".join(self._bare)
        try:
            orjson.loads(text)
        except orjson.JSONDecodeError:
            return  # not whole yet (a pretty-printed body arrives a line at a time)
        out.append(text)
        self._bare, self._bare_size = [], 0


class StreamParser:
    """GenerateContentResponse chunks -> deltas and, with the candidate's finishReason, the
    one EndEvent. Raises BrokerError for an error chunk, a blocked prompt and anything that
    is not the protocol. StartEvent is the caller's to send when the 200 arrives."""

    def __init__(self, *, provider: str, model: str, provider_type: str = PROVIDER_TYPE) -> None:
        self.provider = provider
        self.model = model
        self.provider_type = provider_type
        self.finished = False
        self._usage: dict[str, int] = {}
        self._calls = 0
        self._reasoning = -1  # the open reasoning block's ordinal; blocks count from 0
        self._in_thought = False

    def feed(self, data: bytes | str) -> list[CompletionEvent]:
        if self.finished:
            return []
        payload = checks.decode_json(data, provider=self.provider, model=self.model, what="the stream")
        if isinstance(payload, list):  # streamGenerateContent without alt=sse: one JSON array
            events: list[CompletionEvent] = []
            for item in payload:
                events += self.feed_payload(item)
            return events
        return self.feed_payload(payload)

    def feed_payload(self, payload: Any) -> list[CompletionEvent]:
        if self.finished:
            return []
        if not isinstance(payload, dict):
            raise self._protocol(f"a chunk that is {type(payload).__name__}, not an object")
        if isinstance(payload.get("error"), dict):
            raise stream_error(payload, provider=self.provider, model=self.model)
        try:
            return self._chunk(payload)
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            raise self._protocol(f"a malformed chunk ({errors.bound(str(exc), 200)})") from None

    def _chunk(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        self._merge_usage(payload.get("usageMetadata"))
        feedback = payload.get("promptFeedback")
        candidates = payload.get("candidates") or []
        if isinstance(feedback, dict) and feedback.get("blockReason") and not candidates:
            raise self._blocked(feedback)
        if not candidates:
            return [_ALIVE]  # a usage-only chunk
        candidate = candidates[0]
        if not isinstance(candidate, dict):
            raise self._protocol("a candidate that is not an object")
        events: list[CompletionEvent] = []
        content = candidate.get("content") or {}
        for part in content.get("parts") or []:
            if isinstance(part, dict):
                events += self._part(part)
        reason = candidate.get("finishReason")
        if reason:
            events.append(self._end(str(reason), candidate))
        return events or [_ALIVE]

    def _part(self, part: Mapping[str, Any]) -> list[CompletionEvent]:
        signature = self._text(part.get("thoughtSignature"), "a thoughtSignature", MAX_SIGNATURE_CHARS)
        if part.get("thought") is True:
            if not self._in_thought:
                self._reasoning += 1
                self._in_thought = True
            text = self._text(part.get("text"), "a thought", 1 << 30)
            if not text and not signature:
                return [_ALIVE]
            return [ReasoningDeltaEvent(self._reasoning, text=text, signature=signature)]
        self._in_thought = False
        out: list[CompletionEvent] = []
        if signature:
            # An answer part's signature: a block of its own, in front of the part.
            self._reasoning += 1
            out.append(ReasoningDeltaEvent(self._reasoning, signature=signature))
        if "functionCall" in part:
            out += self._call(part["functionCall"])
        elif isinstance(part.get("text"), str):
            if part["text"]:
                out.append(TextDeltaEvent(part["text"]))
        else:
            out.append(_ALIVE)  # inline data, code execution: not carried, but the model works
        return out

    def _call(self, call: Any) -> list[CompletionEvent]:
        if not isinstance(call, dict):
            raise self._protocol("a functionCall that is not an object")
        if self._calls >= checks.MAX_TOOL_CALLS:
            raise self._protocol(f"more than {checks.MAX_TOOL_CALLS} function calls")
        name = self._text(call.get("name"), "a functionCall name", checks.MAX_TOOL_NAME_CHARS)
        call_id = self._text(call.get("id"), "a functionCall id", checks.MAX_TOOL_CALL_ID_CHARS)
        args = call.get("args")
        arguments = json.dumps(args if args is not None else {}, ensure_ascii=False)
        index = self._calls
        self._calls += 1
        # Gemini seldom names its calls; the caller needs an id to answer with.
        return [
            ToolCallDeltaEvent(
                index, id=call_id or f"call_{secrets.token_hex(12)}", name=name, arguments_delta=arguments
            )
        ]

    def _end(self, reason: str, candidate: Mapping[str, Any]) -> EndEvent:
        self.finished = True
        finish = finish_reason(reason)
        if finish is FinishReason.STOP and self._calls:
            finish = FinishReason.TOOL_CALLS
        refusal = None
        if finish is FinishReason.CONTENT_FILTER:
            refusal = self._filtered(reason, candidate)
        return EndEvent(finish, usage_from(self._usage), usage_reported=bool(self._usage), refusal=refusal)

    def _filtered(self, reason: str, candidate: Mapping[str, Any]) -> Refusal:
        """The filter's reason kept: the blocked harm category (SAFETY) or the finishReason."""
        category = reason
        for rating in candidate.get("safetyRatings") or []:
            if isinstance(rating, dict) and rating.get("blocked") is True and rating.get("category"):
                category = str(rating["category"])
                break
        message = self._text(candidate.get("finishMessage"), "finishMessage", MAX_REFUSAL_CHARS)
        explanation = message or f"Gemini stopped the answer: finishReason {reason}"
        return Refusal(explanation=explanation, category=self._text(category, "a category", 256))

    def _blocked(self, feedback: Mapping[str, Any]) -> errors.ContentFiltered:
        reason = self._text(feedback.get("blockReason"), "blockReason", 256)
        message = self._text(feedback.get("blockReasonMessage"), "blockReasonMessage", MAX_REFUSAL_CHARS)
        detail = f": {message}" if message else ""
        return errors.ContentFiltered(
            f"{self.provider}: the prompt was blocked (promptFeedback.blockReason {reason}){detail}",
            provider=self.provider,
            model=self.model,
            metadata={"block_reason": reason},
        )

    def _merge_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        for key in _COUNTS:  # cumulative: a later chunk's count replaces an earlier one
            if usage.get(key) is not None:
                self._usage[key] = checks.count(
                    usage[key], field=key, provider=self.provider, model=self.model
                )

    def _text(self, value: Any, what: str, limit: int) -> str:
        return checks.text(value, field=what, limit=limit, provider=self.provider, model=self.model)

    def _protocol(self, what: str) -> errors.UpstreamProtocolError:
        return errors.UpstreamProtocolError(
            f"{self.provider}: unexpected generateContent stream: {what}",
            provider=self.provider,
            model=self.model,
        )


def response_events(
    doc: Any, *, provider: str, model: str, provider_type: str = PROVIDER_TYPE
) -> list[CompletionEvent]:
    """A whole answer (a generateContent object, or the JSON array a stream without alt=sse
    is) as the events its stream would have given; EndEvent last."""
    parser = StreamParser(provider=provider, model=model, provider_type=provider_type)
    events = parser.feed(orjson.dumps(doc))
    if not parser.finished:
        raise parser._protocol("the answer has no candidate with a finishReason (it may be cut short)")
    return events


def usage_from(usage: Mapping[str, int]) -> Usage:
    """promptTokenCount includes the cached tokens; the tool-use prompt is billed as input too.
    Thoughts are output (billed so) and reported as reasoning."""
    thoughts = usage.get("thoughtsTokenCount", 0)
    return Usage(
        input_tokens=usage.get("promptTokenCount", 0) + usage.get("toolUsePromptTokenCount", 0),
        output_tokens=usage.get("candidatesTokenCount", 0) + thoughts,
        cached_input_tokens=usage.get("cachedContentTokenCount", 0),
        reasoning_tokens=thoughts,
    )


# --- errors ----------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")
# The HTTP status of each google.rpc code name (for an error written into a stream).
_STATUS_OF_CODE = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def parse_status(body: bytes | str) -> tuple[UpstreamErrorInfo, float | None, int | None] | None:
    """A google.rpc Status body `{"error": {"code", "message", "status", "details"}}` as
    (info, RetryInfo delay in seconds, the code), or None when the body is not one."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, list) and doc and isinstance(doc[0], dict):
        doc = doc[0]  # a JSON-array stream that failed: [{"error": ...}]
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict) or not ("status" in err or isinstance(err.get("code"), int)):
        return None
    status = str(err.get("status") or "")
    message = str(err.get("message") or "")
    kind, delay = status, None
    for detail in err.get("details") or []:
        if not isinstance(detail, dict):
            continue
        dtype = str(detail.get("@type", ""))
        if dtype.endswith("google.rpc.ErrorInfo") and detail.get("reason"):
            kind = str(detail["reason"])  # API_KEY_INVALID, SERVICE_DISABLED, ...
        elif dtype.endswith("google.rpc.RetryInfo"):
            delay = _duration(detail.get("retryDelay"))
        elif dtype.endswith("google.rpc.QuotaFailure"):
            ids = [str(v.get("quotaId", "")) for v in detail.get("violations") or [] if isinstance(v, dict)]
            if any("PerDay" in q for q in ids):
                kind = "quota_per_day"  # a daily quota: retrying soon will not help
    lowered = message.lower()
    if "exceeds the maximum number of tokens" in lowered or "input token count" in lowered:
        kind = "context_length_exceeded"
    code = err.get("code") if isinstance(err.get("code"), int) else None
    text = f"{status}: {message}" if status and message else message or status
    return UpstreamErrorInfo(message=text, kind=kind), delay, code


def _duration(value: Any) -> float | None:
    """A google.protobuf.Duration in JSON: "58s", "0.5s"."""
    if isinstance(value, str) and (m := _DURATION.match(value.strip())):
        return float(m.group(1))
    return None


def error_info(body: bytes) -> UpstreamErrorInfo:
    parsed = parse_status(body)
    if parsed is not None:
        return parsed[0]
    # A proxy or load balancer answering in HTML or text. Redact, then cut.
    return UpstreamErrorInfo(message=redact(body[:65536].decode("utf-8", "replace")).strip()[:300])


def error_from_body(
    provider: str, status: int, headers: Mapping[str, str], body: bytes, *, model: str
) -> errors.BrokerError:
    """An HTTP error answer as the broker's exception, by the shared status table, with the
    ErrorInfo reason deciding where the status alone misleads (a bad key is a 400 here) and
    the RetryInfo delay as the retry hint (Google sends no Retry-After)."""
    parsed = parse_status(body)
    info, delay = (parsed[0], parsed[1]) if parsed is not None else (error_info(body), None)
    message = f"{provider} returned HTTP {status}: {redact(info.message) or 'no message'}"
    kw: dict[str, Any] = {"provider": provider, "model": model, "upstream_status": status}
    return _classified(status, info, message, headers, kw, delay)


def _classified(
    status: int,
    info: UpstreamErrorInfo,
    message: str,
    headers: Mapping[str, str],
    kw: dict[str, Any],
    delay: float | None,
) -> errors.BrokerError:
    if info.kind in ("API_KEY_INVALID", "ACCESS_TOKEN_EXPIRED", "CREDENTIALS_MISSING", "UNAUTHENTICATED"):
        exc: errors.BrokerError = errors.UpstreamAuthFailed(message, **kw)
    elif info.kind in ("FAILED_PRECONDITION", "SERVICE_DISABLED", "BILLING_DISABLED"):
        # Billing, the region's free tier, an API not enabled: the operator's to fix.
        exc = errors.UpstreamPermissionDenied(message, **kw)
    elif status == 429:
        delay = delay if delay is not None else retry_after_seconds(headers)
        # RESOURCE_EXHAUSTED is a rate or quota window (its message says "quota" and "billing"
        # either way); only a per-day quota is not worth retrying soon.
        if info.kind == "quota_per_day":
            exc = errors.UpstreamQuotaExceeded(message, retry_after=delay, **kw)
        else:
            exc = errors.UpstreamRateLimited(message, retry_after=delay, **kw)
    else:
        exc = classify_error(status, info, message, headers, kw)
    if delay is not None and exc.retry_after is None:
        exc.retry_after = delay
    if info.kind and info.kind != info.message:
        exc.metadata.setdefault("upstream_reason", info.kind)
    return exc


def stream_error(payload: Mapping[str, Any], *, provider: str, model: str) -> errors.BrokerError:
    """The BrokerError for an `{"error": ...}` written into a stream after the HTTP 200."""
    body = orjson.dumps(payload)
    parsed = parse_status(body)
    info, delay, code = parsed if parsed is not None else (error_info(body), None, None)
    name = str((payload.get("error") or {}).get("status") or "")
    status = code if code is not None and code >= 400 else _STATUS_OF_CODE.get(name, 500)
    message = f"{provider}: error mid-stream: {redact(info.message) or 'no message'}"
    return _classified(status, info, message, {}, {"provider": provider, "model": model}, delay)


# --- model listing ---------------------------------------------------------------------------


def models_path(page_token: str | None = None, *, page_size: int = MODELS_PAGE_SIZE) -> str:
    path = f"{API_VERSION}/models?pageSize={page_size}"
    return f"{path}&pageToken={urllib.parse.quote(page_token, safe='')}" if page_token else path


def models_page(doc: Any, *, provider: str, key: str = "models") -> tuple[list[DiscoveredModel], str | None]:
    """One page of `GET models`: the chat and embedding models (by supportedGenerationMethods)
    and the next page's token. `key` is the list's name (Vertex's publisher listing:
    publisherModels)."""
    if not isinstance(doc, dict):
        raise errors.UpstreamProtocolError(
            f"{provider}: the model listing is not a JSON object", provider=provider
        )
    items = doc.get(key)
    if items is None:
        items = doc.get("models") or []
    if not isinstance(items, list):
        raise errors.UpstreamProtocolError(
            f"{provider}: the model listing's {key} is not a list", provider=provider
        )
    models: list[DiscoveredModel] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        methods = item.get("supportedGenerationMethods") or item.get("supportedActions")
        if isinstance(methods, list) and not {"generateContent", "embedContent"} & set(map(str, methods)):
            continue  # image, video and other models a completion or Embed cannot use
        raw = str(item.get("name") or "")
        name = checks.listed_model_id(raw.rsplit("/models/", 1)[-1].removeprefix("models/"))
        if name is None:
            continue
        models.append(
            DiscoveredModel(
                name=name,
                context_window=checks.listed_tokens(item.get("inputTokenLimit")),
                max_output_tokens=checks.listed_tokens(item.get("outputTokenLimit")),
            )
        )
    token = doc.get("nextPageToken")
    return models, (token if isinstance(token, str) and token else None)


# --- embeddings ------------------------------------------------------------------------------


def model_path(model: str) -> str:
    """`models/{id}` for a bare id; a resource name the caller gave (`tunedModels/x`) as it is."""
    head, sep, rest = model.partition("/")
    if sep and head in ("models", "tunedModels") and rest:
        return f"{head}/{urllib.parse.quote(rest, safe='')}"
    return f"models/{urllib.parse.quote(model, safe='')}"


def stream_path(model: str) -> str:
    return f"{API_VERSION}/{model_path(model)}:streamGenerateContent?alt=sse"


def embed_path(model: str) -> str:
    return f"{API_VERSION}/{model_path(model)}:batchEmbedContents"


def embed_body(model: str, inputs: tuple[str, ...], dimensions: int | None) -> dict[str, Any]:
    """batchEmbedContents: one request per input, each naming the URL's model."""
    requests = []
    for text in inputs:
        req: dict[str, Any] = {"model": model_path(model), "content": {"parts": [{"text": text}]}}
        if dimensions is not None:
            req["outputDimensionality"] = dimensions
        requests.append(req)
    return {"requests": requests}


def parse_embeddings(doc: Any, count: int, *, provider: str, model: str) -> EmbedResult:
    """`{"embeddings": [{"values": [...]}, ...]}` in input order; the API reports no usage."""
    items = doc.get("embeddings") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise checks.protocol_error(provider, model, "batchEmbedContents answered without an embeddings list")
    vectors = tuple(
        checks.vector(
            item.get("values") if isinstance(item, dict) else None,
            field=f"embeddings[{i}].values",
            provider=provider,
            model=model,
        )
        for i, item in enumerate(items)
    )
    return EmbedResult(vectors, 0, usage_reported=False)
