"""Proto <-> neutral types (broker/types.py), validating on the way in; only the servicer uses it.

Every problem in a request becomes one field violation with the proto field path
(`messages[2].content[0].image.media_type`), and all of them are reported at once, so a
caller fixes a request in one round trip. Nothing here knows a provider.

Every field is bounded (the LIMITS table; README "Request limits"): sizes of strings and
lists, a tool schema's size and depth, numbers finite and in range, enums known. A caller's
own string is never echoed whole (errors.bound). Also here: ListModels paging and the
bounded SelectModel answer, so no response can pass the gRPC message limit.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from google.protobuf import struct_pb2

from broker import convert_features as features
from broker import errors
from broker.types import (
    Capability,
    CompletionCall,
    ContentPart,
    Cost,
    EmbedCall,
    Embedded,
    FinishReason,
    GenerationParams,
    ImagePart,
    Message,
    ModelSpec,
    Output,
    ReasoningDeltaEvent,
    ReasoningPart,
    Refusal,
    Requirements,
    ResponseFormat,
    Role,
    Started,
    TextDeltaEvent,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDeltaEvent,
    ToolChoice,
    ToolChoiceMode,
    Usage,
)
from modelbroker.v1 import broker_pb2 as pb

if TYPE_CHECKING:
    from broker.completion import Accumulated
    from broker.state import WindowUsage
    from broker.state.usage import UsageReport

IMAGE_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# fullmatch, never `$`: "f\n" would match `^...$` (`$` also matches before a final newline).
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# C0 controls and DEL: never part of a model id, provider name or tool-call id.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# --- limits (README "Request limits"; each is checked, a violation names the field) ---------
MAX_MODEL_CHARS = 256  # model, fallback_models[], GetModel.model
MAX_FALLBACK_MODELS = 8
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256  # per message
MAX_URL_CHARS = 8192  # an http(s) image URL (data: URLs count against the message size)
MAX_TOOL_CALLS_PER_MESSAGE = 128
MAX_ID_CHARS = 256  # tool_calls[].id, tool_call_id
MAX_TOOL_CALL_NAME_CHARS = 256  # a call in history, as the model named it
MAX_TOOLS = 128
MAX_TOOL_DESCRIPTION_CHARS = 16 * 1024
MAX_TOOL_SCHEMA_BYTES = 64 * 1024  # one tool's parameters, as JSON
MAX_SCHEMA_DEPTH = 32  # objects and arrays nested in one tool's parameters
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1024
MAX_OUTPUT_TOKENS = 1 << 24  # params.max_tokens
MAX_TOKEN_FIGURE = 2**53  # requirements.min_context_window and price ceilings
MAX_PROVIDER_NAMES = 64  # requirements.allow_providers / exclude_providers
MAX_PROVIDER_CHARS = 128
MAX_CAPABILITIES = 16
MAX_EMBED_INPUTS = 2048  # EmbedRequest.inputs (OpenAI's own per-call limit)
MAX_EMBED_INPUT_BYTES = 1024 * 1024  # one input, UTF-8
MAX_EMBED_DIMENSIONS = 65536
# ListModels: models per page by default and at most; a page also stops before MAX_PAGE_BYTES.
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 1000
MAX_PAGE_BYTES = 1024 * 1024
MAX_PAGE_TOKEN_CHARS = 256
# SelectModel: alternatives and exclusions listed at most (the rest are counted).
MAX_SELECT_LISTED = 100
# Violations one tool schema may add (a schema full of NaNs is one problem, many times).
_MAX_SCHEMA_VIOLATIONS = 5

_ROLES = {
    pb.ROLE_SYSTEM: Role.SYSTEM,
    pb.ROLE_USER: Role.USER,
    pb.ROLE_ASSISTANT: Role.ASSISTANT,
    pb.ROLE_TOOL: Role.TOOL,
}
_TOOL_CHOICE = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoiceMode.DEFAULT,
    pb.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    pb.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    pb.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    pb.TOOL_CHOICE_MODE_TOOL: ToolChoiceMode.TOOL,
}
_RESPONSE_FORMAT = {
    pb.RESPONSE_FORMAT_UNSPECIFIED: ResponseFormat.DEFAULT,
    pb.RESPONSE_FORMAT_TEXT: ResponseFormat.TEXT,
    pb.RESPONSE_FORMAT_JSON: ResponseFormat.JSON,
    pb.RESPONSE_FORMAT_JSON_SCHEMA: ResponseFormat.JSON_SCHEMA,
}
CAPABILITY_FROM_PB = {
    pb.CAPABILITY_VISION: Capability.VISION,
    pb.CAPABILITY_TOOLS: Capability.TOOLS,
    pb.CAPABILITY_JSON_MODE: Capability.JSON_MODE,
    pb.CAPABILITY_REASONING: Capability.REASONING,
    pb.CAPABILITY_STRUCTURED_OUTPUTS: Capability.STRUCTURED_OUTPUTS,
    pb.CAPABILITY_DOCUMENTS: Capability.DOCUMENTS,
}
CAPABILITY_TO_PB = {v: k for k, v in CAPABILITY_FROM_PB.items()}
FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
    FinishReason.OTHER: pb.FINISH_REASON_OTHER,
    FinishReason.REFUSAL: pb.FINISH_REASON_REFUSAL,
}
_PREFERENCES = {
    pb.PREFERENCE_UNSPECIFIED: "priority",
    pb.PREFERENCE_PRIORITY: "priority",
    pb.PREFERENCE_CHEAPEST: "cheapest",
    pb.PREFERENCE_FASTEST: "fastest",
}


def completion_from_proto(
    req: pb.CompleteRequest | pb.StreamCompleteRequest, *, max_message_bytes: int
) -> CompletionCall:
    v: list[tuple[str, str]] = []
    requirements = requirements_from_proto(req.requirements, "requirements", v)
    model = req.model.strip()
    if not model and requirements.is_empty():
        v.append(
            (
                "model",
                "required: give 'provider/model', a model id or an alias (or requirements to select one)",
            )
        )
    elif model:
        _model_ref(req.model, "model", v)
    if not req.messages:
        v.append(("messages", "at least one message is required"))
    elif len(req.messages) > MAX_MESSAGES:
        v.append(("messages", f"at most {MAX_MESSAGES} messages, got {len(req.messages)}"))
    messages = [
        _message(m, f"messages[{i}]", v, max_message_bytes) for i, m in enumerate(req.messages[:MAX_MESSAGES])
    ]
    tools = _tools(req, v)
    tool_choice = _tool_choice(req, {t.name for t in tools}, v)
    params = params_from_proto(req.params, v) if req.HasField("params") else GenerationParams()
    features.check_breakpoints(messages, tools, v)
    metadata = features.metadata(req.metadata, v)
    options = features.provider_options(req.provider_options, v, schema_from_proto)
    _fallbacks(req.fallback_models, v)
    if requirements.min_dimensions or requirements.kind == "embedding":
        v.append(("requirements", "min_dimensions and kind EMBEDDING select embedding models: use Embed"))
    if v:
        raise errors.InvalidRequest(v)
    return CompletionCall(
        model=model,
        messages=messages,
        tools=tools,
        tool_choice=tool_choice,
        params=params,
        metadata=metadata,
        provider_options=options,
        requirements=requirements,
        fallback_models=[f.strip() for f in req.fallback_models],
    )


def embed_from_proto(req: pb.EmbedRequest, *, max_message_bytes: int) -> EmbedCall:
    """An EmbedRequest checked and bounded: a model, 1-2048 non-empty inputs of at most 1 MiB
    each and `max_message_bytes` together, dimensions 1-65536 when set."""
    v: list[tuple[str, str]] = []
    requirements = requirements_from_proto(req.requirements, "requirements", v)
    if requirements.capabilities or requirements.min_context_window:
        v.append(
            ("requirements", "capabilities and min_context_window are for completions; use min_dimensions")
        )
    if requirements.kind == "chat":
        v.append(("requirements.kind", "Embed selects embedding models: leave kind unset or EMBEDDING"))
    if not req.model.strip() and not req.HasField("requirements"):
        v.append(
            (
                "model",
                "required: name an embedding model (ListModels with kind MODEL_KIND_EMBEDDING), "
                "or give requirements (min_dimensions) to select one",
            )
        )
    elif req.model.strip():
        _model_ref(req.model, "model", v)
    n = len(req.inputs)
    if n == 0:
        v.append(("inputs", "at least one input is required"))
    elif n > MAX_EMBED_INPUTS:
        v.append(("inputs", f"at most {MAX_EMBED_INPUTS} inputs, got {n}"))
    total = 0
    for i, text in enumerate(req.inputs[:MAX_EMBED_INPUTS]):
        size = len(text.encode("utf-8", "surrogatepass"))
        total += size
        if not text.strip():
            v.append((f"inputs[{i}]", "must not be empty"))
        elif size > MAX_EMBED_INPUT_BYTES:
            v.append((f"inputs[{i}]", f"at most {MAX_EMBED_INPUT_BYTES} bytes, got {size}"))
    if total > max_message_bytes:
        v.append(
            ("inputs", f"{total} bytes together, over the server's {max_message_bytes}-byte message limit")
        )
    if req.HasField("dimensions") and not 1 <= req.dimensions <= MAX_EMBED_DIMENSIONS:
        v.append(("dimensions", f"must be 1 to {MAX_EMBED_DIMENSIONS}, got {req.dimensions}"))
    _fallbacks(req.fallback_models, v)
    if v:
        raise errors.InvalidRequest(v)
    return EmbedCall(
        model=req.model.strip(),
        inputs=tuple(req.inputs),
        dimensions=req.dimensions if req.HasField("dimensions") else None,
        fallback_models=tuple(f.strip() for f in req.fallback_models),
        requirements=requirements,
    )


def embed_response(out: Embedded, *, max_bytes: int) -> pb.EmbedResponse:
    """The Embed answer: one Embedding per input, in input order; RESPONSE_TOO_LARGE past `max_bytes`."""
    resp = pb.EmbedResponse(
        request_id=out.request_id,
        model=out.model,
        provider=out.provider,
        usage=usage_to_proto(out.usage),
        cost=cost_to_proto(out.cost),
    )
    size = sum(len(vec) for vec in out.vectors) * 4 + 16 * len(out.vectors)
    if size > max_bytes:
        raise errors.ResponseTooLarge(
            f"{len(out.vectors)} vectors of {len(out.vectors[0]) if out.vectors else 0} dimensions are "
            f"about {size} bytes, over the server's {max_bytes}-byte message limit: send fewer inputs "
            "per call or ask for fewer dimensions",
            provider=out.provider,
            model=out.model,
        )
    for i, vec in enumerate(out.vectors):
        resp.embeddings.add(index=i, values=vec)
    return resp


def _fallbacks(refs: Sequence[str], v: list[tuple[str, str]]) -> None:
    """`fallback_models` of a completion or an embedding: bounded in number, each a model ref."""
    if len(refs) > MAX_FALLBACK_MODELS:
        v.append(("fallback_models", f"at most {MAX_FALLBACK_MODELS} fallback models, got {len(refs)}"))
    for i, fb in enumerate(refs[:MAX_FALLBACK_MODELS]):
        if not fb.strip():
            v.append((f"fallback_models[{i}]", "must not be empty"))
        else:
            _model_ref(fb, f"fallback_models[{i}]", v)


def _model_ref(ref: str, path: str, v: list[tuple[str, str]]) -> None:
    """A model reference: at most MAX_MODEL_CHARS, no control characters."""
    ref = ref.strip()
    if len(ref) > MAX_MODEL_CHARS:
        v.append((path, f"at most {MAX_MODEL_CHARS} characters, got {len(ref)}"))
    elif _CONTROL.search(ref):
        v.append((path, "must not contain control characters"))


def model_ref_from_proto(ref: str, path: str = "model") -> str:
    """GetModel's `model`, validated like a completion's: stripped, required, bounded."""
    v: list[tuple[str, str]] = []
    if not ref.strip():
        v.append((path, "required"))
    else:
        _model_ref(ref, path, v)
    if v:
        raise errors.InvalidRequest(v)
    return ref.strip()


def _id(
    value: str, path: str, v: list[tuple[str, str]], *, required: bool, limit: int = MAX_ID_CHARS
) -> None:
    if not value:
        if required:
            v.append((path, "required"))
    elif len(value) > limit:
        v.append((path, f"at most {limit} characters, got {len(value)}"))
    elif _CONTROL.search(value):
        v.append((path, "must not contain control characters"))


def _message(m: pb.Message, path: str, v: list[tuple[str, str]], max_bytes: int) -> Message:
    role = _ROLES.get(m.role)
    if role is None:
        v.append(
            (f"{path}.role", f"must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL, got {m.role}")
        )
        role = Role.USER
    parts: list[ContentPart] = []
    size = 0
    if len(m.content) > MAX_CONTENT_PARTS:
        v.append((f"{path}.content", f"at most {MAX_CONTENT_PARTS} parts, got {len(m.content)}"))
    for j, part in enumerate(m.content[:MAX_CONTENT_PARTS]):
        ppath = f"{path}.content[{j}]"
        kind = part.WhichOneof("part")
        cache = features.cache_mark(part, ppath, v)
        if kind == "text":
            text_part = TextPart(part.text, cache)
            features.empty_text_breakpoints(text_part, ppath, v)
            parts.append(text_part)
            size += _utf8_len(part.text)
        elif kind == "image":
            if role in (Role.SYSTEM, Role.TOOL):
                v.append(
                    (f"{ppath}.image", f"images are only allowed in user and assistant messages, not {role}")
                )
            image = _image(part.image, f"{ppath}.image", v)
            parts.append(replace(image, cache=cache) if cache is not None else image)
            size += len(part.image.data) + len(part.image.url)
        elif kind == "document":
            if role is not Role.USER:
                v.append((f"{ppath}.document", f"documents are only allowed in user messages, not {role}"))
            parts.append(features.document(part.document, f"{ppath}.document", v, cache))
            size += len(part.document.data) + len(part.document.url)
        elif kind == "reasoning":
            if cache is not None:
                v.append((f"{ppath}.cache_control", "reasoning parts cannot carry a cache breakpoint"))
            parts.append(
                features.reasoning_part(
                    part.reasoning, f"{ppath}.reasoning", v, assistant=role is Role.ASSISTANT
                )
            )
            size += features.reasoning_size(part.reasoning)
        else:
            v.append((ppath, "set text, image, document or reasoning"))
    calls = []
    if len(m.tool_calls) > MAX_TOOL_CALLS_PER_MESSAGE:
        v.append(
            (
                f"{path}.tool_calls",
                f"at most {MAX_TOOL_CALLS_PER_MESSAGE} tool calls, got {len(m.tool_calls)}",
            )
        )
    for j, tc in enumerate(m.tool_calls[:MAX_TOOL_CALLS_PER_MESSAGE]):
        if role is not Role.ASSISTANT:
            v.append((f"{path}.tool_calls", "only assistant messages carry tool calls"))
            break
        _id(tc.id, f"{path}.tool_calls[{j}].id", v, required=True)
        _id(tc.name, f"{path}.tool_calls[{j}].name", v, required=True, limit=MAX_TOOL_CALL_NAME_CHARS)
        size += _utf8_len(tc.arguments) + len(tc.id) + len(tc.name)
        calls.append(ToolCall(id=tc.id, name=tc.name, arguments=tc.arguments or "{}"))
    if size > max_bytes:
        v.append((f"{path}.content", f"{size} bytes exceeds the limit of {max_bytes} bytes per message"))
    if role is Role.TOOL and not m.tool_call_id:
        v.append((f"{path}.tool_call_id", "required for ROLE_TOOL messages: the id of the call this answers"))
    else:
        _id(m.tool_call_id, f"{path}.tool_call_id", v, required=False)
    if not parts and not calls and role is not Role.ASSISTANT:
        # An empty assistant turn is history as it happened (a model that said nothing):
        # passed on (OpenAI takes it; the Anthropic mapping leaves it out).
        v.append((f"{path}.content", "must not be empty"))
    return Message(
        role=role, content=parts, tool_calls=calls, tool_call_id=m.tool_call_id, is_error=m.is_error
    )


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _image(img: pb.Image, path: str, v: list[tuple[str, str]]) -> ImagePart:
    src = img.WhichOneof("source")
    if src == "data":
        if not img.data:
            v.append((f"{path}.data", "must not be empty"))
        if img.media_type not in IMAGE_MEDIA_TYPES:
            v.append((f"{path}.media_type", f"must be one of {', '.join(sorted(IMAGE_MEDIA_TYPES))}"))
        return ImagePart(data=img.data, media_type=img.media_type)
    if src == "url":
        if not img.url.startswith(("https://", "http://", "data:image/")):
            v.append((f"{path}.url", "must be an http(s) URL or a data:image/... URL"))
        elif not img.url.startswith("data:") and len(img.url) > MAX_URL_CHARS:
            v.append((f"{path}.url", f"at most {MAX_URL_CHARS} characters, got {len(img.url)}"))
        elif _CONTROL.search(img.url) and not img.url.startswith("data:"):
            v.append((f"{path}.url", "must not contain control characters"))
        if img.media_type and img.media_type not in IMAGE_MEDIA_TYPES:
            v.append((f"{path}.media_type", f"must be one of {', '.join(sorted(IMAGE_MEDIA_TYPES))}"))
        return ImagePart(url=img.url, media_type=img.media_type)
    v.append((path, "set data or url"))
    return ImagePart()


def _tools(req: pb.CompleteRequest | pb.StreamCompleteRequest, v: list[tuple[str, str]]) -> list[Tool]:
    tools: list[Tool] = []
    seen: set[str] = set()
    if len(req.tools) > MAX_TOOLS:
        v.append(("tools", f"at most {MAX_TOOLS} tools, got {len(req.tools)}"))
    for i, t in enumerate(req.tools[:MAX_TOOLS]):
        if not _TOOL_NAME.fullmatch(t.name):
            v.append((f"tools[{i}].name", "must be 1-64 characters of letters, digits, '_' or '-'"))
        elif t.name in seen:
            v.append((f"tools[{i}].name", f"duplicate tool name {t.name!r}"))
        seen.add(t.name)
        if len(t.description) > MAX_TOOL_DESCRIPTION_CHARS:
            v.append(
                (
                    f"tools[{i}].description",
                    f"at most {MAX_TOOL_DESCRIPTION_CHARS} characters, got {len(t.description)}",
                )
            )
        if t.HasField("parameters"):
            params = schema_from_proto(t.parameters, f"tools[{i}].parameters", v)
        else:
            params = {"type": "object", "properties": {}}
        if params.get("type", "object") != "object":
            v.append((f"tools[{i}].parameters", "must be a JSON Schema of type object"))
        features.tool_strict(t, params, f"tools[{i}]", v)
        cache = features.cache_mark(t, f"tools[{i}]", v)
        tools.append(
            Tool(name=t.name, description=t.description, parameters=params, strict=t.strict, cache=cache)
        )
    return tools


def key_path(path: str, key: str) -> str:
    """The path of `key` inside the JSON object at `path`: `.key`, or `["k e y"]` when the
    key is not an identifier (quoted as JSON, at most 64 characters of it)."""
    if _IDENTIFIER.fullmatch(key) and len(key) <= 64:
        return f"{path}.{key}"
    quoted = key[:64].replace("\\", "\\\\").replace('"', '\\"')
    quoted = _CONTROL.sub("?", quoted)
    return f'{path}["{quoted}{"..." if len(key) > 64 else ""}"]'


class _SchemaWalk:
    """One tool schema (a Struct) -> a JSON-ready dict, bounded: depth, size, finite numbers."""

    __slots__ = ("budget", "found", "v")

    def __init__(self, v: list[tuple[str, str]]) -> None:
        self.v = v
        self.budget = MAX_TOOL_SCHEMA_BYTES
        self.found = 0

    def problem(self, path: str, what: str) -> None:
        if self.found < _MAX_SCHEMA_VIOLATIONS:
            self.v.append((path, what))
        self.found += 1

    def struct(self, s: struct_pb2.Struct, path: str, depth: int) -> dict[str, Any]:
        if depth > MAX_SCHEMA_DEPTH:
            self.problem(path, f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
            return {}
        out: dict[str, Any] = {}
        for key in s.fields:
            self.budget -= len(key) + 4
            if self.budget < 0:
                return out
            out[key] = self.value(s.fields[key], key_path(path, key), depth)
        return out

    def value(self, val: struct_pb2.Value, path: str, depth: int) -> Any:
        kind = val.WhichOneof("kind")
        if kind == "string_value":
            self.budget -= len(val.string_value) + 2
            return val.string_value
        if kind == "number_value":
            self.budget -= 8
            number = val.number_value
            if not math.isfinite(number):
                self.problem(path, f"must be a finite number, got {number}")
            return number
        if kind == "bool_value":
            self.budget -= 5
            return val.bool_value
        if kind == "struct_value":
            return self.struct(val.struct_value, path, depth + 1)
        if kind == "list_value":
            if depth + 1 > MAX_SCHEMA_DEPTH:
                self.problem(path, f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
                return []
            items = []
            for i, item in enumerate(val.list_value.values):
                self.budget -= 1
                if self.budget < 0:
                    break
                items.append(self.value(item, f"{path}[{i}]", depth + 1))
            return items
        self.budget -= 4
        return None  # null_value, or no kind set (JSON null either way)


def schema_from_proto(s: struct_pb2.Struct, path: str, v: list[tuple[str, str]]) -> dict[str, Any]:
    """A JSON Schema Struct as a dict, checked: at most MAX_SCHEMA_DEPTH levels of objects
    and arrays, at most MAX_TOOL_SCHEMA_BYTES of JSON, no NaN or infinite number (JSON has
    none, and no upstream could parse one)."""
    walk = _SchemaWalk(v)
    out = walk.struct(s, path, 1)
    if walk.budget < 0:
        v.append((path, f"larger than {MAX_TOOL_SCHEMA_BYTES} bytes as JSON"))
    return out


def _tool_choice(
    req: pb.CompleteRequest | pb.StreamCompleteRequest, names: set[str], v: list[tuple[str, str]]
) -> ToolChoice:
    mode = _TOOL_CHOICE.get(req.tool_choice.mode)
    if mode is None:
        v.append(("tool_choice.mode", f"unknown mode {req.tool_choice.mode}"))
        return ToolChoice()
    if mode is ToolChoiceMode.TOOL and req.tool_choice.tool_name not in names:
        v.append(("tool_choice.tool_name", "must name one of the request's tools"))
    if mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.TOOL) and not names:
        v.append(("tool_choice.mode", "requires at least one tool in tools"))
    return ToolChoice(mode=mode, tool_name=req.tool_choice.tool_name)


def params_from_proto(p: pb.GenerationParams, v: list[tuple[str, str]]) -> GenerationParams:
    temperature = p.temperature if p.HasField("temperature") else None
    top_p = p.top_p if p.HasField("top_p") else None
    max_tokens = p.max_tokens if p.HasField("max_tokens") else None
    # `not a <= x <= b` is also true for NaN: every non-finite value is out of range.
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        v.append(("params.temperature", f"must be between 0 and 2, got {temperature:g}"))
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        v.append(("params.top_p", f"must be between 0 and 1, got {top_p:g}"))
    if max_tokens is not None and not 1 <= max_tokens <= MAX_OUTPUT_TOKENS:
        v.append(("params.max_tokens", f"must be between 1 and {MAX_OUTPUT_TOKENS}, got {max_tokens}"))
    if len(p.stop) > MAX_STOP_SEQUENCES:
        v.append(("params.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(p.stop)}"))
    for i, s in enumerate(p.stop[: MAX_STOP_SEQUENCES * 4]):
        if not s:
            v.append((f"params.stop[{i}]", "must not be empty"))
        elif len(s) > MAX_STOP_CHARS:
            v.append((f"params.stop[{i}]", f"at most {MAX_STOP_CHARS} characters, got {len(s)}"))
    fmt = _RESPONSE_FORMAT.get(p.response_format)
    if fmt is None:
        v.append(("params.response_format", f"unknown format {p.response_format}"))
        fmt = ResponseFormat.DEFAULT
    json_schema = None
    if p.HasField("json_schema"):
        schema = schema_from_proto(p.json_schema.schema, "params.json_schema.schema", v)
        json_schema = features.json_schema(p.json_schema, v, schema)
        if fmt is ResponseFormat.DEFAULT:
            fmt = ResponseFormat.JSON_SCHEMA
        elif fmt is not ResponseFormat.JSON_SCHEMA:
            v.append(
                ("params.response_format", "must be RESPONSE_FORMAT_JSON_SCHEMA (or unset) with json_schema")
            )
    elif fmt is ResponseFormat.JSON_SCHEMA:
        v.append(("params.json_schema", "required with RESPONSE_FORMAT_JSON_SCHEMA"))
    reasoning = features.reasoning(p.reasoning, v) if p.HasField("reasoning") else None
    return GenerationParams(
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        stop=tuple(p.stop),
        seed=p.seed if p.HasField("seed") else None,
        response_format=fmt,
        json_schema=json_schema,
        reasoning=reasoning,
    )


def requirements_from_proto(r: pb.Requirements, path: str, v: list[tuple[str, str]]) -> Requirements:
    caps: set[Capability] = set()
    if len(r.capabilities) > MAX_CAPABILITIES:
        v.append(
            (f"{path}.capabilities", f"at most {MAX_CAPABILITIES} capabilities, got {len(r.capabilities)}")
        )
    for i, c in enumerate(r.capabilities[:MAX_CAPABILITIES]):
        cap = CAPABILITY_FROM_PB.get(c)
        if cap is None:
            v.append((f"{path}.capabilities[{i}]", f"unknown capability {c}"))
        else:
            caps.add(cap)
    if not 0 <= r.min_context_window <= MAX_TOKEN_FIGURE:
        v.append((f"{path}.min_context_window", f"must be between 0 and {MAX_TOKEN_FIGURE}"))
    for name in ("max_input_price_micro_usd_per_mtok", "max_output_price_micro_usd_per_mtok"):
        if r.HasField(name) and not 0 <= getattr(r, name) <= MAX_TOKEN_FIGURE:
            v.append((f"{path}.{name}", f"must be between 0 and {MAX_TOKEN_FIGURE}"))
    for name in ("allow_providers", "exclude_providers"):
        names = getattr(r, name)
        if len(names) > MAX_PROVIDER_NAMES:
            v.append((f"{path}.{name}", f"at most {MAX_PROVIDER_NAMES} names, got {len(names)}"))
        for i, n in enumerate(names[:MAX_PROVIDER_NAMES]):
            _id(n, f"{path}.{name}[{i}]", v, required=True, limit=MAX_PROVIDER_CHARS)
    pref = _PREFERENCES.get(r.preference)
    if pref is None:
        v.append((f"{path}.preference", f"unknown preference {r.preference}"))
        pref = "priority"
    if not 0 <= r.min_dimensions <= MAX_EMBED_DIMENSIONS:
        v.append((f"{path}.min_dimensions", f"must be 0 to {MAX_EMBED_DIMENSIONS}, got {r.min_dimensions}"))
    kind = KIND_FROM_PB.get(r.kind)
    if kind is None:
        v.append((f"{path}.kind", f"unknown model kind {r.kind}"))
        kind = ""
    if r.min_dimensions and kind == "chat":
        v.append((f"{path}.min_dimensions", "applies to embedding models only (kind is CHAT)"))
    if r.min_dimensions:
        kind = "embedding"
    return Requirements(
        capabilities=frozenset(caps),
        min_context_window=r.min_context_window,
        min_dimensions=r.min_dimensions,
        kind=kind,
        max_input_price_micro_usd_per_mtok=(
            r.max_input_price_micro_usd_per_mtok if r.HasField("max_input_price_micro_usd_per_mtok") else None
        ),
        max_output_price_micro_usd_per_mtok=(
            r.max_output_price_micro_usd_per_mtok
            if r.HasField("max_output_price_micro_usd_per_mtok")
            else None
        ),
        allow_providers=tuple(r.allow_providers),
        exclude_providers=tuple(r.exclude_providers),
        preference=pref,
    )


# --- ListModels paging and the bounded SelectModel answer ------------------------------------


@dataclass(frozen=True, slots=True)
class ModelsQuery:
    """A validated ListModelsRequest: the filter and which page."""

    provider: str
    capabilities: frozenset[Capability]
    page_size: int
    offset: int
    kind: str = ""  # "chat" or "embedding"; "" all

    @property
    def fingerprint(self) -> str:
        """Ties a page token to its filter: a token sent with another filter is refused."""
        caps = ",".join(sorted(c.value for c in self.capabilities))
        kind = f"\0{self.kind}" if self.kind else ""
        return hashlib.sha256(f"{self.provider}\0{caps}{kind}".encode()).hexdigest()[:12]

    def admits(self, spec: ModelSpec) -> bool:
        """The kind filter (unknown counts as chat, as ModelInfo documents)."""
        return not self.kind or (spec.kind or "chat") == self.kind


def list_models_query(req: pb.ListModelsRequest, providers: Collection[str]) -> ModelsQuery:
    """Validate a ListModelsRequest (InvalidRequest naming each bad field)."""
    v: list[tuple[str, str]] = []
    caps = requirements_from_proto(pb.Requirements(capabilities=req.capabilities), "", v)
    v = [(f.lstrip("."), d) for f, d in v]
    if req.provider and req.provider not in providers:
        v.append(("provider", f"no provider named {errors.bound(req.provider, 64)!r}"))
    if req.page_size < 0:
        v.append(("page_size", f"must not be negative, got {req.page_size}"))
    page_size = min(req.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    kind = KIND_FROM_PB.get(req.kind)
    if kind is None:
        v.append(("kind", f"unknown model kind {req.kind}"))
    query = ModelsQuery(req.provider, caps.capabilities, max(page_size, 1), 0, kind or "")
    if req.page_token:
        offset = _page_offset(req.page_token, query.fingerprint)
        if offset is None:
            v.append(
                (
                    "page_token",
                    "not a next_page_token of a ListModels answer with this provider and capabilities",
                )
            )
        else:
            query = ModelsQuery(query.provider, query.capabilities, query.page_size, offset, query.kind)
    if v:
        raise errors.InvalidRequest(v)
    return query


def _page_token(offset: int, fingerprint: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{offset}:{fingerprint}".encode()).decode().rstrip("=")


def _page_offset(token: str, fingerprint: str) -> int | None:
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    version, _, rest = raw.partition(":")
    offset, _, fp = rest.partition(":")
    if version != "v1" or fp != fingerprint or not offset.isdigit() or len(offset) > 12:
        return None
    return int(offset)


def list_models_page(specs: Sequence[ModelSpec], query: ModelsQuery) -> pb.ListModelsResponse:
    """One page of the (filtered, permitted) listing: at most query.page_size models and
    MAX_PAGE_BYTES (at least one model), and the token of the next page when more follow.

    Pages are by position in the listing, which is stable while the providers' model lists
    are: a discovery refresh between two pages may shift a model onto the other page."""
    out = pb.ListModelsResponse()
    size = 0
    end = query.offset
    for spec in specs[query.offset : query.offset + query.page_size]:
        info = model_to_proto(spec)
        size += info.ByteSize() + 4
        if size > MAX_PAGE_BYTES and len(out.models):
            break
        out.models.append(info)
        end += 1
    if end < len(specs):
        out.next_page_token = _page_token(end, query.fingerprint)
    return out


def select_model_response(
    selected: ModelSpec, alternatives: Sequence[ModelSpec], excluded: Sequence[tuple[str, str]]
) -> pb.SelectModelResponse:
    """The SelectModel answer with at most MAX_SELECT_LISTED alternatives and exclusions (the
    best-ranked first; the rest counted in omitted_*), so it stays far below the message limit."""
    out = pb.SelectModelResponse(selected=model_to_proto(selected))
    out.alternatives.extend(model_to_proto(s) for s in alternatives[:MAX_SELECT_LISTED])
    out.excluded.extend(
        pb.ExcludedCandidate(model_id=errors.bound(m, 512), reason=errors.bound(r, 512))
        for m, r in excluded[:MAX_SELECT_LISTED]
    )
    out.omitted_alternatives = max(len(alternatives) - MAX_SELECT_LISTED, 0)
    out.omitted_excluded = max(len(excluded) - MAX_SELECT_LISTED, 0)
    return out


KIND_FROM_PB = {
    pb.MODEL_KIND_UNSPECIFIED: "",
    pb.MODEL_KIND_CHAT: "chat",
    pb.MODEL_KIND_EMBEDDING: "embedding",
}
KIND_TO_PB = {"chat": pb.MODEL_KIND_CHAT, "embedding": pb.MODEL_KIND_EMBEDDING}


# --- neutral -> proto ------------------------------------------------------------------------


def usage_to_proto(u: Usage) -> pb.Usage:
    return pb.Usage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cached_input_tokens=u.cached_input_tokens,
        cache_write_input_tokens=u.cache_write_input_tokens,
        estimated=u.estimated,
        reasoning_tokens=u.reasoning_tokens,
        cache_write_1h_input_tokens=u.cache_write_1h_input_tokens,
    )


def cost_to_proto(c: Cost) -> pb.Cost:
    return pb.Cost(
        known=c.known,
        input_micro_usd=c.input_micro_usd,
        output_micro_usd=c.output_micro_usd,
        total_micro_usd=c.total_micro_usd,
    )


def model_to_proto(spec: ModelSpec) -> pb.ModelInfo:
    info = pb.ModelInfo(
        id=spec.id,
        provider=spec.provider,
        name=spec.name,
        capabilities=sorted(CAPABILITY_TO_PB[c] for c in spec.capabilities),
        capabilities_known=spec.capabilities_known,
        context_window=spec.context_window or 0,
        max_output_tokens=spec.max_output_tokens or 0,
        source=spec.source,
        discovered=spec.discovered,
        kind=KIND_TO_PB.get(spec.kind, pb.MODEL_KIND_UNSPECIFIED),
        dimensions=spec.dimensions or 0,
    )
    if spec.pricing is not None:
        info.pricing.CopyFrom(
            pb.Pricing(
                known=True,
                input_micro_usd_per_mtok=spec.pricing.input_micro_usd_per_mtok,
                output_micro_usd_per_mtok=spec.pricing.output_micro_usd_per_mtok,
                cached_input_micro_usd_per_mtok=spec.pricing.cached_input_micro_usd_per_mtok or 0,
            )
        )
    return info


# --- completion outputs -> proto (the servicer's last step) -----------------------------------


def complete_response(acc: Accumulated) -> pb.CompleteResponse:
    """A unary answer from the accumulated stream."""
    assert acc.started is not None and acc.finished is not None
    message = pb.Message(role=pb.ROLE_ASSISTANT)
    for part in acc.parts():
        if isinstance(part, ReasoningPart):
            message.content.add(
                reasoning=pb.ReasoningPart(
                    text=part.text,
                    signature=part.signature,
                    redacted_data=part.redacted_data,
                    provider_type=part.provider_type,
                )
            )
        else:
            message.content.add(text=part.text)
    for tc in acc.calls():
        message.tool_calls.add(id=tc.id, name=tc.name, arguments=tc.arguments)
    resp = pb.CompleteResponse(
        request_id=acc.started.request_id,
        model=acc.started.model,
        provider=acc.started.provider,
        message=message,
        finish_reason=FINISH_TO_PB[acc.finished.finish_reason],
        usage=usage_to_proto(acc.finished.usage),
        cost=cost_to_proto(acc.finished.cost),
    )
    if acc.finished.refusal is not None:
        resp.refusal.CopyFrom(refusal_to_proto(acc.finished.refusal))
    return resp


def refusal_to_proto(r: Refusal) -> pb.Refusal:
    return pb.Refusal(explanation=r.explanation, category=r.category)


def stream_message(out: Output) -> pb.StreamCompleteResponse:
    """One stream message from one completion output."""
    msg = pb.StreamCompleteResponse
    if isinstance(out, TextDeltaEvent):
        return msg(text_delta=pb.TextDelta(text=out.text))
    if isinstance(out, ToolCallDeltaEvent):
        return msg(
            tool_call_delta=pb.ToolCallDelta(
                index=out.index, id=out.id, name=out.name, arguments_delta=out.arguments_delta
            )
        )
    if isinstance(out, ReasoningDeltaEvent):
        return msg(
            reasoning_delta=pb.ReasoningDelta(
                index=out.index, text=out.text, signature=out.signature, redacted_data=out.redacted_data
            )
        )
    if isinstance(out, Started):
        return msg(
            start=pb.StreamStart(
                request_id=out.request_id,
                model=out.model,
                provider=out.provider,
                provider_type=out.provider_type,
            )
        )
    end = pb.StreamEnd(
        finish_reason=FINISH_TO_PB[out.finish_reason],
        usage=usage_to_proto(out.usage),
        cost=cost_to_proto(out.cost),
    )
    if out.refusal is not None:
        end.refusal.CopyFrom(refusal_to_proto(out.refusal))
    return msg(end=end)


# --- usage (GetUsage) ---------------------------------------------------------------------------

MAX_USAGE_KEY_NAMES = 256
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}")


def usage_query(request: pb.GetUsageRequest) -> list[str]:
    """The key names asked for, each checked (a name as auth.keys spells them)."""
    names = list(request.key_names)
    v: list[tuple[str, str]] = []
    if len(names) > MAX_USAGE_KEY_NAMES:
        v.append(("key_names", f"at most {MAX_USAGE_KEY_NAMES} names, got {len(names)}"))
    for i, name in enumerate(names[:MAX_USAGE_KEY_NAMES]):
        if not _KEY_NAME.fullmatch(name):
            v.append(
                (
                    f"key_names[{i}]",
                    f"{errors.bound(name, 64)!r} is not a key name (1-63 letters, digits, '_', '-' or '.')",
                )
            )
    if v:
        raise errors.InvalidRequest(v)
    return names


def _window_to_proto(w: WindowUsage, budget: int | None) -> pb.UsageWindow:
    out = pb.UsageWindow(
        spend_micro_usd=w.spend_micro_usd,
        requests=w.requests,
        input_tokens=w.input_tokens,
        output_tokens=w.output_tokens,
        unpriced_requests=w.unpriced_requests,
    )
    out.start_time.FromSeconds(int(w.window.start))
    out.reset_time.FromSeconds(int(w.window.reset))
    if budget is not None:
        out.budget_micro_usd = budget
        out.budget_left_micro_usd = max(budget - w.spend_micro_usd, 0)
    return out


def usage_response(report: UsageReport) -> pb.GetUsageResponse:
    out = pb.GetUsageResponse(shared=report.shared)
    for k in report.keys:
        out.keys.add(
            name=k.policy.name,
            day=_window_to_proto(k.day, k.policy.budget_day_micro_usd),
            month=_window_to_proto(k.month, k.policy.budget_month_micro_usd),
            streams_in_flight=k.streams_in_flight,
        )
    return out
