"""Running one replay case: recording -> replay server -> in-process daemon -> what the caller saw.

`load` reads a recording from ../shared/recordings at test time (never a copy in the repo);
`request_for` turns the recorded vendor request into the broker's proto request;
`provider_config` configures the daemon's provider over the replay server; `answer_for`
decides what the server sends for each request the daemon makes; `run` does one case and
returns an `Observed`; `mismatches` compares it with the row's Expect.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import re
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.providers import kinds
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import FAST_ROUTING, broker_settings, stub
from tests.fakes.segment import Segmenter, from_env
from tests.replay import cases as C
from tests.replay.server import ReplayServer, Seen, Wire, json_wire, recorded_wire

RECORDINGS = Path(__file__).parents[2].parent / "shared" / "recordings"
PROVIDER = "replay"
KEY = "sk-replay-test-9d1f0c2a"
# Retries fast and few, a breaker out of the way, health checks out of the way.
ROUTING = FAST_ROUTING
HEALTH = {"interval_seconds": 30, "timeout_seconds": 2}
RPC_TIMEOUT = 20.0


# --- recordings ---------------------------------------------------------------------------------


def recordings_dir() -> Path:
    if not RECORDINGS.is_dir():
        pytest.fail(
            f"the recordings directory {RECORDINGS} is missing: the replay suite reads the recorded "
            "vendor traffic from ../shared/recordings next to the repository (CI checks it out there); "
            "it is never copied into the repo",
            pytrace=False,
        )
    return RECORDINGS


def recording_ids() -> list[str]:
    return sorted(p.stem for p in recordings_dir().glob("*.json"))


def load(recording_id: str) -> dict[str, Any]:
    path = recordings_dir() / f"{recording_id}.json"
    if not path.is_file():
        pytest.fail(f"recording {recording_id!r} is not in {RECORDINGS}", pytrace=False)
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


# --- the recorded request, as the broker's request ----------------------------------------------


@dataclass
class Request:
    model: str
    rpc: str  # "stream" | "unary"
    messages: list[pb.Message] = field(default_factory=list)
    tools: list[pb.Tool] = field(default_factory=list)
    tool_choice: pb.ToolChoice | None = None
    params: pb.GenerationParams = field(default_factory=pb.GenerationParams)
    metadata: pb.RequestMetadata = field(default_factory=pb.RequestMetadata)

    def proto(self, model: str) -> pb.StreamCompleteRequest | pb.CompleteRequest:
        kw: dict[str, Any] = {
            "model": model,
            "messages": self.messages,
            "tools": self.tools,
            "params": self.params,
            "metadata": self.metadata,
        }
        if self.tool_choice is not None:
            kw["tool_choice"] = self.tool_choice
        return pb.StreamCompleteRequest(**kw) if self.rpc == "stream" else pb.CompleteRequest(**kw)


def _text(text: str) -> pb.ContentPart:
    return pb.ContentPart(text=text)


def _struct(doc: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if isinstance(doc, dict):
        s.update(doc)
    return s


def _image_from_data_url(url: str) -> pb.Image:
    head, _, data = url.partition(",")
    return pb.Image(data=base64.b64decode(data), media_type=head.removeprefix("data:").split(";")[0])


def _sniff(data: bytes) -> str:
    for magic, media in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif")):
        if data.startswith(magic):
            return media
    return "image/webp" if data[8:12] == b"WEBP" else "application/octet-stream"


def _args_text(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args if args is not None else {})


def _params(p: pb.GenerationParams, *, temperature: Any, top_p: Any, max_tokens: Any, stop: Any) -> None:
    if isinstance(temperature, (int, float)):
        p.temperature = float(temperature)
    if isinstance(top_p, (int, float)):
        p.top_p = float(top_p)
    if isinstance(max_tokens, int):
        p.max_tokens = max_tokens
    if isinstance(stop, str):
        p.stop.append(stop)
    elif isinstance(stop, list):
        p.stop.extend(str(s) for s in stop)


_OPENAI_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
_MODES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
    "any": pb.TOOL_CHOICE_MODE_REQUIRED,
}


_EFFORTS = {
    "minimal": pb.REASONING_EFFORT_MINIMAL,
    "low": pb.REASONING_EFFORT_LOW,
    "medium": pb.REASONING_EFFORT_MEDIUM,
    "high": pb.REASONING_EFFORT_HIGH,
}


def _cache(part: pb.ContentPart | pb.Tool, block: dict[str, Any]) -> None:
    """An Anthropic cache_control on a block -> the part's or tool's breakpoint."""
    marker = block.get("cache_control")
    if isinstance(marker, dict):
        ttl = {"5m": pb.CACHE_TTL_5M, "1h": pb.CACHE_TTL_1H}.get(
            str(marker.get("ttl")), pb.CACHE_TTL_UNSPECIFIED
        )
        part.cache_control.ttl = ttl


def _schema_format(p: pb.GenerationParams, name: str, schema: Any, strict: bool) -> None:
    p.json_schema.name = name
    p.json_schema.strict = strict
    p.json_schema.schema.CopyFrom(_struct(schema))


def _openai_content(content: Any) -> list[pb.ContentPart]:
    if isinstance(content, str):
        return [_text(content)] if content else []  # "" is an empty turn: no parts
    parts = []
    for part in content or []:
        if part.get("type") == "text":
            parts.append(_text(part.get("text", "")))
        elif part.get("type") == "image_url":
            url = part["image_url"]["url"]
            img = _image_from_data_url(url) if url.startswith("data:") else pb.Image(url=url)
            parts.append(pb.ContentPart(image=img))
        elif part.get("type") == "file":
            f = part.get("file") or {}
            data = str(f.get("file_data", "")).partition(",")[2]
            doc = pb.Document(data=base64.b64decode(data), title=str(f.get("filename", "")))
            parts.append(pb.ContentPart(document=doc))
    return parts


def _from_openai(req: Request, body: dict[str, Any]) -> None:
    for m in body.get("messages") or []:
        msg = pb.Message(role=_OPENAI_ROLES[m["role"]], content=_openai_content(m.get("content")))
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function") or {}
            msg.tool_calls.add(
                id=tc.get("id", ""), name=fn.get("name", ""), arguments=fn.get("arguments") or ""
            )
        msg.tool_call_id = m.get("tool_call_id", "")
        req.messages.append(msg)
    for t in body.get("tools") or []:
        fn = t.get("function") or {}
        req.tools.append(
            pb.Tool(
                name=fn["name"],
                description=fn.get("description", ""),
                parameters=_struct(fn.get("parameters")),
                strict=fn.get("strict") is True,
            )
        )
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        req.tool_choice = pb.ToolChoice(mode=_MODES[choice])
    elif isinstance(choice, dict):
        req.tool_choice = pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_TOOL, tool_name=choice["function"]["name"])
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    _params(
        req.params,
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        max_tokens=limit,
        stop=body.get("stop"),
    )
    if isinstance(body.get("seed"), int):
        req.params.seed = body["seed"]
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_object":
        req.params.response_format = pb.RESPONSE_FORMAT_JSON
    elif fmt.get("type") == "json_schema":
        js = fmt.get("json_schema") or {}
        _schema_format(req.params, js.get("name", "answer"), js.get("schema"), js.get("strict") is True)
    effort = body.get("reasoning_effort")
    reasoning = body.get("reasoning")  # OpenRouter's object
    if effort == "none" or (isinstance(reasoning, dict) and reasoning.get("enabled") is False):
        req.params.reasoning.disabled = True
    elif effort in _EFFORTS:
        req.params.reasoning.effort = _EFFORTS[effort]
    elif isinstance(reasoning, dict):
        if isinstance(reasoning.get("max_tokens"), int):
            req.params.reasoning.budget_tokens = reasoning["max_tokens"]
        else:
            req.params.reasoning.effort = _EFFORTS.get(
                str(reasoning.get("effort")), pb.REASONING_EFFORT_MEDIUM
            )
    user = body.get("safety_identifier") or body.get("user")
    if isinstance(user, str) and user:
        req.metadata.end_user_id = user


def _from_anthropic(req: Request, body: dict[str, Any]) -> None:
    system = body.get("system")
    if isinstance(system, list) and any("cache_control" in b for b in system):
        sys_msg = pb.Message(role=pb.ROLE_SYSTEM)
        for b in system:
            if b.get("type") == "text":
                part = _text(b.get("text", ""))
                _cache(part, b)
                sys_msg.content.append(part)
        req.messages.append(sys_msg)
        system = None
    if isinstance(system, list):
        system = "\n\n".join(b.get("text", "") for b in system if b.get("type") == "text")
    if system:
        req.messages.append(pb.Message(role=pb.ROLE_SYSTEM, content=[_text(system)]))
    for m in body.get("messages") or []:
        role = pb.ROLE_ASSISTANT if m["role"] == "assistant" else pb.ROLE_USER
        content = m.get("content")
        blocks: list[dict[str, Any]] = (
            [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        )
        msg = pb.Message(role=role)
        results: list[pb.Message] = []
        for b in blocks:
            kind = b.get("type")
            if kind == "text" and b.get("text"):
                part = _text(b["text"])
                _cache(part, b)
                msg.content.append(part)
            elif kind == "thinking":
                r = pb.ReasoningPart(
                    text=b.get("thinking", ""), signature=b.get("signature", ""), provider_type="anthropic"
                )
                msg.content.append(pb.ContentPart(reasoning=r))
            elif kind == "redacted_thinking":
                r = pb.ReasoningPart(redacted_data=b.get("data", ""), provider_type="anthropic")
                msg.content.append(pb.ContentPart(reasoning=r))
            elif kind == "document":
                src = b.get("source") or {}
                doc = pb.Document(title=b.get("title", ""))
                if src.get("type") == "base64":
                    doc.data, doc.media_type = base64.b64decode(src["data"]), src.get("media_type", "")
                elif src.get("type") == "text":
                    doc.data, doc.media_type = str(src.get("data", "")).encode(), "text/plain"
                else:
                    doc.url = src.get("url", "")
                part = pb.ContentPart(document=doc)
                _cache(part, b)
                msg.content.append(part)
            elif kind == "image":
                src = b["source"]
                img = (
                    pb.Image(data=base64.b64decode(src["data"]), media_type=src["media_type"])
                    if src.get("type") == "base64"
                    else pb.Image(url=src.get("url", ""))
                )
                msg.content.append(pb.ContentPart(image=img))
            elif kind == "tool_use":
                msg.tool_calls.add(id=b["id"], name=b["name"], arguments=json.dumps(b.get("input") or {}))
            elif kind == "tool_result":
                out = b.get("content")
                text = out if isinstance(out, str) else "".join(x.get("text", "") for x in out or [])
                results.append(
                    pb.Message(
                        role=pb.ROLE_TOOL,
                        tool_call_id=b["tool_use_id"],
                        content=[_text(text)],
                        is_error=bool(b.get("is_error")),
                    )
                )
        req.messages.extend(results)
        if msg.content or msg.tool_calls or not results:
            req.messages.append(msg)
    for t in body.get("tools") or []:
        if "input_schema" in t:  # client tools; server tools (web_search_...) cannot be requested
            tool = pb.Tool(
                name=t["name"],
                description=t.get("description", ""),
                parameters=_struct(t["input_schema"]),
                strict=t.get("strict") is True,
            )
            _cache(tool, t)
            req.tools.append(tool)
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") == "tool":
            req.tool_choice = pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_TOOL, tool_name=choice["name"])
        else:
            req.tool_choice = pb.ToolChoice(mode=_MODES[choice["type"]])
    _params(
        req.params,
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        max_tokens=body.get("max_tokens"),
        stop=body.get("stop_sequences"),
    )
    thinking = body.get("thinking") or {}
    output = body.get("output_config") or {}
    if thinking.get("type") == "enabled":
        req.params.reasoning.budget_tokens = int(thinking.get("budget_tokens", 1024))
    elif thinking.get("type") == "adaptive":
        # Adaptive thinking is how the broker maps an effort (Anthropic's default effort: high).
        req.params.reasoning.effort = _EFFORTS.get(str(output.get("effort")), pb.REASONING_EFFORT_HIGH)
    fmt = output.get("format") or {}
    if fmt.get("type") == "json_schema":
        _schema_format(req.params, "answer", fmt.get("schema"), True)
    user = (body.get("metadata") or {}).get("user_id")
    if isinstance(user, str) and user:
        req.metadata.end_user_id = user


def _from_ollama(req: Request, body: dict[str, Any]) -> None:
    for m in body.get("messages") or []:
        msg = pb.Message(role=_OPENAI_ROLES[m["role"]])
        if m.get("thinking") and m["role"] == "assistant":
            msg.content.append(
                pb.ContentPart(reasoning=pb.ReasoningPart(text=m["thinking"], provider_type="ollama"))
            )
        if m.get("content"):
            msg.content.append(_text(m["content"]))
        for b64 in m.get("images") or []:
            data = base64.b64decode(b64)
            msg.content.append(pb.ContentPart(image=pb.Image(data=data, media_type=_sniff(data))))
        for i, tc in enumerate(m.get("tool_calls") or []):
            fn = tc.get("function") or {}
            msg.tool_calls.add(
                id=tc.get("id") or f"call_{i}",
                name=fn.get("name", ""),
                arguments=_args_text(fn.get("arguments")),
            )
        msg.tool_call_id = m.get("tool_call_id") or m.get("tool_name", "")
        req.messages.append(msg)
    for t in body.get("tools") or []:
        fn = t.get("function") or t  # the wrapped form, or a bare declaration
        req.tools.append(
            pb.Tool(
                name=fn["name"],
                description=fn.get("description", ""),
                parameters=_struct(fn.get("parameters")),
            )
        )
    opts = body.get("options") or {}
    _params(
        req.params,
        temperature=opts.get("temperature"),
        top_p=opts.get("top_p"),
        max_tokens=opts.get("num_predict"),
        stop=opts.get("stop"),
    )
    if isinstance(opts.get("seed"), int):
        req.params.seed = opts["seed"]
    if body.get("format") == "json":
        req.params.response_format = pb.RESPONSE_FORMAT_JSON
    elif isinstance(body.get("format"), dict):
        _schema_format(req.params, "answer", body["format"], False)
    think = body.get("think")
    if think is False:
        req.params.reasoning.disabled = True
    elif think is True:
        req.params.reasoning.effort = pb.REASONING_EFFORT_MEDIUM
    elif think in _EFFORTS:
        req.params.reasoning.effort = _EFFORTS[think]


def _json_schema(schema: Any) -> Any:
    """Google's OpenAPI-subset Schema (`"type": "OBJECT"`) as the JSON Schema a caller sends."""
    if isinstance(schema, dict):
        return {
            k: (v.lower() if k == "type" and isinstance(v, str) else _json_schema(v))
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_json_schema(v) for v in schema]
    return schema


