"""AWS Bedrock Converse <-> neutral types: pure mapping, no I/O (PROTOCOLS-CLOUD.md C).

The request body is built in `bedrock_request` (re-exported here); this module reads what
comes back: ConverseStream's event-stream messages (decoded by `eventstream`) as neutral
events, the rest-json error bodies and their `x-amzn-ErrorType`, the control plane's model and
inference-profile listings, and InvokeModel embeddings (Titan, Cohere).

Stream rules: text and reasoning blocks start with their deltas (no contentBlockStart);
tool blocks start with `contentBlockStart.start.toolUse` and stream their input as JSON text
fragments; `messageStop` carries the stop reason, `metadata` (always last) the usage, so the
EndEvent comes with `metadata`. Usage: `inputTokens` excludes cache reads and writes (the
neutral input count includes them). An `exception` message ends the stream with the mapped
error (throttling: rate limited and retryable; after content the completion service makes it
STREAM_INTERRUPTED). Every JSON payload carries a random-length `p` padding field: ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from broker import errors
from broker.providers import checks
from broker.providers.base import UpstreamErrorInfo, classify_error
from broker.providers.bedrock_request import PROVIDER_TYPE, RESERVED_OPTIONS, build_body, cache_point
from broker.providers.eventstream import Message
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
    "StreamParser",
    "build_body",
    "cache_point",
    "embed_body",
    "error_info",
    "exception_error",
    "finish_reason",
    "parse_embedding",
    "parse_foundation_models",
    "parse_inference_profiles",
    "usage_from",
]

_FINISH = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "guardrail_intervened": FinishReason.CONTENT_FILTER,
    "content_filtered": FinishReason.CONTENT_FILTER,
}
# The HTTP status each exception comes with (the service model's errors), so an in-stream
# exception is classified by the same table as an HTTP error.
STATUS_OF_EXCEPTION = {
    "validationexception": 400,
    "servicequotaexceededexception": 429,
    "accessdeniedexception": 403,
    "unrecognizedclientexception": 401,
    "invalidsignatureexception": 401,
    "expiredtokenexception": 401,
    "resourcenotfoundexception": 404,
    "modeltimeoutexception": 408,
    "modelerrorexception": 503,
    "modelstreamerrorexception": 503,
    "throttlingexception": 429,
    "modelnotreadyexception": 503,
    "internalserverexception": 500,
    "serviceunavailableexception": 503,
}
MAX_SIGNATURE_CHARS = 1 << 20
MAX_DETAIL_CHARS = 1024
_ALIVE = ProgressEvent()


def finish_reason(stop_reason: str | None) -> FinishReason:
    return _FINISH.get(stop_reason or "", FinishReason.OTHER)


@dataclass(slots=True)
class _Tool:
    index: int  # the neutral index: tool blocks counted from 0
    got_input: bool = False


class StreamParser:
    """ConverseStream messages -> deltas and, at `metadata`, the one EndEvent."""

    def __init__(self, *, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        self.finished = False
        self._stop_reason: str | None = None
        self._tools: dict[int, _Tool] = {}  # by contentBlockIndex
        self._reasoning: dict[int, int] = {}  # contentBlockIndex -> reasoning ordinal

    def feed(self, message: Message) -> list[CompletionEvent]:
        if self.finished:
            return []
        kind = message.header(":message-type")
        if kind == "exception":
            raise exception_error(
                message.header(":exception-type"), message.payload, provider=self.provider, model=self.model
            )
        if kind == "error":
            code = message.header(":error-code")
            text = message.header(":error-message") or message.payload.decode("utf-8", "replace")
            raise exception_error(code, text.encode(), provider=self.provider, model=self.model)
        if kind != "event":
            return []  # a message type newer than this code
        event = message.header(":event-type")
        payload = checks.decode_json(
            message.payload or b"{}", provider=self.provider, model=self.model,
            what=f"the stream ({errors.bound(event, 64) or 'event'})",
        )  # fmt: skip
        if not isinstance(payload, dict):
            raise self._protocol(f"{event!r} carries {type(payload).__name__}, not an object")
        try:
            return self._dispatch(event, payload)
        except (AttributeError, TypeError, ValueError, ArithmeticError) as exc:
            raise self._protocol(
                f"malformed {errors.bound(event, 64)} event ({errors.bound(str(exc), 200)})"
            ) from None

    def _dispatch(self, event: str, payload: dict[str, Any]) -> list[CompletionEvent]:
        if event == "contentBlockStart":
            return self._on_start(payload)
        if event == "contentBlockDelta":
            return self._on_delta(payload)
        if event == "contentBlockStop":
            tool = self._tools.get(self._index(payload))
            if tool is not None and not tool.got_input:
                tool.got_input = True  # a tool without parameters: "{}" keeps the arguments JSON
                return [ToolCallDeltaEvent(index=tool.index, arguments_delta="{}")]
            return []
        if event == "messageStop":
            if payload.get("stopReason"):
                self._stop_reason = str(payload["stopReason"])
            return []
        if event == "metadata":
            return [self._end(payload)]
        return []  # messageStart, and event types newer than this code

    def _on_start(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        start = payload.get("start") or {}
        use = start.get("toolUse") if isinstance(start, dict) else None
        if not isinstance(use, dict):
            return [_ALIVE]  # toolResult, image and newer block kinds: not in the neutral stream
        if len(self._tools) >= checks.MAX_TOOL_CALLS:
            raise self._protocol(f"more than {checks.MAX_TOOL_CALLS} toolUse blocks")
        tool = _Tool(index=len(self._tools))
        self._tools[self._index(payload)] = tool
        where = {"provider": self.provider, "model": self.model}
        call_id = checks.text(
            use.get("toolUseId"), field="a toolUseId", limit=checks.MAX_TOOL_CALL_ID_CHARS, **where
        )
        name = checks.text(use.get("name"), field="a toolUse name", limit=checks.MAX_TOOL_NAME_CHARS, **where)
        return [ToolCallDeltaEvent(index=tool.index, id=call_id, name=name)]

    def _on_delta(self, payload: Mapping[str, Any]) -> list[CompletionEvent]:
        delta = payload.get("delta") or {}
        if not isinstance(delta, dict):
            raise TypeError("delta is not an object")
        text = delta.get("text")
        if isinstance(text, str):
            return [TextDeltaEvent(text)] if text else [_ALIVE]
        use = delta.get("toolUse")
        if isinstance(use, dict):
            fragment = str(use.get("input") or "")
            tool = self._tools.get(self._index(payload))
            if tool is None:
                raise self._protocol("a toolUse delta for a block that did not start as a tool")
            if not fragment:
                return [_ALIVE]
            tool.got_input = True
            return [ToolCallDeltaEvent(index=tool.index, arguments_delta=fragment)]
        reasoning = delta.get("reasoningContent")
        if isinstance(reasoning, dict):
            return self._on_reasoning(payload, reasoning)
        return [_ALIVE]  # citation and newer delta kinds: the model is working

    def _on_reasoning(self, payload: Mapping[str, Any], delta: Mapping[str, Any]) -> list[CompletionEvent]:
        index = self._index(payload)
        k = self._reasoning.setdefault(index, len(self._reasoning))
        text = self._text(delta.get("text"), "reasoning text")
        signature = self._text(delta.get("signature"), "a reasoning signature")
        redacted = self._text(delta.get("redactedContent"), "redacted reasoning")
        if not (text or signature or redacted):
            return [_ALIVE]
        return [ReasoningDeltaEvent(k, text=text, signature=signature, redacted_data=redacted)]

    def _text(self, value: Any, what: str) -> str:
        return checks.text(
            value, field=what, limit=MAX_SIGNATURE_CHARS, provider=self.provider, model=self.model
        )

    def _end(self, payload: Mapping[str, Any]) -> EndEvent:
        self.finished = True
        usage = payload.get("usage")
        finish = finish_reason(self._stop_reason)
        refusal = None
        if finish is FinishReason.CONTENT_FILTER:
            refusal = filter_refusal(self._stop_reason or "", payload.get("trace"))
        return EndEvent(
            finish,
            usage_from(usage if isinstance(usage, dict) else {}, provider=self.provider, model=self.model),
            usage_reported=isinstance(usage, dict),
            refusal=refusal,
        )

    def _index(self, payload: Mapping[str, Any]) -> int:
        return checks.index(
            payload.get("contentBlockIndex", 0),
            field="contentBlockIndex",
            limit=checks.MAX_BLOCK_INDEX,
            provider=self.provider,
            model=self.model,
        )

    def _protocol(self, what: str) -> errors.UpstreamProtocolError:
        return errors.UpstreamProtocolError(
            f"{self.provider}: unexpected ConverseStream message: {what}",
            provider=self.provider,
            model=self.model,
        )


def usage_from(u: Mapping[str, Any], *, provider: str = "", model: str = "") -> Usage:
    """Converse usage: inputTokens excludes cacheRead/cacheWrite (the neutral input includes them)."""
    where = {"provider": provider, "model": model}
    read = checks.count(u.get("cacheReadInputTokens"), field="cacheReadInputTokens", **where)
    write = checks.count(u.get("cacheWriteInputTokens"), field="cacheWriteInputTokens", **where)
    return Usage(
        input_tokens=checks.count(u.get("inputTokens"), field="inputTokens", **where) + read + write,
        output_tokens=checks.count(u.get("outputTokens"), field="outputTokens", **where),
        cached_input_tokens=read,
        cache_write_input_tokens=write,
    )


# Guardrail trace policies and the key naming what each one blocked (never a `match`: that
# is the user's own text, PII included).
_POLICIES = {
    "topicPolicy": ("topics", "name"),
    "contentPolicy": ("filters", "type"),
    "wordPolicy": ("managedWordLists", "type"),
    "sensitiveInformationPolicy": ("piiEntities", "type"),
    "contextualGroundingPolicy": ("filters", "type"),
}


def filter_refusal(stop_reason: str, trace: Any) -> Refusal:
    """A content filter's detail: which guardrail policies blocked (from `trace.guardrail`,
    with `guardrailConfig.trace` enabled), else the stop reason itself."""
    found: list[str] = []
    guardrail = trace.get("guardrail") if isinstance(trace, dict) else None
    if isinstance(guardrail, dict):
        assessments: list[Any] = []
        for key in ("inputAssessment", "outputAssessments"):
            value = guardrail.get(key)
            if isinstance(value, dict):
                for item in value.values():
                    assessments += item if isinstance(item, list) else [item]
        for assessment in assessments:
            if not isinstance(assessment, dict):
                continue
            for policy, (items_key, name_key) in _POLICIES.items():
                section = assessment.get(policy)
                items = section.get(items_key) if isinstance(section, dict) else None
                for item in items if isinstance(items, list) else ():
                    if isinstance(item, dict) and str(item.get("action", "")).upper() in (
                        "BLOCKED",
                        "ANONYMIZED",
                    ):
                        label = f"{policy}:{item.get(name_key, '')}"
                        if label not in found:
                            found.append(label)
    if stop_reason == "guardrail_intervened":
        explanation = "Bedrock Guardrails intervened"
    else:
        explanation = "the model's content filter blocked the answer"
    category = ", ".join(found) if found else stop_reason
    return Refusal(explanation=explanation, category=errors.bound(category, MAX_DETAIL_CHARS))


# --- errors -------------------------------------------------------------------------------------


def error_code(headers: Mapping[str, str], doc: Any) -> str:
    """botocore's rule: `x-amzn-ErrorType` before the first ':' (and after '#'), else the
    body's `__type` or `code`."""
    raw = headers.get("x-amzn-errortype") or headers.get("x-amzn-ErrorType") or ""
    if not raw and isinstance(doc, dict):
        raw = str(doc.get("__type") or doc.get("code") or "")
    return raw.split(":", 1)[0].rsplit("#", 1)[-1].strip()


