"""Proto -> neutral for the 2026 contract (issue 13): documents, reasoning parts and settings,
JSON-schema formats, cache breakpoints, request metadata and provider options.

Split from convert.py, which calls these with its violation list `v`: every problem is one
(field path, what is wrong) pair, all reported at once. Bounds here are the API's (README
"Request limits"); what one vendor cannot express is its wire module's to refuse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from broker import errors, schema_rules
from broker.providers import kinds
from broker.providers.options import ALWAYS_RESERVED
from broker.types import (
    CacheTTL,
    DocumentPart,
    JsonSchemaFormat,
    Message,
    ReasoningConfig,
    ReasoningEffort,
    ReasoningPart,
    RequestMetadata,
    TextPart,
    Tool,
)
from modelbroker.v1 import broker_pb2 as pb

V = list[tuple[str, str]]

DOCUMENT_MEDIA_TYPES = frozenset({"application/pdf", "text/plain"})
MAX_URL_CHARS = 8192
MAX_CACHE_BREAKPOINTS = 4  # Anthropic's limit; the others ignore breakpoints
MAX_REASONING_PART_BYTES = 1024 * 1024  # text + signature + redacted data of one part
MAX_PROVIDER_TYPE_CHARS = 64
MAX_END_USER_CHARS = 64
MAX_TAGS = 16
MAX_TAG_VALUE_CHARS = 256
MAX_PROVIDER_OPTION_TYPES = 8
MAX_BUDGET_TOKENS = 1 << 22

_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_END_USER = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
_TAG_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_CACHE_TTL = {
    pb.CACHE_TTL_UNSPECIFIED: CacheTTL.DEFAULT,
    pb.CACHE_TTL_5M: CacheTTL.FIVE_MINUTES,
    pb.CACHE_TTL_1H: CacheTTL.ONE_HOUR,
}
_EFFORT = {
    pb.REASONING_EFFORT_MINIMAL: ReasoningEffort.MINIMAL,
    pb.REASONING_EFFORT_LOW: ReasoningEffort.LOW,
    pb.REASONING_EFFORT_MEDIUM: ReasoningEffort.MEDIUM,
    pb.REASONING_EFFORT_HIGH: ReasoningEffort.HIGH,
}


def cache_mark(holder: pb.ContentPart | pb.Tool, path: str, v: V) -> CacheTTL | None:
    """The breakpoint on a part or a tool, or None."""
    if not holder.HasField("cache_control"):
        return None
    ttl = _CACHE_TTL.get(holder.cache_control.ttl)
    if ttl is None:
        v.append((f"{path}.cache_control.ttl", f"unknown TTL {holder.cache_control.ttl}"))
        return CacheTTL.DEFAULT
    return ttl


def document(doc: pb.Document, path: str, v: V, cache: CacheTTL | None) -> DocumentPart:
    media = doc.media_type or "application/pdf"
    if media not in DOCUMENT_MEDIA_TYPES:
        v.append((f"{path}.media_type", f"must be one of {', '.join(sorted(DOCUMENT_MEDIA_TYPES))}"))
    if len(doc.title) > 512 or _CONTROL.search(doc.title):
        v.append((f"{path}.title", "at most 512 characters, no control characters"))
    src = doc.WhichOneof("source")
    if src == "data":
        if not doc.data:
            v.append((f"{path}.data", "must not be empty"))
        elif media == "application/pdf" and not doc.data.startswith(b"%PDF-"):
            v.append((f"{path}.data", "is not a PDF (it does not start with %PDF-); set media_type for text"))
        elif media == "text/plain":
            try:
                doc.data.decode("utf-8")
            except UnicodeDecodeError:
                v.append((f"{path}.data", "text/plain documents must be UTF-8"))
        return DocumentPart(data=doc.data, media_type=media, title=doc.title, cache=cache)
    if src == "url":
        if media != "application/pdf":
            v.append((f"{path}.url", "only PDF documents can be given by URL; send text as data"))
        if not doc.url.startswith("https://"):
            v.append((f"{path}.url", "must be an https URL"))
        elif len(doc.url) > MAX_URL_CHARS or _CONTROL.search(doc.url):
            v.append((f"{path}.url", f"at most {MAX_URL_CHARS} characters, no control characters"))
        return DocumentPart(url=doc.url, media_type=media, title=doc.title, cache=cache)
    v.append((path, "set data or url"))
    return DocumentPart()


def reasoning_part(r: pb.ReasoningPart, path: str, v: V, *, assistant: bool) -> ReasoningPart:
    if not assistant:
        v.append((path, "reasoning parts belong in assistant messages (send back what the model produced)"))
    if not (r.text or r.signature or r.redacted_data):
        v.append((path, "empty: set text, signature or redacted_data as the model produced them"))
    if r.redacted_data and (r.text or r.signature):
        v.append((f"{path}.redacted_data", "a redacted block has no text or signature"))
    size = len(r.text.encode("utf-8", "surrogatepass")) + len(r.signature) + len(r.redacted_data)
    if size > MAX_REASONING_PART_BYTES:
        v.append((path, f"{size} bytes, over {MAX_REASONING_PART_BYTES}"))
    if len(r.provider_type) > MAX_PROVIDER_TYPE_CHARS or _CONTROL.search(r.provider_type):
        v.append(
            (f"{path}.provider_type", f"at most {MAX_PROVIDER_TYPE_CHARS} characters, no control characters")
        )
    return ReasoningPart(r.text, r.signature, r.redacted_data, r.provider_type)


def reasoning_size(r: pb.ReasoningPart) -> int:
    return len(r.text) + len(r.signature) + len(r.redacted_data)


def check_breakpoints(messages: list[Message], tools: list[Tool], v: V) -> None:
    """At most MAX_CACHE_BREAKPOINTS breakpoints in a request (tools, system, messages)."""
    count = sum(t.cache is not None for t in tools)
    for m in messages:
        count += sum(getattr(p, "cache", None) is not None for p in m.content)
    if count > MAX_CACHE_BREAKPOINTS:
        v.append(
            ("cache_control", f"at most {MAX_CACHE_BREAKPOINTS} cache breakpoints per request, got {count}")
        )


def empty_text_breakpoints(part: TextPart, path: str, v: V) -> None:
    if part.cache is not None and not part.text:
        v.append((f"{path}.cache_control", "a cache breakpoint needs a non-empty part"))


def tool_strict(t: pb.Tool, params: dict[str, Any], path: str, v: V) -> None:
    if t.strict:
        v.extend(schema_rules.strict_problems(params, f"{path}.parameters"))


def json_schema(js: pb.JsonSchema, v: V, schema: dict[str, Any]) -> JsonSchemaFormat:
    """`schema` is js.schema already walked (bounded) by convert's schema walker."""
    path = "params.json_schema"
    if not _SCHEMA_NAME.fullmatch(js.name):
        v.append((f"{path}.name", "must be 1-64 characters of letters, digits, '_' or '-'"))
    if len(js.description) > 16 * 1024:
        v.append((f"{path}.description", "at most 16384 characters"))
    if not js.HasField("schema") or not schema:
        v.append((f"{path}.schema", "required: a JSON Schema whose root is an object"))
    elif schema.get("type") != "object":
        v.append((f"{path}.schema", 'the root must be {"type": "object", ...}'))
    elif js.strict:
        v.extend(schema_rules.strict_problems(schema, f"{path}.schema"))
    return JsonSchemaFormat(name=js.name, schema=schema, description=js.description, strict=js.strict)