def _from_gemini(req: Request, body: dict[str, Any], provider_type: str = "gemini") -> None:
    system = body.get("systemInstruction") or {}
    text = "".join(p.get("text", "") for p in system.get("parts") or [])
    if text:
        req.messages.append(pb.Message(role=pb.ROLE_SYSTEM, content=[_text(text)]))
    for c in body.get("contents") or []:
        msg = pb.Message(role=pb.ROLE_ASSISTANT if c.get("role") == "model" else pb.ROLE_USER)
        results = []
        for p in c.get("parts") or []:
            signature = str(p.get("thoughtSignature") or "")
            if p.get("thought") or signature:
                # A thought summary with its signature, or an answer part's signature: what the
                # caller got as a reasoning part and sends back in front of that part.
                text = str(p.get("text") or "") if p.get("thought") else ""
                r = pb.ReasoningPart(text=text, signature=signature, provider_type=provider_type)
                msg.content.append(pb.ContentPart(reasoning=r))
            if "functionCall" in p:
                fc = p["functionCall"]
                msg.tool_calls.add(
                    id=fc.get("id") or fc["name"], name=fc["name"], arguments=_args_text(fc.get("args"))
                )
            elif "functionResponse" in p:
                fr = p["functionResponse"]
                results.append(
                    pb.Message(
                        role=pb.ROLE_TOOL,
                        tool_call_id=fr.get("id") or fr["name"],
                        content=[_text(json.dumps(fr.get("response")))],
                    )
                )
            elif p.get("text") and not p.get("thought"):
                msg.content.append(_text(p["text"]))
        req.messages.extend(results)
        if msg.content or msg.tool_calls:
            req.messages.append(msg)
    for t in body.get("tools") or []:
        for fd in t.get("functionDeclarations") or []:
            schema = _json_schema(fd.get("parameters") or fd.get("parameters_json_schema"))
            req.tools.append(
                pb.Tool(name=fd["name"], description=fd.get("description", ""), parameters=_struct(schema))
            )
    cfg = body.get("generationConfig") or {}
    _params(
        req.params,
        temperature=cfg.get("temperature"),
        top_p=cfg.get("topP"),
        max_tokens=cfg.get("maxOutputTokens"),
        stop=cfg.get("stopSequences"),
    )


