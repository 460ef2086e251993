"""Gemini request bodies: a neutral CompletionRequest -> a `GenerateContentRequest`.

Shared by type gemini (the Generative Language API) and the Gemini half of type vertex (the
same body on aiplatform). The turns (`user`/`model`, roles merged so they alternate, function
responses first in a user turn), the system instruction, text, images and documents as
`inlineData`/`fileData`, function declarations with `parametersJsonSchema` (or the
OpenAPI-subset `parameters` on 1.x/2.0 models), tool config, function calls and responses
with their ids, reasoning sent back with its thought signatures on the parts they came on,
generationConfig (sampling, output limit, stop sequences, seed, JSON and JSON-schema answers,
thinking by gemini_rules), and last the caller's provider_options. PROTOCOLS-CLOUD.md A3.

Reasoning parts in history: a part with text is a thought summary (`thought: true`, with its
signature if it had one); a part with only a signature stands for the signature the next
part carried (a text part or the turn's first function call), which is how StreamParser in
gemini_wire emits a signature that came on an answer part. Not sent: cache breakpoints (the
Gemini API caches implicitly; explicit `cachedContent` goes through provider_options),
request metadata (no such field), a tool's strictness beyond the VALIDATED calling mode.
Pure mapping, no I/O; every request the API could not take is an errors.InvalidRequest
raised here, before any upstream call.
"""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
from dataclasses import dataclass, field
from typing import Any

from broker import errors
from broker.providers import checks
from broker.providers import gemini_rules as rules
from broker.providers.options import merge_options
from broker.types import (
    CompletionRequest,
    DocumentPart,
    ImagePart,
    Message,
    ReasoningPart,
    ResponseFormat,
    Role,
    TextPart,
    ToolChoiceMode,
)

PROVIDER_TYPE = "gemini"
Part = dict[str, Any]
# Top-level fields the broker always owns; `generationConfig` merges key by key (topK,
# responseModalities, ...) and safetySettings, cachedContent and labels pass as given.
RESERVED_OPTIONS = frozenset({"contents", "systemInstruction", "tools", "toolConfig"})
# Google's limit on generationConfig.stopSequences.
MAX_STOP_SEQUENCES = 5
_DOCUMENT_TYPES = ("application/pdf", "text/plain")


def build_body(request: CompletionRequest, notes: list[str] | None = None) -> dict[str, Any]:
    """The GenerateContentRequest for `request`. Raises errors.InvalidRequest. `notes`, when
    given, collects what the broker sent instead of what was asked (for a debug log)."""
    own_type = request.provider_type or PROVIDER_TYPE
    system: list[Part] = []
    turns: list[_Turn] = []
    names: dict[str, str] = {}  # tool call id -> function name, from the calls so far
    for i, msg in enumerate(request.messages):
        if msg.role == Role.SYSTEM:
            system += _system_parts(msg, i)
            continue
        role = "model" if msg.role == Role.ASSISTANT else "user"
        responses: list[Part]
        if msg.role == Role.ASSISTANT:
            responses, parts = [], _model_parts(msg, i, request.model, notes)
            names.update((c.id, c.name) for c in msg.tool_calls)
        elif msg.role == Role.TOOL:
            responses, parts = _tool_parts(msg, i, names)
        else:
            responses, parts = [], _user_parts(msg, i)
        if not responses and not parts:
            if msg.role == Role.ASSISTANT:
                continue  # a model that said nothing: leaving the turn out says the same
            raise errors.InvalidRequest([(f"messages[{i}].content", "Gemini rejects an empty message")])
        if not turns or turns[-1].role != role:
            turns.append(_Turn(role))
        turns[-1].responses += responses
        turns[-1].parts += parts
    if not turns:
        raise errors.InvalidRequest([("messages", "Gemini needs at least one user or assistant message")])
    body: dict[str, Any] = {"contents": [t.render() for t in turns]}
    if system:
        body["systemInstruction"] = {"parts": system}
    json_schema = rules.takes_json_schema(request.model)
    if request.tools:
        body["tools"] = [
            {"functionDeclarations": [_declaration(t, i, json_schema) for i, t in enumerate(request.tools)]}
        ]
    tool_config = _tool_config(request)
    if tool_config is not None:
        body["toolConfig"] = tool_config
    generation = _generation_config(request, json_schema, notes)
    if generation:
        body["generationConfig"] = generation
    return merge_options(body, request.provider_options, provider_type=own_type, reserved=RESERVED_OPTIONS)


@dataclass(slots=True)
class _Turn:
    role: str
    responses: list[Part] = field(default_factory=list)  # functionResponse parts come first
    parts: list[Part] = field(default_factory=list)

    def render(self) -> dict[str, Any]:
        return {"role": self.role, "parts": self.responses + self.parts}