def error_info(status: int, headers: Mapping[str, str], body: bytes) -> UpstreamErrorInfo:
    """A rest-json error: `{"message": ...}` (some services `Message`), the code in the header."""
    try:
        doc = orjson.loads(body) if body.strip() else None
    except ValueError:
        doc = None
    message = ""
    if isinstance(doc, dict):
        value = doc.get("message", doc.get("Message"))
        message = value if isinstance(value, str) else ""
    if not message:
        message = " ".join(redact(body[:65536].decode("utf-8", "replace")).split())[:300]
    return UpstreamErrorInfo(message=message, kind=error_code(headers, doc))


def status_for(code: str, status: int) -> int:
    """The status a Bedrock exception is classified by (the service model's, where known):
    ModelNotReady (429 on the wire) is the model loading, an availability matter (UNAVAILABLE,
    retried), not a rate limit; ModelError (424) is the model failing (UNAVAILABLE)."""
    known = STATUS_OF_EXCEPTION.get(code.lower())
    return status if known is None else known


def classify(
    status: int, info: UpstreamErrorInfo, message: str, headers: Mapping[str, str], kw: dict[str, Any]
) -> errors.BrokerError:
    code = info.kind.lower()
    if code == "accessdeniedexception":
        return errors.UpstreamPermissionDenied(message, **kw)
    if code == "servicequotaexceededexception":
        return errors.UpstreamQuotaExceeded(message, **kw)
    if code in ("unrecognizedclientexception", "invalidsignatureexception", "expiredtokenexception"):
        return errors.UpstreamAuthFailed(message, **kw)
    return classify_error(status_for(info.kind, status), info, message, headers, kw)