def _cache_point(target: pb.ContentPart | pb.Tool | None, block: dict[str, Any]) -> None:
    """A Converse cachePoint block marks the part (or tool) before it as a breakpoint."""
    if target is not None:
        ttl = str((block.get("cachePoint") or {}).get("ttl", ""))
        target.cache_control.ttl = {"5m": pb.CACHE_TTL_5M, "1h": pb.CACHE_TTL_1H}.get(
            ttl, pb.CACHE_TTL_UNSPECIFIED
        )


_BEDROCK_MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp",
                  "pdf": "application/pdf", "txt": "text/plain"}  # fmt: skip


def _bedrock_part(b: dict[str, Any]) -> pb.ContentPart | None:
    if "text" in b:
        return _text(b["text"])
    if "image" in b:
        img = b["image"]
        data = base64.b64decode((img.get("source") or {}).get("bytes", ""))
        return pb.ContentPart(image=pb.Image(data=data, media_type=_BEDROCK_MEDIA.get(img.get("format"), "")))
    if "document" in b:
        doc = b["document"]
        data = base64.b64decode((doc.get("source") or {}).get("bytes", ""))
        media = _BEDROCK_MEDIA.get(doc.get("format"), "application/pdf")
        return pb.ContentPart(document=pb.Document(data=data, media_type=media, title=doc.get("name", "")))
    if "reasoningContent" in b:
        rc = b["reasoningContent"]
        rt = rc.get("reasoningText") or {}
        r = pb.ReasoningPart(
            text=rt.get("text", ""),
            signature=rt.get("signature", ""),
            redacted_data=rc.get("redactedContent", ""),
            provider_type="bedrock",
        )
        return pb.ContentPart(reasoning=r)
    return None


