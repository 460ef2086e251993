"""Proto <-> neutral types, validating on the way in.

Every problem in a request becomes one field violation with the proto field path
(`messages[2].content[0].image.media_type`), and all of them are reported at once, so a
caller fixes a request in one round trip. Nothing here knows a provider.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from broker import errors
from broker.types import (
    Capability,
    ContentPart,
    Cost,
    FinishReason,
    GenerationParams,
    ImagePart,
    Message,
    ModelSpec,
    ResponseFormat,
    Role,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    Usage,
)
from modelbroker.v1 import broker_pb2 as pb

IMAGE_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_STOP_SEQUENCES = 4

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
}
CAPABILITY_FROM_PB = {
    pb.CAPABILITY_VISION: Capability.VISION,
    pb.CAPABILITY_TOOLS: Capability.TOOLS,
    pb.CAPABILITY_JSON_MODE: Capability.JSON_MODE,
}
CAPABILITY_TO_PB = {v: k for k, v in CAPABILITY_FROM_PB.items()}
FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
    FinishReason.OTHER: pb.FINISH_REASON_OTHER,
}
_PREFERENCES = {
    pb.PREFERENCE_UNSPECIFIED: "priority",
    pb.PREFERENCE_PRIORITY: "priority",
    pb.PREFERENCE_CHEAPEST: "cheapest",
    pb.PREFERENCE_FASTEST: "fastest",
}


@dataclass(slots=True)
class Requirements:
    capabilities: frozenset[Capability] = frozenset()
    min_context_window: int = 0
    max_input_price_micro_usd_per_mtok: int | None = None
    max_output_price_micro_usd_per_mtok: int | None = None
    allow_providers: tuple[str, ...] = ()
    exclude_providers: tuple[str, ...] = ()
    preference: str = "priority"

    def is_empty(self) -> bool:
        return self == Requirements()


@dataclass(slots=True)
class CompletionCall:
    """A validated completion request, before a model is resolved."""

    model: str
    messages: list[Message]
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    params: GenerationParams = field(default_factory=GenerationParams)
    requirements: Requirements = field(default_factory=Requirements)
    fallback_models: list[str] = field(default_factory=list)

    def needed_capabilities(self) -> set[Capability]:
        needed: set[Capability] = set()
        if any(m.has_image() for m in self.messages):
            needed.add(Capability.VISION)
        if self.tools:
            needed.add(Capability.TOOLS)
        if self.params.response_format is ResponseFormat.JSON:
            needed.add(Capability.JSON_MODE)
        return needed


def completion_from_proto(
    req: pb.CompleteRequest | pb.StreamCompleteRequest, *, max_message_bytes: int
) -> CompletionCall:
    v: list[tuple[str, str]] = []
    requirements = requirements_from_proto(req.requirements, "requirements", v)
    if not req.model.strip() and requirements.is_empty():
        v.append(
            (
                "model",
                "required: give 'provider/model', a model id or an alias (or requirements to select one)",
            )
        )
    if not req.messages:
        v.append(("messages", "at least one message is required"))
    messages = [_message(m, f"messages[{i}]", v, max_message_bytes) for i, m in enumerate(req.messages)]
    tools = _tools(req, v)
    tool_choice = _tool_choice(req, {t.name for t in tools}, v)
    params = params_from_proto(req.params, v) if req.HasField("params") else GenerationParams()
    for i, fb in enumerate(req.fallback_models):
        if not fb.strip():
            v.append((f"fallback_models[{i}]", "must not be empty"))
    if v:
        raise errors.InvalidRequest(v)
    return CompletionCall(
        model=req.model.strip(),
        messages=messages,
        tools=tools,
        tool_choice=tool_choice,
        params=params,
        requirements=requirements,
        fallback_models=[f.strip() for f in req.fallback_models],
    )


def _message(m: pb.Message, path: str, v: list[tuple[str, str]], max_bytes: int) -> Message:
    role = _ROLES.get(m.role)
    if role is None:
        v.append(
            (f"{path}.role", f"must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL, got {m.role}")
        )
        role = Role.USER
    parts: list[ContentPart] = []
    size = 0
    for j, part in enumerate(m.content):
        ppath = f"{path}.content[{j}]"
        kind = part.WhichOneof("part")
        if kind == "text":
            parts.append(TextPart(part.text))
            size += len(part.text.encode())
        elif kind == "image":
            if role in (Role.SYSTEM, Role.TOOL):
                v.append(
                    (f"{ppath}.image", f"images are only allowed in user and assistant messages, not {role}")
                )
            parts.append(_image(part.image, f"{ppath}.image", v))
            size += len(part.image.data) + len(part.image.url)
        else:
            v.append((ppath, "set text or image"))
    if size > max_bytes:
        v.append((f"{path}.content", f"{size} bytes exceeds the limit of {max_bytes} bytes per message"))
    calls = []
    for j, tc in enumerate(m.tool_calls):
        if role is not Role.ASSISTANT:
            v.append((f"{path}.tool_calls", "only assistant messages carry tool calls"))
            break
        if not tc.id:
            v.append((f"{path}.tool_calls[{j}].id", "required"))
        if not tc.name:
            v.append((f"{path}.tool_calls[{j}].name", "required"))
        calls.append(ToolCall(id=tc.id, name=tc.name, arguments=tc.arguments or "{}"))
    if role is Role.TOOL and not m.tool_call_id:
        v.append((f"{path}.tool_call_id", "required for ROLE_TOOL messages: the id of the call this answers"))
    if not parts and not calls and role is not Role.ASSISTANT:
        # An empty assistant turn is history as it happened (a model that said nothing):
        # passed on (OpenAI takes it; the Anthropic mapping leaves it out).
        v.append((f"{path}.content", "must not be empty"))
    return Message(
        role=role, content=parts, tool_calls=calls, tool_call_id=m.tool_call_id, is_error=m.is_error
    )


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
        if img.media_type and img.media_type not in IMAGE_MEDIA_TYPES:
            v.append((f"{path}.media_type", f"must be one of {', '.join(sorted(IMAGE_MEDIA_TYPES))}"))
        return ImagePart(url=img.url, media_type=img.media_type)
    v.append((path, "set data or url"))
    return ImagePart()


def _tools(req: pb.CompleteRequest | pb.StreamCompleteRequest, v: list[tuple[str, str]]) -> list[Tool]:
    tools: list[Tool] = []
    seen: set[str] = set()
    for i, t in enumerate(req.tools):
        if not _TOOL_NAME.match(t.name):
            v.append((f"tools[{i}].name", "must be 1-64 characters of letters, digits, '_' or '-'"))
        elif t.name in seen:
            v.append((f"tools[{i}].name", f"duplicate tool name {t.name!r}"))
        seen.add(t.name)
        params: dict[str, Any] = (
            json_format.MessageToDict(t.parameters)
            if t.HasField("parameters")
            else {"type": "object", "properties": {}}
        )
        if params.get("type", "object") != "object":
            v.append((f"tools[{i}].parameters", "must be a JSON Schema of type object"))
        tools.append(Tool(name=t.name, description=t.description, parameters=params))
    return tools


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
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        v.append(("params.temperature", f"must be between 0 and 2, got {temperature:g}"))
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        v.append(("params.top_p", f"must be between 0 and 1, got {top_p:g}"))
    if max_tokens is not None and max_tokens < 1:
        v.append(("params.max_tokens", f"must be at least 1, got {max_tokens}"))
    if len(p.stop) > MAX_STOP_SEQUENCES:
        v.append(("params.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(p.stop)}"))
    for i, s in enumerate(p.stop):
        if not s:
            v.append((f"params.stop[{i}]", "must not be empty"))
    fmt = _RESPONSE_FORMAT.get(p.response_format)
    if fmt is None:
        v.append(("params.response_format", f"unknown format {p.response_format}"))
        fmt = ResponseFormat.DEFAULT
    return GenerationParams(
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        stop=tuple(p.stop),
        seed=p.seed if p.HasField("seed") else None,
        response_format=fmt,
    )


def requirements_from_proto(r: pb.Requirements, path: str, v: list[tuple[str, str]]) -> Requirements:
    caps: set[Capability] = set()
    for i, c in enumerate(r.capabilities):
        cap = CAPABILITY_FROM_PB.get(c)
        if cap is None:
            v.append((f"{path}.capabilities[{i}]", f"unknown capability {c}"))
        else:
            caps.add(cap)
    if r.min_context_window < 0:
        v.append((f"{path}.min_context_window", "must not be negative"))
    for name in ("max_input_price_micro_usd_per_mtok", "max_output_price_micro_usd_per_mtok"):
        if r.HasField(name) and getattr(r, name) < 0:
            v.append((f"{path}.{name}", "must not be negative"))
    pref = _PREFERENCES.get(r.preference)
    if pref is None:
        v.append((f"{path}.preference", f"unknown preference {r.preference}"))
        pref = "priority"
    return Requirements(
        capabilities=frozenset(caps),
        min_context_window=r.min_context_window,
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


# --- neutral -> proto ------------------------------------------------------------------------


def usage_to_proto(u: Usage) -> pb.Usage:
    return pb.Usage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cached_input_tokens=u.cached_input_tokens,
        cache_write_input_tokens=u.cache_write_input_tokens,
        estimated=u.estimated,
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