def _system_parts(msg: Message, i: int) -> list[Part]:
    parts: list[Part] = []
    for j, part in enumerate(msg.content):
        if not isinstance(part, TextPart):
            raise errors.InvalidRequest(
                [(f"messages[{i}].content[{j}]", "Gemini takes only text in the system instruction")]
            )
        if part.text:
            parts.append({"text": part.text})
    return parts


def _user_parts(msg: Message, i: int) -> list[Part]:
    parts: list[Part] = []
    for j, part in enumerate(msg.content):
        where = f"messages[{i}].content[{j}]"
        if isinstance(part, ReasoningPart):
            raise errors.InvalidRequest([(where, "reasoning parts belong in assistant messages")])
        parts += _content_parts(part, where)
    return parts


def _content_parts(part: TextPart | ImagePart | DocumentPart, where: str) -> list[Part]:
    if isinstance(part, TextPart):
        return [{"text": part.text}] if part.text else []
    if isinstance(part, ImagePart):
        return [_media(part.data, part.url, part.media_type, where, "an image")]
    if part.data is not None and part.media_type not in _DOCUMENT_TYPES:
        raise errors.InvalidRequest(
            [(f"{where}.media_type", f"Gemini takes PDF or text/plain documents here, not {part.media_type}")]
        )
    doc = _media(part.data, part.url, part.media_type, where, "a document")
    # inlineData has no name the Gemini API accepts: the title goes just before the document.
    return [{"text": part.title}, doc] if part.title else [doc]


def _media(data: bytes | None, url: str | None, media_type: str, where: str, what: str) -> Part:
    if data is not None:
        if not media_type:
            raise errors.InvalidRequest([(f"{where}.media_type", "required with inline bytes")])
        return {"inlineData": {"mimeType": media_type, "data": base64.b64encode(data).decode("ascii")}}
    if url and url.startswith("data:"):
        head, sep, payload = url.partition(",")
        mime = head.removeprefix("data:").removesuffix(";base64")
        if not sep or not head.endswith(";base64") or not mime:
            raise errors.InvalidRequest(
                [(f"{where}.url", "a data: URL must be data:<media type>;base64,<data>")]
            )
        try:
            base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise errors.InvalidRequest([(f"{where}.url", "the data: URL is not valid base64")]) from None
        return {"inlineData": {"mimeType": mime, "data": payload}}
    if url:
        mime = media_type or mimetypes.guess_type(url.split("?", 1)[0])[0] or ""
        if not mime:
            raise errors.InvalidRequest(
                [(f"{where}.media_type", f"Gemini needs the media type of {what} given by URL")]
            )
        return {"fileData": {"mimeType": mime, "fileUri": url}}
    raise errors.InvalidRequest([(where, f"{what} needs bytes or a URL")])


def _model_parts(msg: Message, i: int, model: str, notes: list[str] | None) -> list[Part]:
    """An assistant turn as the model produced it: thought summaries and text in order, then
    the function calls; each signature back on the part it came on (see the module doc)."""
    parts: list[Part] = []
    pending = ""  # a signature-only reasoning part: it belongs to the next part
    for j, part in enumerate(msg.content):
        where = f"messages[{i}].content[{j}]"
        if isinstance(part, ReasoningPart):
            # Only this type's reasoning is here (CompletionCall.upstream dropped the rest);
            # Gemini has no redacted blocks to send back.
            if part.redacted_data:
                continue
            if part.text:
                thought: Part = {"text": part.text, "thought": True}
                if part.signature:
                    thought["thoughtSignature"] = part.signature
                parts.append(thought)
            elif part.signature:
                pending = part.signature
            continue
        for p in _content_parts(part, where):
            if pending:
                p["thoughtSignature"], pending = pending, ""
            parts.append(p)
    for j, call in enumerate(msg.tool_calls):
        fc: Part = {"functionCall": {"name": call.name, "args": _args(call.arguments, i, j), "id": call.id}}
        if pending:
            fc["thoughtSignature"], pending = pending, ""
        elif j == 0 and rules.needs_signatures(model):
            # A call Gemini 3 did not make (another model's history): without a signature it
            # answers 400, so the bypass value Google documents for this case goes instead.
            fc["thoughtSignature"] = rules.SKIP_SIGNATURE
            if notes is not None:
                notes.append(
                    f"messages[{i}]: a function call without a thought signature: sent with {rules.SKIP_SIGNATURE}"
                )
        parts.append(fc)
    if pending:
        parts.append({"text": "", "thoughtSignature": pending})  # it came on an empty text part
    return parts


def _args(arguments: str, i: int, j: int) -> dict[str, Any]:
    return checks.tool_arguments(arguments, i, j, vendor_says="Gemini's function args are an object")