def _from_bedrock(req: Request, body: dict[str, Any]) -> None:
    if "anthropic_version" in body:  # InvokeModel with an Anthropic body
        _from_anthropic(req, body)
        return
    if body.get("system"):
        sys_msg = pb.Message(role=pb.ROLE_SYSTEM)
        for b in body["system"]:
            if "cachePoint" in b:
                _cache_point(sys_msg.content[-1] if sys_msg.content else None, b)
            elif "text" in b:
                sys_msg.content.append(_text(b["text"]))
        req.messages.append(sys_msg)
    for m in body.get("messages") or []:
        msg = pb.Message(role=pb.ROLE_ASSISTANT if m["role"] == "assistant" else pb.ROLE_USER)
        results = []
        for b in m.get("content") or []:
            if "cachePoint" in b:
                _cache_point(msg.content[-1] if msg.content else None, b)
            elif "toolUse" in b:
                tu = b["toolUse"]
                msg.tool_calls.add(id=tu["toolUseId"], name=tu["name"], arguments=_args_text(tu.get("input")))
            elif "toolResult" in b:
                tr = b["toolResult"]
                out = "".join(x.get("text") or json.dumps(x.get("json")) for x in tr.get("content") or [])
                results.append(
                    pb.Message(
                        role=pb.ROLE_TOOL,
                        tool_call_id=tr["toolUseId"],
                        content=[_text(out)],
                        is_error=tr.get("status") == "error",
                    )
                )
            elif (part := _bedrock_part(b)) is not None:
                msg.content.append(part)
        req.messages.extend(results)
        if msg.content or msg.tool_calls:
            req.messages.append(msg)
    tool_config = body.get("toolConfig") or {}
    for t in tool_config.get("tools") or []:
        spec = t.get("toolSpec")
        if spec:
            schema = (spec.get("inputSchema") or {}).get("json")
            req.tools.append(
                pb.Tool(
                    name=spec["name"],
                    description=spec.get("description", ""),
                    parameters=_struct(schema),
                    strict=spec.get("strict") is True,
                )
            )
        elif "cachePoint" in t:
            _cache_point(req.tools[-1] if req.tools else None, t)
    choice = tool_config.get("toolChoice") or {}
    if "tool" in choice:
        req.tool_choice = pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_TOOL, tool_name=choice["tool"]["name"])
    elif choice:
        req.tool_choice = pb.ToolChoice(mode=_MODES[next(iter(choice))])
    cfg = body.get("inferenceConfig") or {}
    _params(
        req.params,
        temperature=cfg.get("temperature"),
        top_p=cfg.get("topP"),
        max_tokens=cfg.get("maxTokens"),
        stop=cfg.get("stopSequences"),
    )
    thinking = (body.get("additionalModelRequestFields") or {}).get("thinking") or {}
    if thinking.get("type") == "enabled":
        req.params.reasoning.budget_tokens = int(thinking.get("budget_tokens", 1024))


def _is_anthropic_body(body: dict[str, Any]) -> bool:
    return "anthropic_version" in body or (
        "max_tokens" in body and "messages" in body and "contents" not in body
    )


_MODEL_IN_URI = (
    re.compile(r"/models/([^/:]+)(?::|$)"),  # Gemini and Vertex: models/{model}:method
    re.compile(r"/model/([^/]+)/"),  # Bedrock: model/{id}/converse
    re.compile(r"/deployments/([^/]+)/"),  # Azure OpenAI deployments
)


def _model_in_uri(uri: str) -> str:
    path = urllib.parse.urlsplit(uri).path
    for rx in _MODEL_IN_URI:
        if m := rx.search(path):
            return urllib.parse.unquote(m.group(1))
    return ""


def request_for(case: C.Case, rec: dict[str, Any]) -> Request:
    """The broker request a caller would send for the recorded vendor request."""
    recorded = rec.get("request") or {}
    uri = str(recorded.get("uri") or "")
    body = dict(case.body if case.body is not None else recorded.get("body") or {})
    if case.edit is not None:
        body = case.edit(body)
    vendor = rec["vendor"]
    model = case.model or _model_in_uri(uri) or str(body.get("model") or "")
    if vendor == "azure_openai" and "/deployments/" not in uri:
        model = case.model or str(body.get("model") or "")
    last_segment = urllib.parse.urlsplit(uri).path.rsplit("/", 1)[-1].lower()
    if case.rpc is not None:
        rpc = case.rpc
    elif vendor == "ollama":
        rpc = "unary" if body.get("stream") is False else "stream"  # Ollama streams unless told not to
    else:
        rpc = "stream" if body.get("stream") is True or "stream" in last_segment else "unary"
    req = Request(model=model, rpc=rpc)
    if vendor in ("openai", "azure_openai"):
        _from_openai(req, body)
    elif vendor == "anthropic":
        _from_anthropic(req, body)
    elif vendor == "ollama":
        _from_ollama(req, body)
    elif vendor == "gemini":
        _from_gemini(req, body)
    elif vendor == "vertex":
        if _is_anthropic_body(body):
            _from_anthropic(req, body)
        else:
            _from_gemini(req, body, "vertex")
    elif vendor == "bedrock":
        _from_bedrock(req, body)
    else:
        raise AssertionError(f"{case.id}: unknown vendor {vendor!r}")
    return req