def exception_error(code: str, payload: bytes, *, provider: str, model: str) -> errors.BrokerError:
    """An `exception` (or `error`) message inside a 200 ConverseStream."""
    info = error_info(0, {}, payload)
    info.kind = code
    status = STATUS_OF_EXCEPTION.get(code.lower(), 500)
    message = f"{provider} failed mid-stream: {code or 'exception'}: {redact(info.message) or 'no message'}"
    return classify(
        status, info, message, {}, {"provider": provider, "model": model, "upstream_status": status}
    )


# --- discovery ----------------------------------------------------------------------------------


def parse_foundation_models(doc: Any, *, provider: str) -> list[DiscoveredModel]:
    """ListFoundationModels: ACTIVE models invocable on demand (the others need a profile or
    provisioned throughput); facts are left to the catalogue (the listing has no limits)."""
    rows = doc.get("modelSummaries") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise errors.UpstreamProtocolError(
            f"{provider}: ListFoundationModels answered without modelSummaries", provider=provider
        )
    out = []
    for row in rows:
        if not isinstance(row, dict) or (name := checks.listed_model_id(row.get("modelId"))) is None:
            continue
        lifecycle = row.get("modelLifecycle")
        status = lifecycle.get("status") if isinstance(lifecycle, dict) else "ACTIVE"
        kinds = row.get("inferenceTypesSupported")
        if status not in ("ACTIVE", None) or (isinstance(kinds, list) and "ON_DEMAND" not in kinds):
            continue
        out.append(DiscoveredModel(name=name))
    return out