def reasoning(r: pb.Reasoning, v: V) -> ReasoningConfig | None:
    mode = r.WhichOneof("mode")
    path = "params.reasoning"
    if mode == "effort":
        effort = _EFFORT.get(r.effort)
        if effort is None:
            v.append((f"{path}.effort", "must be MINIMAL, LOW, MEDIUM or HIGH"))
            return None
        return ReasoningConfig(effort=effort)
    if mode == "budget_tokens":
        if not 1 <= r.budget_tokens <= MAX_BUDGET_TOKENS:
            v.append((f"{path}.budget_tokens", f"must be 1 to {MAX_BUDGET_TOKENS}, got {r.budget_tokens}"))
        return ReasoningConfig(budget_tokens=r.budget_tokens)
    if mode == "disabled":
        if not r.disabled:
            v.append((f"{path}.disabled", "set it true to turn reasoning off (or leave reasoning unset)"))
            return None
        return ReasoningConfig(disabled=True)
    v.append((path, "set effort, budget_tokens or disabled (or leave reasoning unset)"))
    return None


def metadata(md: pb.RequestMetadata, v: V) -> RequestMetadata:
    if md.end_user_id and not _END_USER.fullmatch(md.end_user_id):
        v.append(
            (
                "metadata.end_user_id",
                f"at most {MAX_END_USER_CHARS} characters of letters, digits and _.:@- (send a hash, not personal data)",
            )
        )
    if len(md.tags) > MAX_TAGS:
        v.append(("metadata.tags", f"at most {MAX_TAGS} tags, got {len(md.tags)}"))
    tags: list[tuple[str, str]] = []
    for key in sorted(md.tags)[:MAX_TAGS]:
        value = md.tags[key]
        if not _TAG_KEY.fullmatch(key):
            v.append(
                (
                    f"metadata.tags[{errors.bound(key, 64)!r}]",
                    "keys are 1-64 characters of letters, digits and _.-",
                )
            )
        elif len(value) > MAX_TAG_VALUE_CHARS or _CONTROL.search(value):
            v.append(
                (f"metadata.tags[{key}]", f"at most {MAX_TAG_VALUE_CHARS} characters, no control characters")
            )
        else:
            tags.append((key, value))
    return RequestMetadata(end_user_id=md.end_user_id, tags=tuple(tags))


def provider_options(options: Mapping[str, struct_pb2.Struct], v: V, walk: Any) -> dict[str, dict[str, Any]]:
    """provider type -> its options as JSON-ready dicts. `walk(struct, path, v)` is convert's
    bounded Struct walker (depth, size, finite numbers)."""
    if len(options) > MAX_PROVIDER_OPTION_TYPES:
        v.append(
            ("provider_options", f"at most {MAX_PROVIDER_OPTION_TYPES} provider types, got {len(options)}")
        )
    out: dict[str, dict[str, Any]] = {}
    known = kinds.names()
    for ptype in sorted(options)[:MAX_PROVIDER_OPTION_TYPES]:
        path = f"provider_options[{errors.bound(ptype, 64)}]"
        if ptype not in known:
            v.append((path, f"unknown provider type; one of {', '.join(known)}"))
            continue
        body = walk(options[ptype], path, v)
        for key in body:
            if key in ALWAYS_RESERVED:
                v.append((f"{path}.{key}", "is set by the broker and cannot be overridden"))
        out[ptype] = body
    return out