# --- the daemon's provider over the replay server -----------------------------------------------


def provider_config(case: C.Case, rec: dict[str, Any], url: str) -> dict[str, Any]:
    """The provider as an operator would configure it for this vendor (issue 15/16 names for the clouds)."""
    vendor = rec["vendor"]
    uri = str((rec.get("request") or {}).get("uri") or "")
    cfg: dict[str, Any] = {"name": PROVIDER, "type": vendor}
    if vendor == "openai":
        cfg.update(base_url=f"{url}/v1", api_key=KEY)
    elif vendor in ("anthropic", "gemini"):
        cfg.update(base_url=url, api_key=KEY)
    elif vendor == "ollama":
        cfg.update(base_url=url)
    elif vendor == "vertex":
        m = re.search(r"/projects/([^/]+)/locations/([^/]+)/", uri)
        project, location = m.groups() if m else ("my-project", "global")
        # A service account whose token endpoint is the replay server (answer_for: /token).
        cfg.update(
            base_url=url, project=project, location=location, credentials_file=str(vertex_key_file(url))
        )
    elif vendor == "bedrock":
        cfg.update(base_url=url, region="us-east-1")
    elif vendor == "azure_openai":
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)
        cfg.update(base_url=url, api_key=KEY)
        if "api-version" in query:
            cfg["api_version"] = query["api-version"][0]
        deployment = _model_in_uri(uri)
        body_model = ((rec.get("request") or {}).get("body") or {}).get("model")
        if deployment and body_model:
            cfg["deployments"] = {deployment: body_model}
    cfg.update(case.provider)
    return cfg


# --- what the replay server answers ---------------------------------------------------------------


def _segmenter(case: C.Case, wire: Wire) -> Callable[[], Segmenter | None]:
    if case.segment is not None:
        n = case.segment
        return lambda: Segmenter.at(list(range(n, len(wire.data), n)))
    return from_env


def _listing(vendor: str, model: str) -> dict[str, Any]:
    """Minimal valid discovery answers naming the case's model (capabilities left unsaid)."""
    if vendor == "anthropic":
        entry = {"id": model, "type": "model", "display_name": model, "created_at": "2025-01-01T00:00:00Z"}
        return {"/v1/models": {"data": [entry], "has_more": False, "first_id": model, "last_id": model}}
    if vendor == "ollama":
        tag = {
            "name": model,
            "model": model,
            "modified_at": "2025-01-01T00:00:00Z",
            "size": 0,
            "digest": "",
            "details": {},
        }
        return {
            "/api/tags": {"models": [tag]},
            "/api/show": {"modelfile": "", "parameters": "", "template": "", "details": {}, "model_info": {}},
        }
    if vendor == "bedrock":
        summary = {
            "modelId": model,
            "modelLifecycle": {"status": "ACTIVE"},
            "inferenceTypesSupported": ["ON_DEMAND"],
        }
        profile = {"inferenceProfileId": model, "status": "ACTIVE", "type": "SYSTEM_DEFINED"}
        return {
            "/foundation-models": {"modelSummaries": [summary]},
            "/inference-profiles": {"inferenceProfileSummaries": [profile]},
        }
    if vendor in ("gemini", "vertex"):
        return {
            "/models": {
                "models": [{"name": f"models/{model}", "supportedGenerationMethods": ["generateContent"]}]
            }
        }
    return {
        "/models": {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "replay"}],
        }
    }


def _listed(listing: dict[str, Any], req: Seen) -> Any:
    if "pageToken" in req.query:
        return {"models": []}  # one recorded page: the next one is empty
    for path, doc in listing.items():
        if req.path == path or (path.startswith("/") and req.path.endswith(path)):
            return doc
    return None


def answer_for(case: C.Case, rec: dict[str, Any], model: str) -> Callable[[Seen], Wire]:
    vendor = rec["vendor"]
    listing = dict(rec.get("listing") or _listing(vendor, model))
    if vendor == "ollama":
        listing.setdefault("/api/version", {"version": "0.12.0"})
    if vendor == "gemini" and rec.get("response") and case.kind == "discovery":
        listing = {"/models": json.loads(rec["response"]["body"])}  # the verbatim page
    chat = recorded_wire(rec) if rec.get("response") else json_wire(404, {"error": "no chat recorded"})
    chat.segmenter = _segmenter(case, chat)
    chat.pace_seconds = case.pace_seconds
    rejection = json_wire(400, C.GATEWAY_MAX_TOKENS_ERROR)
    rejection.segmenter = from_env

    def answer(req: Seen) -> Wire:
        if req.method == "GET" or req.path.endswith("/api/show"):
            doc = _listed(listing, req)
            if doc is None:
                return json_wire(
                    404, {"error": {"message": f"no {req.path} here", "type": "not_found_error"}}
                )
            wire = json_wire(200, doc)
            wire.segmenter = from_env
            return wire
        if case.gateway_rejects_max_tokens and "max_tokens" in (req.json() or {}):
            return rejection
        if vendor == "vertex" and req.path == TOKEN_PATH:
            return token_wire()
        return chat

    return answer


