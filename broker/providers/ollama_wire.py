"""Ollama native API <-> neutral types: pure mapping, no I/O.

`build_body` turns a CompletionRequest into a `POST /api/chat` body; `ChatStreamParser` turns
the NDJSON lines of the answer into neutral events; `parse_error_body`, `parse_tags` and
`parse_show` read the error, listing and model-detail documents. Field rules are in
PROTOCOLS.md section C and PROTOCOLS-2026.md 1.3, 2.3.

Reasoning: an effort is `think: "low" | "medium" | "high"` (minimal is low), off is
`think: false`; Ollama has no token budget. The answer's `message.thinking` is one reasoning
block (index 0), and a ReasoningPart sent back in history goes back as the assistant
message's `thinking`. A JSON-schema format is `format: <schema>` (Ollama constrains the
output to it; the docs advise putting the schema in the prompt too). Left out, by what
Ollama has: strict tools (no such field: the tool is sent without it), documents
(InvalidRequest), cache breakpoints (Ollama reuses its KV prefix by itself), request
metadata and refusals (none on this API).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from broker import errors
from broker.providers import checks
from broker.providers.base import UpstreamErrorInfo, classify_error
from broker.providers.options import merge_options
from broker.redact import redact
from broker.types import (
    Capability,
    CompletionEvent,
    CompletionRequest,
    DiscoveredModel,
    DocumentPart,
    EmbedResult,
    EndEvent,
    FinishReason,
    ImagePart,
    Message,
    ReasoningConfig,
    ReasoningDeltaEvent,
    ReasoningEffort,
    ResponseFormat,
    Role,
    TextDeltaEvent,
    ToolCallDeltaEvent,
    ToolChoiceMode,
    Usage,
)

Json = dict[str, Any]

# Ollama's levels (it also takes "max", which the neutral efforts do not reach).
_THINK_LEVEL = {
    ReasoningEffort.MINIMAL: "low",
    ReasoningEffort.LOW: "low",
    ReasoningEffort.MEDIUM: "medium",
    ReasoningEffort.HIGH: "high",
}

# --- request ---------------------------------------------------------------------------------


def build_body(request: CompletionRequest) -> Json:
    """The /api/chat body for `request` (always streamed). Raises errors.InvalidRequest."""
    # Ollama's tool message carries the tool's name, not the call id: remember which call
    # id belongs to which name so a tool result can say which tool produced it.
    names_by_call_id = {c.id: c.name for m in request.messages for c in m.tool_calls if c.id}
    body: Json = {
        "model": request.model,
        "messages": [_message(m, i, names_by_call_id) for i, m in enumerate(request.messages)],
        "stream": True,
    }
    tools = _tools(request)
    if tools:
        body["tools"] = tools
    p = request.params
    if p.response_format == ResponseFormat.JSON:
        body["format"] = "json"
    elif p.response_format == ResponseFormat.JSON_SCHEMA:
        if p.json_schema is None:
            raise errors.InvalidRequest(
                [("params.json_schema", "is required with response_format RESPONSE_FORMAT_JSON_SCHEMA")]
            )
        body["format"] = p.json_schema.schema
    if p.reasoning is not None and (think := _think(p.reasoning)) is not None:
        body["think"] = think
    options = _options(request)
    if options:
        body["options"] = options
    # Last, into the finished body: `{"options": {"num_ctx": 8192}}` adds to the options;
    # a format or think the broker set is the request's own and may not be replaced.
    reserved = {"tools", *(k for k in ("format", "think") if k in body)}
    return merge_options(
        body, request.provider_options, provider_type=request.provider_type or "ollama", reserved=reserved
    )


def _think(r: ReasoningConfig) -> bool | str | None:
    if r.disabled:
        return False
    if r.budget_tokens is not None:
        raise errors.InvalidRequest(
            [
                (
                    "params.reasoning.budget_tokens",
                    "Ollama takes a reasoning effort (low, medium, high) or off, not a token budget",
                )
            ]
        )
    return _THINK_LEVEL[r.effort] if r.effort is not None else None


def _message(msg: Message, i: int, names_by_call_id: Mapping[str, str]) -> Json:
    out: Json = {"role": msg.role.value, "content": msg.text()}
    for j, part in enumerate(msg.content):
        if isinstance(part, DocumentPart):
            raise errors.InvalidRequest(
                [
                    (
                        f"messages[{i}].content[{j}].document",
                        "Ollama takes no documents; send the text (or page images) instead",
                    )
                ]
            )
    # Only this type's reasoning reaches here (CompletionCall.upstream drops foreign parts).
    thinking = "".join(p.text for p in msg.reasoning())
    if thinking:
        out["thinking"] = thinking
    images = [
        _image_base64(part, f"messages[{i}].content[{j}].image")
        for j, part in enumerate(msg.content)
        if isinstance(part, ImagePart)
    ]
    if images:
        out["images"] = images
    if msg.role == Role.ASSISTANT and msg.tool_calls:
        calls: list[Json] = []
        for k, call in enumerate(msg.tool_calls):
            entry: Json = {"function": {"name": call.name, "arguments": _arguments(call.arguments, i, k)}}
            if call.id:
                entry["id"] = call.id  # newer Ollama keeps ids; older ones ignore unknown fields
            calls.append(entry)
        out["tool_calls"] = calls
    if msg.role == Role.TOOL:
        name = names_by_call_id.get(msg.tool_call_id)
        if name:
            out["tool_name"] = name
        if msg.tool_call_id:
            out["tool_call_id"] = msg.tool_call_id
    return out


def _image_base64(part: ImagePart, where: str) -> str:
    if part.data is not None:
        # Ollama wants raw base64 with no data: prefix; it sniffs the format itself.
        return base64.b64encode(part.data).decode("ascii")
    if part.url and part.url.startswith("data:"):
        # A data: URL is inline bytes in disguise, so it can still be sent.
        head, sep, data = part.url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise errors.InvalidRequest(
                [(f"{where}.url", "a data: URL must be data:<media type>;base64,<data>")]
            )
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise errors.InvalidRequest([(f"{where}.url", "the data: URL is not valid base64")]) from None
        return data
    if part.url:
        raise errors.InvalidRequest(
            [
                (
                    f"{where}.url",
                    "Ollama cannot fetch images by URL; it needs inline image bytes (or a data: URL)",
                )
            ]
        )
    raise errors.InvalidRequest([(where, "an image needs bytes or a URL")])


def _arguments(arguments: str, i: int, k: int) -> dict[str, Any]:
    return checks.tool_arguments(arguments, i, k, vendor_says="Ollama's tool arguments are an object")


def _tools(request: CompletionRequest) -> list[Json]:
    choice = request.tool_choice
    # Ollama has no tool_choice. "none" is honoured by not offering tools at all, and "this
    # tool" by offering only that one; "required" cannot be enforced and stays best effort.
    if choice.mode == ToolChoiceMode.NONE:
        return []
    tools = request.tools
    if choice.mode == ToolChoiceMode.TOOL and choice.tool_name:
        tools = [t for t in tools if t.name == choice.tool_name]
        if not tools:
            raise errors.InvalidRequest(
                [("tool_choice.tool_name", f"{choice.tool_name!r} is not one of the request's tools")]
            )
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                # An empty schema is not an object schema; models handle "no parameters" better.
                "parameters": t.parameters or {"type": "object", "properties": {}},
            },
        }
        for t in tools
    ]


def _options(request: CompletionRequest) -> Json:
    p = request.params
    options: Json = {}
    if p.temperature is not None:
        options["temperature"] = p.temperature
    if p.top_p is not None:
        options["top_p"] = p.top_p
    # The caller's limit, else the provider's configured default_max_tokens, else none.
    limit = request.output_limit(None)
    if limit is not None:
        options["num_predict"] = limit
    if p.stop:
        options["stop"] = list(p.stop)
    if p.seed is not None:
        options["seed"] = p.seed
    return options


# --- streamed answer -------------------------------------------------------------------------

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


class ChatStreamParser:
    """NDJSON lines of /api/chat -> neutral deltas and one EndEvent. Raises BrokerError.

    Ollama sends each tool call whole (arguments as an object) in one line, so every call
    becomes a single ToolCallDeltaEvent with the full arguments JSON text. `done` says whether
    the final `"done": true` line arrived, so a body that just stops can be told apart.
    """

    def __init__(self, *, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        self.done = False
        self._tool_calls = 0

    def feed(self, line: str) -> list[CompletionEvent]:
        if not line.strip() or self.done:
            return []
        doc = checks.decode_json(line, provider=self.provider, model=self.model, what="the /api/chat stream")
        if not isinstance(doc, dict):
            raise errors.UpstreamProtocolError(
                f"{self.provider}: /api/chat line is {type(doc).__name__}, not an object: {redact(line[:65536])[:200]!r}",
                provider=self.provider,
                model=self.model,
            )
        if "error" in doc:
            raise stream_error(
                _error_text(doc["error"]),
                provider=self.provider,
                model=self.model,
                status=_stated_status(doc),
            )
        events: list[CompletionEvent] = []
        message = doc.get("message")
        if isinstance(message, dict):
            # Ollama streams `thinking` before the content of the same answer.
            thinking = message.get("thinking")
            if isinstance(thinking, str) and thinking:
                events.append(ReasoningDeltaEvent(0, text=thinking))
            if content := message.get("content"):
                events.append(TextDeltaEvent(str(content)))
            calls = message.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    events.append(self._tool_call(call))
        if doc.get("done"):
            self.done = True
            finish = _FINISH.get(str(doc.get("done_reason") or "stop"), FinishReason.OTHER)
            if finish == FinishReason.STOP and self._tool_calls:
                finish = FinishReason.TOOL_CALLS  # Ollama says "stop" after calling tools
            # Metric fields are omitempty: a missing count is 0, but with neither count the
            # server reported no usage (an old or proxied build), and zeros are not counts.
            usage = Usage(
                input_tokens=self._count(doc, "prompt_eval_count"),
                output_tokens=self._count(doc, "eval_count"),
            )
            reported = "prompt_eval_count" in doc or "eval_count" in doc
            events.append(EndEvent(finish, usage, usage_reported=reported))
        return events

    def _count(self, doc: Mapping[str, Any], key: str) -> int:
        # An integer in range, else not the protocol (absent or null: 0).
        return checks.count(doc.get(key), field=key, provider=self.provider, model=self.model)

    def _tool_call(self, call: Mapping[str, Any]) -> ToolCallDeltaEvent:
        index = self._tool_calls
        if index >= checks.MAX_TOOL_CALLS:
            raise checks.protocol_error(
                self.provider, self.model, f"more than {checks.MAX_TOOL_CALLS} tool calls"
            )
        self._tool_calls += 1
        function = call.get("function") or {}
        if not isinstance(function, Mapping):
            raise checks.protocol_error(self.provider, self.model, "a tool call's function is not an object")
        args = function.get("arguments")
        # Arguments are an object on the wire; the neutral form is JSON text.
        text = (
            args
            if isinstance(args, str)
            else json.dumps(args if args is not None else {}, ensure_ascii=False)
        )
        # Older Ollama sends no id; a synthesized one lets the caller's tool result refer to it.
        where = {"provider": self.provider, "model": self.model}
        return ToolCallDeltaEvent(
            index=index,
            id=checks.text(
                call.get("id") or f"call_{index}",
                field="a tool call id",
                limit=checks.MAX_TOOL_CALL_ID_CHARS,
                **where,
            ),
            name=checks.text(
                function.get("name") or "",
                field="a tool call name",
                limit=checks.MAX_TOOL_NAME_CHARS,
                **where,
            ),
            arguments_delta=text,
        )


def status_for_message(text: str) -> int:
    """The HTTP status an Ollama error text would come with, for errors sent after the 200."""
    low = text.lower()
    if "not found" in low and "model" in low:
        return 404
    if "does not support" in low or "context length" in low or "too long" in low:
        return 400
    if "timed out" in low or "timeout" in low:
        return 504
    return 500


def _error_text(err: Any) -> str:
    """`"error": "text"`, or an OpenAI-style object from a proxy in front of Ollama."""
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])
    return str(err)


def _stated_status(doc: Mapping[str, Any]) -> int | None:
    """An HTTP status the error line states itself (`status_code`, or inside an error object)."""
    err = doc.get("error")
    for where in (doc, err if isinstance(err, dict) else {}):
        for key in ("status_code", "status", "code"):
            value = where.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
                return value
    if isinstance(err, dict) and "invalid_request" in str(err.get("type") or ""):
        return 400
    return None


def stream_error(text: str, *, provider: str, model: str, status: int | None = None) -> errors.BrokerError:
    """A `{"error": ...}` line mid-stream: classified like the HTTP error it would have been
    (the status the line states, else the one Ollama's wording implies)."""
    if status is None:
        status = status_for_message(text)
    info = UpstreamErrorInfo(message=text)
    message = f"{provider} failed mid-stream: {text or 'no message'}"
    return classify_error(status, info, message, {}, {"provider": provider, "model": model})


def parse_error_body(body: bytes) -> UpstreamErrorInfo:
    """`{"error": "..."}`, or whatever text came (Go's router answers `404 page not found`)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        # orjson: no NaN, no lone surrogates (which no proto string could carry), bounded depth.
        doc = orjson.loads(text)
    except ValueError:
        return UpstreamErrorInfo(message=text[:500])
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return UpstreamErrorInfo(message=doc["error"])
    return UpstreamErrorInfo(message=text[:500])


def is_missing_model(message: str) -> bool:
    """Ollama's "not pulled" texts: `model 'x' not found` and `model "x" not found, try pulling it first`."""
    low = message.lower()
    return low.startswith("model") and "not found" in low


# --- discovery -------------------------------------------------------------------------------


def model_name(name: str) -> str:
    # Ollama treats "llama3.2" and "llama3.2:latest" as one model; callers type the short form.
    return name.removesuffix(":latest")


@dataclass(slots=True, frozen=True)
class ListedModel:
    """What Ollama said about one model: raw capability strings (None: not said), context."""

    name: str
    capabilities: tuple[str, ...] | None = None
    context_length: int | None = None

    def merged(self, other: ListedModel) -> ListedModel:
        """`other` (from /api/show) wins where it knows something."""
        return ListedModel(
            self.name,
            other.capabilities if other.capabilities is not None else self.capabilities,
            other.context_length or self.context_length,
        )

    @property
    def can_chat(self) -> bool:
        # Embedding-only models list no "completion"; /api/chat would refuse them.
        return self.capabilities is None or "completion" in self.capabilities

    def discovered(self) -> DiscoveredModel:
        caps: frozenset[Capability] | None = None
        if self.capabilities is not None:
            # `format: "json"` and `format: <schema>` work with every chat model (the output is
            # constrained by a grammar, not by the model's training).
            found = {Capability.JSON_MODE, Capability.STRUCTURED_OUTPUTS}
            if "thinking" in self.capabilities:
                found.add(Capability.REASONING)
            if "vision" in self.capabilities:
                found.add(Capability.VISION)
            if "tools" in self.capabilities:
                found.add(Capability.TOOLS)
            caps = frozenset(found)
        return DiscoveredModel(name=self.name, capabilities=caps, context_window=self.context_length)


def parse_tags(doc: Any, *, provider: str) -> list[ListedModel]:
    """GET /api/tags -> models, with what newer builds put in the listing itself."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models") or [], list):
        raise errors.UpstreamProtocolError(
            f'{provider}: /api/tags did not answer {{"models": [...]}}', provider=provider
        )
    out: list[ListedModel] = []
    for entry in doc.get("models") or []:
        if not isinstance(entry, dict):
            continue
        name = checks.listed_model_id(entry.get("name") or entry.get("model"))
        if name is None:  # none, or one no caller could send (too long, not text)
            continue
        details = entry.get("details")
        ctx = details.get("context_length") if isinstance(details, dict) else None
        out.append(ListedModel(model_name(name), _strings(entry.get("capabilities")), _positive(ctx)))
    return out


def parse_show(name: str, doc: Any) -> ListedModel:
    """POST /api/show -> capabilities and the context length from model_info."""
    if not isinstance(doc, dict):
        return ListedModel(name)
    info = doc.get("model_info")
    ctx = None
    if isinstance(info, dict) and isinstance(arch := info.get("general.architecture"), str):
        ctx = _positive(info.get(f"{arch}.context_length"))
    return ListedModel(name, _strings(doc.get("capabilities")), ctx)


def _strings(value: Any) -> tuple[str, ...] | None:
    return tuple(str(v) for v in value) if isinstance(value, list) else None


def _positive(value: Any) -> int | None:
    return checks.listed_tokens(value)


# --- embeddings: POST /api/embed (PROTOCOLS-2026.md 7.2) -------------------------------------


def build_embed_body(model: str, inputs: tuple[str, ...], dimensions: int | None) -> Json:
    body: Json = {"model": model, "input": list(inputs)}
    if dimensions is not None:
        body["dimensions"] = dimensions
    return body


def parse_embed(doc: Any, expected: int, *, provider: str, model: str) -> EmbedResult:
    """`{"embeddings":[[...],...],"prompt_eval_count":n}`: vectors in input order, tokens summed."""
    vectors = doc.get("embeddings") if isinstance(doc, dict) else None
    if not isinstance(vectors, list):
        raise checks.protocol_error(provider, model, "the /api/embed answer has no embeddings list")
    if len(vectors) != expected:
        raise checks.protocol_error(provider, model, f"asked for {expected} embeddings, got {len(vectors)}")
    out = tuple(
        checks.vector(v, field=f"embeddings[{i}]", provider=provider, model=model)
        for i, v in enumerate(vectors)
    )
    assert isinstance(doc, dict)
    count = doc.get("prompt_eval_count")
    tokens = checks.count(count, field="prompt_eval_count", provider=provider, model=model)
    return EmbedResult(out, tokens, count is not None)