def _tool_parts(msg: Message, i: int, names: dict[str, str]) -> tuple[list[Part], list[Part]]:
    """(the functionResponse, the result's images) for one tool message."""
    if not msg.tool_call_id:
        raise errors.InvalidRequest([(f"messages[{i}].tool_call_id", "required on a tool message")])
    name = names.get(msg.tool_call_id)
    if name is None:
        raise errors.InvalidRequest(
            [
                (
                    f"messages[{i}].tool_call_id",
                    f"no earlier assistant message has a tool call with id {errors.bound(msg.tool_call_id, 64)!r}; "
                    "Gemini answers a call by its function's name",
                )
            ]
        )
    others: list[Part] = []
    for j, part in enumerate(msg.content):
        if isinstance(part, ImagePart | DocumentPart):
            others += _content_parts(part, f"messages[{i}].content[{j}]")
    response = {"functionResponse": {"name": name, "response": _response(msg), "id": msg.tool_call_id}}
    return [response], others


def _response(msg: Message) -> dict[str, Any]:
    """The result as the object Gemini takes: a JSON object as it is; any other text under
    "output" ("error" for a failed call), the keys Google documents for FunctionResponse."""
    text = msg.text()
    if msg.is_error:
        return {"error": text}
    try:
        value = json.loads(text) if text.strip() else None
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    return {"output": text}


def _declaration(tool: Any, i: int, json_schema: bool) -> Part:
    decl: Part = {"name": tool.name}
    if tool.description:
        decl["description"] = tool.description
    if tool.parameters:
        if json_schema:
            decl["parametersJsonSchema"] = tool.parameters
        else:
            params = rules.openapi_schema(tool.parameters, f"tools[{i}].parameters")
            # The OpenAPI form refuses an OBJECT without properties: no parameters says it.
            if params.get("properties") or params.get("type") not in (None, "OBJECT"):
                decl["parameters"] = params
    return decl


def _tool_config(request: CompletionRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    strict = any(t.strict for t in request.tools)
    if choice.mode in (ToolChoiceMode.DEFAULT, ToolChoiceMode.AUTO) and not strict:
        if choice.mode is ToolChoiceMode.DEFAULT or not request.tools:
            return None
        return {"functionCallingConfig": {"mode": "AUTO"}}
    if not request.tools:
        if choice.mode is ToolChoiceMode.NONE:
            return None
        raise errors.InvalidRequest([("tool_choice", f"{choice.mode.value} needs at least one tool")])
    if choice.mode is ToolChoiceMode.NONE:
        return {"functionCallingConfig": {"mode": "NONE"}}
    if choice.mode is ToolChoiceMode.REQUIRED:
        return {"functionCallingConfig": {"mode": "ANY"}}
    if choice.mode is ToolChoiceMode.TOOL:
        if not choice.tool_name:
            raise errors.InvalidRequest([("tool_choice.tool_name", "required when the mode is tool")])
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [choice.tool_name]}}
    # Strict tools, the model choosing: calls constrained to their schemas.
    return {"functionCallingConfig": {"mode": "VALIDATED"}}


def _generation_config(
    request: CompletionRequest, json_schema: bool, notes: list[str] | None
) -> dict[str, Any]:
    p = request.params
    cfg: dict[str, Any] = {}
    if p.temperature is not None:
        if not 0.0 <= p.temperature <= 2.0:
            raise errors.InvalidRequest(
                [("params.temperature", f"Gemini accepts 0 to 2, got {p.temperature:g}")]
            )
        cfg["temperature"] = p.temperature
    if p.top_p is not None:
        cfg["topP"] = p.top_p
    limit = request.output_limit(None)
    if limit is not None:
        cfg["maxOutputTokens"] = limit
    if p.stop:
        if len(p.stop) > MAX_STOP_SEQUENCES:
            raise errors.InvalidRequest(
                [
                    (
                        "params.stop",
                        f"Gemini takes at most {MAX_STOP_SEQUENCES} stop sequences, got {len(p.stop)}",
                    )
                ]
            )
        cfg["stopSequences"] = list(p.stop)
    if p.seed is not None:
        cfg["seed"] = p.seed
    if p.response_format is ResponseFormat.TEXT:
        cfg["responseMimeType"] = "text/plain"
    elif p.response_format is ResponseFormat.JSON:
        cfg["responseMimeType"] = "application/json"
    elif p.response_format is ResponseFormat.JSON_SCHEMA:
        if p.json_schema is None:
            raise errors.InvalidRequest(
                [("params.json_schema", "required with the JSON_SCHEMA response format")]
            )
        cfg["responseMimeType"] = "application/json"
        if json_schema:
            cfg["responseJsonSchema"] = p.json_schema.schema
        else:
            cfg["responseSchema"] = rules.openapi_schema(p.json_schema.schema, "params.json_schema.schema")
    thinking = rules.thinking_for(request)
    if thinking.config is not None:
        cfg["thinkingConfig"] = thinking.config
    if thinking.note and notes is not None:
        notes.append(thinking.note)
    return cfg