# --- Vertex's OAuth2 token, from the replay server ---------------------------------------------------

TOKEN_PATH = "/token"
_KEYS = tempfile.TemporaryDirectory(prefix="replay-vertex-")


@functools.cache
def _replay_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def vertex_key_file(url: str) -> Path:
    """A service account's key whose token_uri is the replay server: the daemon's vertex
    provider signs its JWT grant with it and gets recording vx-oauth-token's answer."""
    path = Path(_KEYS.name) / f"key-{urllib.parse.urlsplit(url).port}.json"
    key = {
        "type": "service_account",
        "project_id": "my-project",
        "private_key_id": "replay",
        "private_key": _replay_key_pem(),
        "client_email": "replay@my-project.iam.gserviceaccount.com",
        "token_uri": f"{url}{TOKEN_PATH}",
    }
    path.write_text(json.dumps(key))
    return path


def token_wire() -> Wire:
    """The token endpoint's recorded answer (vx-oauth-token), as recorded."""
    wire = recorded_wire(load("vx-oauth-token"))
    wire.segmenter = from_env
    return wire


def chat_requests(server: ReplayServer) -> list[Seen]:
    return [
        r for r in server.requests if r.method == "POST" and not r.path.endswith(("/api/show", TOKEN_PATH))
    ]


# --- one case through the daemon ------------------------------------------------------------------


@dataclass
class Observed:
    code: str = "OK"
    reason: str = ""
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_delay: float | None = None
    kinds: list[str] = field(default_factory=list)  # stream message kinds, in order
    text: str = ""
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (id, name, arguments)
    finish: str = ""
    usage: tuple[int, int, int] | None = None
    estimated: bool = False  # Usage.estimated
    models: dict[str, pb.ModelInfo] = field(default_factory=dict)
    # Reasoning blocks in order: (text, signature, redacted data), from deltas or parts.
    reasoning: list[tuple[str, str, str]] = field(default_factory=list)
    reasoning_tokens: int = 0
    cache_write: tuple[int, int] = (0, 0)  # (cache_write_input_tokens, of which 1h)
    refusal: tuple[str, str] | None = None  # (explanation, category)
    provider_type: str = ""

    def summary(self) -> str:
        """What the daemon answered, for a failure message the lead can act on."""
        lines = [f"status: {self.code}" + (f" {self.reason}" if self.reason else "")]
        if self.message:
            lines.append(f"message: {self.message}")
        if self.metadata:
            lines.append(f"ErrorInfo.metadata: {self.metadata}")
        if self.kinds:
            lines.append(f"stream: {_compress(self.kinds)}")
        if self.text:
            lines.append(f"text: {self.text!r}")
        for i, (rtext, sig, data) in enumerate(self.reasoning):
            lines.append(f"reasoning[{i}]: text={rtext[:80]!r} signature={sig[:16]!r} redacted={data[:16]!r}")
        if self.refusal is not None:
            lines.append(f"refusal: {self.refusal}")
        for call in self.calls:
            lines.append(f"tool call: id={call[0]!r} name={call[1]!r} arguments={call[2]!r}")
        if self.finish:
            lines.append(f"finish: {self.finish}")
        if self.usage is not None:
            u = self.usage
            est = " (estimated)" if self.estimated else ""
            lines.append(f"usage: input={u[0]} output={u[1]} cached={u[2]}{est}")
        for mid, m in sorted(self.models.items()):
            caps = sorted(pb.Capability.Name(c).removeprefix("CAPABILITY_") for c in m.capabilities)
            lines.append(
                f"model: {mid} context_window={m.context_window} max_output_tokens={m.max_output_tokens} "
                f"capabilities={caps} discovered={m.discovered} source={m.source}"
            )
        return "\n".join(lines)


def _compress(kinds: list[str]) -> str:
    out: list[str] = []
    for k in kinds:
        if out and out[-1].split(" x")[0] == k:
            n = int(out[-1].split(" x")[1]) + 1 if " x" in out[-1] else 2
            out[-1] = f"{k} x{n}"
        else:
            out.append(k)
    return ", ".join(out)


def _fill_error(obs: Observed, err: grpc.aio.AioRpcError) -> None:
    obs.code = err.code().name
    obs.message = err.details() or ""
    st = rpc_status.from_call(err)
    for d in st.details if st is not None else ():
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            obs.reason, obs.metadata = info.reason, dict(info.metadata)
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            d.Unpack(ri)
            obs.retry_delay = ri.retry_delay.ToTimedelta().total_seconds()


def _calls_from_deltas(deltas: list[pb.ToolCallDelta]) -> list[tuple[str, str, str]]:
    by_index: dict[int, list[str]] = {}
    for d in deltas:
        entry = by_index.setdefault(d.index, ["", "", ""])
        entry[0] = entry[0] or d.id
        entry[1] = entry[1] or d.name
        entry[2] += d.arguments_delta
    return [(e[0], e[1], e[2]) for e in by_index.values()]


def _usage(u: pb.Usage) -> tuple[int, int, int]:
    return (u.input_tokens, u.output_tokens, u.cached_input_tokens)


def _more_usage(obs: Observed, u: pb.Usage) -> None:
    obs.reasoning_tokens = u.reasoning_tokens
    obs.cache_write = (u.cache_write_input_tokens, u.cache_write_1h_input_tokens)