def parse_inference_profiles(doc: Any, *, provider: str) -> tuple[list[DiscoveredModel], str | None]:
    """One page of ListInferenceProfiles: ACTIVE profile ids (`us.anthropic...`), next token."""
    rows = doc.get("inferenceProfileSummaries") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise errors.UpstreamProtocolError(
            f"{provider}: ListInferenceProfiles answered without inferenceProfileSummaries", provider=provider
        )
    out = []
    for row in rows:
        if (
            not isinstance(row, dict)
            or (name := checks.listed_model_id(row.get("inferenceProfileId"))) is None
        ):
            continue
        if row.get("status", "ACTIVE") == "ACTIVE":
            out.append(DiscoveredModel(name=name))
    token = doc.get("nextToken")
    return out, token if isinstance(token, str) and token else None


# --- embeddings (InvokeModel) -------------------------------------------------------------------


def is_cohere(model: str) -> bool:
    return "cohere.embed" in model


def embed_body(model: str, inputs: tuple[str, ...], dimensions: int | None) -> dict[str, Any]:
    """Titan: one text per call (`inputText`, `dimensions` on v2); Cohere: `texts` in a batch."""
    if is_cohere(model):
        if dimensions is not None:
            raise errors.InvalidRequest(
                [("dimensions", f"{model} has one vector size; leave dimensions unset")]
            )
        return {"texts": list(inputs), "input_type": "search_document", "embedding_types": ["float"]}
    body: dict[str, Any] = {"inputText": inputs[0]}
    if dimensions is not None:
        if "titan-embed-text-v2" not in model:
            raise errors.InvalidRequest(
                [("dimensions", f"{model} takes no dimensions (Titan v2 does: 256, 512, 1024)")]
            )
        body["dimensions"] = dimensions
        body["normalize"] = True
    return body


def parse_embedding(doc: Any, expected: int, *, provider: str, model: str) -> EmbedResult:
    """Titan `{"embedding":[...],"inputTextTokenCount":n}`; Cohere `{"embeddings":[[...]]}` (or
    keyed by type: `{"embeddings":{"float":[[...]]}}`)."""
    if not isinstance(doc, dict):
        raise checks.protocol_error(provider, model, "the embeddings answer is not a JSON object")
    where = {"provider": provider, "model": model}
    if "embedding" in doc:
        vector = checks.vector(doc.get("embedding"), field="embedding", **where)
        reported = doc.get("inputTextTokenCount") is not None
        tokens = checks.count(doc.get("inputTextTokenCount"), field="inputTextTokenCount", **where)
        return EmbedResult((vector,), tokens, reported)
    rows = doc.get("embeddings")
    if isinstance(rows, dict):
        rows = rows.get("float")
    if not isinstance(rows, list) or len(rows) != expected:
        raise checks.protocol_error(provider, model, f"asked for {expected} embeddings, got {_count(rows)}")
    vectors = tuple(checks.vector(r, field=f"embeddings[{i}]", **where) for i, r in enumerate(rows))
    return EmbedResult(vectors, 0, False)


def _count(rows: Any) -> str:
    return str(len(rows)) if isinstance(rows, list) else json.dumps(type(rows).__name__)