async def call_daemon(target_stub: Any, req: pb.StreamCompleteRequest | pb.CompleteRequest) -> Observed:
    obs = Observed()
    if isinstance(req, pb.CompleteRequest):
        try:
            resp = await target_stub.Complete(req, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            _fill_error(obs, err)
            return obs
        obs.text = "".join(p.text for p in resp.message.content)
        obs.reasoning = [
            (p.reasoning.text, p.reasoning.signature, p.reasoning.redacted_data)
            for p in resp.message.content
            if p.WhichOneof("part") == "reasoning"
        ]
        obs.provider_type = next(
            (p.reasoning.provider_type for p in resp.message.content if p.WhichOneof("part") == "reasoning"),
            "",
        )
        obs.calls = [(c.id, c.name, c.arguments) for c in resp.message.tool_calls]
        obs.finish = pb.FinishReason.Name(resp.finish_reason).removeprefix("FINISH_REASON_")
        obs.usage, obs.estimated = _usage(resp.usage), getattr(resp.usage, "estimated", False)
        _more_usage(obs, resp.usage)
        if resp.HasField("refusal"):
            obs.refusal = (resp.refusal.explanation, resp.refusal.category)
        return obs
    deltas: list[pb.ToolCallDelta] = []
    try:
        async for m in target_stub.StreamComplete(req, timeout=RPC_TIMEOUT):
            kind = str(m.WhichOneof("event"))
            obs.kinds.append(kind)
            if kind == "text_delta":
                obs.text += m.text_delta.text
            elif kind == "reasoning_delta":
                r = m.reasoning_delta
                if r.index >= len(obs.reasoning):
                    obs.reasoning.extend([("", "", "")] * (r.index + 1 - len(obs.reasoning)))
                t, sig, data = obs.reasoning[r.index]
                obs.reasoning[r.index] = (t + r.text, sig + r.signature, data + r.redacted_data)
            elif kind == "start":
                obs.provider_type = m.start.provider_type
            elif kind == "tool_call_delta":
                deltas.append(m.tool_call_delta)
            elif kind == "end":
                obs.finish = pb.FinishReason.Name(m.end.finish_reason).removeprefix("FINISH_REASON_")
                obs.usage, obs.estimated = _usage(m.end.usage), getattr(m.end.usage, "estimated", False)
                _more_usage(obs, m.end.usage)
                if m.end.HasField("refusal"):
                    obs.refusal = (m.end.refusal.explanation, m.end.refusal.category)
    except grpc.aio.AioRpcError as err:
        _fill_error(obs, err)
    obs.calls = _calls_from_deltas(deltas)
    return obs


@dataclass
class Run:
    observed: Observed
    server: ReplayServer


class MissingProviderType(Exception):
    """The recording's vendor has no provider type yet: the expected gap of its row (xfail)."""


async def run(case: C.Case, daemon: Any, channel_to: Any) -> Run:
    """Serve the case's recording, configure a daemon over it and make the caller's request."""
    rec = load(case.source)
    req = request_for(case, rec) if case.kind == "chat" else None  # converted even for a gap row
    if rec["vendor"] not in provider_types():
        raise MissingProviderType(
            f"no {rec['vendor']} provider type (accepted: {', '.join(provider_types())})"
        )
    model = req.model if req is not None else ""
    with aws_env() if rec["vendor"] == "bedrock" else contextlib.nullcontext():
        return await _serve(case, rec, req, model, daemon, channel_to)


# What a bedrock provider signs with in a replay: the environment's credentials (the chain's
# first source), never a profile file, and no instance-metadata lookup off this machine.
AWS_REPLAY_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDREPLAY0000000001",
    "AWS_SECRET_ACCESS_KEY": "replay/secret+key0123456789abcdefghijklm",
    "AWS_SESSION_TOKEN": "replay-session-token",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


@contextlib.contextmanager
def aws_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in (*AWS_REPLAY_ENV, "AWS_PROFILE")}
    os.environ.update(AWS_REPLAY_ENV)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _serve(
    case: C.Case, rec: dict[str, Any], req: Request | None, model: str, daemon: Any, channel_to: Any
) -> Run:
    async with ReplayServer(answer_for(case, rec, model)) as server:
        settings = broker_settings([provider_config(case, rec, server.url)], health=HEALTH, routing=ROUTING)
        _, target = await daemon(settings)
        s = stub(channel_to(target))
        if req is None:
            obs = Observed()
            listed = await s.ListModels(pb.ListModelsRequest(provider=PROVIDER), timeout=RPC_TIMEOUT)
            obs.models = {m.id: m for m in listed.models}
        else:
            obs = await call_daemon(s, req.proto(f"{PROVIDER}/{req.model}"))
    return Run(obs, server)


# --- expectations -----------------------------------------------------------------------------------


def _dig(doc: Any, dotted: str) -> Any:
    node = doc
    for key in dotted.split("."):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return C.ABSENT
    return node


def _text_problems(want: str | C.Long, got: str) -> list[str]:
    if isinstance(want, str):
        return [] if got == want else [f"text: expected {want!r}, got {got!r}"]
    if len(got) == want.chars and got.startswith(want.start) and got.endswith(want.end):
        if hashlib.sha256(got.encode()).hexdigest() == want.sha256:
            return []
    return [f"text: expected {want.chars} chars from {want.start!r} to {want.end!r}, got {len(got)}: {got!r}"]


def mismatches(case: C.Case, run_: Run) -> list[str]:
    e, obs = case.expect, run_.observed
    problems: list[str] = []
    status = "OK" if obs.code == "OK" else f"{obs.code} {obs.reason}"
    if e.error is not None:
        if status != e.error:
            problems.append(f"status: expected {e.error}, got {status}")
        for part in e.message_has:
            if part not in obs.message:
                problems.append(f"status message: expected it to contain {part!r}")
        for k, v in e.error_metadata.items():
            if obs.metadata.get(k) != v:
                problems.append(f"ErrorInfo.metadata[{k!r}]: expected {v!r}, got {obs.metadata.get(k)!r}")
        if e.retry_delay is not None and (
            obs.retry_delay is None or abs(obs.retry_delay - e.retry_delay) > 1
        ):
            problems.append(f"RetryInfo: expected ~{e.retry_delay}s, got {obs.retry_delay}")
        if e.delivered is not None and obs.text != e.delivered:
            problems.append(f"text before the error: expected {e.delivered!r}, got {obs.text!r}")
        elif e.delivered is None and obs.text and case.kind == "chat":
            problems.append(f"text before the error: expected none, got {obs.text!r}")
    elif case.kind == "chat":
        if status != "OK":
            problems.append(f"status: expected OK, got {status}")
        problems += _text_problems(e.text, obs.text)
        want_calls = [(c.id, c.name, c.arguments) for c in e.calls]
        got_calls = []
        for cid, name, args in obs.calls:
            try:
                parsed: Any = json.loads(args)
            except ValueError:
                parsed = f"<not JSON: {args!r}>"
            got_calls.append((cid, name, parsed))
        if len(got_calls) != len(want_calls) or any(
            (w[0] is not None and w[0] != g[0]) or (w[0] is None and not g[0]) or w[1:] != g[1:]
            for w, g in zip(want_calls, got_calls, strict=False)
        ):
            problems.append(f"tool calls (id, name, arguments): expected {want_calls}, got {got_calls}")
        if e.finish is not None and obs.finish != e.finish:
            problems.append(f"finish: expected {e.finish}, got {obs.finish or 'none'}")
        if e.usage == C.ESTIMATED:
            if not obs.estimated:
                problems.append(
                    f"usage: the vendor reported none, so it must be marked estimated; got {obs.usage}"
                )
        elif isinstance(e.usage, C.Usage):
            want = (e.usage.input, e.usage.output, e.usage.cached)
            if obs.usage != want:
                problems.append(f"usage (input, output, cached): expected {want}, got {obs.usage}")
            if obs.estimated:
                problems.append("usage: marked estimated, but the vendor reported it")
    if e.reasoning is not None and e.reasoning in obs.text:
        problems.append(f"reasoning leaked into the answer text: {e.reasoning!r}")
    problems += _reasoning_problems(e, obs)
    calls = chat_requests(run_.server)
    if case.kind == "chat" and e.upstream_calls is not None and len(calls) != e.upstream_calls:
        problems.append(f"upstream chat requests: expected {e.upstream_calls}, got {len(calls)}")
    if e.sent:
        body = calls[-1].json() if calls else None
        for path, want in e.sent.items():
            got = _dig(body, path)
            if got != want:
                problems.append(f"sent {path}: expected {want!r}, got {got!r}")
    for m in e.models:
        info = obs.models.get(m.id)
        if info is None:
            problems.append(f"ListModels: {m.id} missing (got {sorted(obs.models)})")
            continue
        if not info.discovered:
            problems.append(f"ListModels: {m.id} not marked discovered")
        if m.context_window is not None and info.context_window != m.context_window:
            problems.append(f"{m.id}.context_window: expected {m.context_window}, got {info.context_window}")
        if m.max_output_tokens is not None and info.max_output_tokens != m.max_output_tokens:
            problems.append(
                f"{m.id}.max_output_tokens: expected {m.max_output_tokens}, got {info.max_output_tokens}"
            )
        if m.capabilities is not None:
            caps = {pb.Capability.Name(c).removeprefix("CAPABILITY_") for c in info.capabilities}
            if caps != m.capabilities:
                problems.append(f"{m.id}.capabilities: expected {sorted(m.capabilities)}, got {sorted(caps)}")
    for mid in e.models_absent:
        if mid in obs.models:
            problems.append(f"ListModels: {mid} is listed but is not a chat model")
    if case.kind == "discovery" and case.source.endswith("-docs") and e.models:
        extra = set(obs.models) - {m.id for m in e.models}
        if extra:
            problems.append(f"ListModels: not in the listing: {sorted(extra)}")
    return problems


def _reasoning_problems(e: C.Expect, obs: Observed) -> list[str]:
    """Reasoning, refusal and the newer usage fields, exactly as the row writes them out."""
    problems: list[str] = []
    if e.thought is not None:
        got = [(t, _digest(sig), _digest(data)) for t, sig, data in obs.reasoning]
        want = [(b.text, b.signature, b.redacted) for b in e.thought]
        if got != want:
            problems.append(f"reasoning blocks (text, signature, redacted data): expected {want}, got {got}")
        if e.thought and obs.provider_type != e.provider_type:
            problems.append(f"provider_type: expected {e.provider_type!r}, got {obs.provider_type!r}")
    if e.refusal is not None and obs.refusal != e.refusal:
        problems.append(f"refusal (explanation, category): expected {e.refusal}, got {obs.refusal}")
    if e.reasoning_tokens is not None and obs.reasoning_tokens != e.reasoning_tokens:
        problems.append(f"usage.reasoning_tokens: expected {e.reasoning_tokens}, got {obs.reasoning_tokens}")
    if e.cache_write is not None and obs.cache_write != e.cache_write:
        problems.append(f"usage cache writes (all, 1h): expected {e.cache_write}, got {obs.cache_write}")
    return problems


def _digest(value: str) -> str:
    """A signature or redacted block as the row writes it: its length and SHA-256 prefix."""
    if not value:
        return ""
    return f"{len(value)}:{hashlib.sha256(value.encode()).hexdigest()[:16]}"


# --- asserted gaps ------------------------------------------------------------------------------------


def provider_types() -> tuple[str, ...]:
    return kinds.names()


def open_gaps(gap: C.Gap) -> list[str]:
    """Which of the gap's `absent` API names exist now (each one closes the gap: update the row)."""
    closed = []
    for name in gap.absent:
        scope, _, what = name.partition(":")
        if scope == "provider_type":
            if what in provider_types():
                closed.append(f"provider type {what!r} exists now")
        elif scope == "ModelBroker":
            methods = [m.name for m in pb.DESCRIPTOR.services_by_name["ModelBroker"].methods]
            if what in methods:
                closed.append(f"the {what} RPC exists now")
        else:
            fields = [f.name for f in pb.DESCRIPTOR.message_types_by_name[scope].fields]
            hits = [f for f in fields if what in f]
            if hits:
                closed.append(f"{scope} has {hits} now")
    return closed
