"""A fake Anthropic Messages API on loopback, byte-faithful where the broker can tell.

Streams `POST /v1/messages` the way api.anthropic.com does (event names, compact JSON,
`{"type": "ping"}` with its space, `partial_json` starting with ""), answers the whole
message when `stream` is false, lists models with Anthropic's pagination, and validates
what the real API rejects cheaply (key, version header, required fields, extra fields,
unknown model, tool_use without tool_result). A `Reply` says what to answer and each
`Fault` in `faults` (first in, first out; one per request) says how to fail instead.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass
from typing import Any

from tests.fakes.http import FakeHTTPServer, Request, Response, sse
from tests.fakes.script import Fault, Reply

DEFAULT_MODELS = ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_DEFAULT_MESSAGES = {
    400: "Invalid request",
    401: "invalid x-api-key",
    402: "Your credit balance is too low to access the Anthropic API.",
    403: "Your API key does not have permission to use the specified resource.",
    404: "Not found",
    413: "Request exceeds the maximum allowed number of bytes.",
    429: "Number of request tokens has exceeded your per-minute rate limit",
    500: "Internal server error",
    504: "Request timed out",
    529: "Overloaded",
}
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
# Top-level fields the Messages API accepts; anything else is "Extra inputs are not permitted".
_KNOWN_FIELDS = {
    "model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k", "stop_sequences",
    "stream", "metadata", "tools", "tool_choice", "thinking", "service_tier", "container",
    "mcp_servers", "context_management",
}  # fmt: skip
_TOOL_RESULT_MESSAGE = (
    "messages.{i}: Messages following tool_use blocks must begin with a matching number of tool_result blocks"
)
_ids = itertools.count(1)


@dataclass
class _CountingServer(FakeHTTPServer):
    accepted: int = 0

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await super()._on_conn(reader, writer)


class FakeAnthropic:
    def __init__(
        self, *, api_key: str = "sk-ant-fake-0123456789", models: list[str] | None = None, port: int = 0
    ) -> None:
        self.api_key = api_key
        self.models = list(DEFAULT_MODELS if models is None else models)
        self.reply = Reply()
        self.faults: list[Fault] = []
        # Prompt-cache writes have no neutral Reply field; set here to exercise that usage path.
        self.cache_creation_input_tokens = 0
        # Extended thinking (no neutral Reply field either): a thinking block before the
        # answer, one thinking_delta per chunk `thinking_delay` seconds apart, then its
        # signature_delta, as the API streams it with `thinking` enabled (recording an-thinking).
        self.thinking_chunks: list[str] = []
        self.thinking_delay = 0.0
        self.server = _CountingServer(self._handle, port=port)

    @property
    def url(self) -> str:
        """The base URL as Anthropic's SDK takes it: the host, without /v1."""
        return self.server.url

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (1 for many requests: the client pools)."""
        return self.server.accepted

    @property
    def message_bodies(self) -> list[Any]:
        return [r.json() for r in self.requests if r.method == "POST" and r.path == "/v1/messages"]

    async def start(self) -> FakeAnthropic:
        await self.server.start()  # the same port again after stop()
        return self

    async def stop(self) -> None:
        """Stop listening and drop every connection, as a crashed upstream would."""
        await self.server.stop()

    async def __aenter__(self) -> FakeAnthropic:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- dispatch --------------------------------------------------------------------------

    async def _handle(self, req: Request, resp: Response) -> None:
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            if fault.kind == "status":
                return await self._error(resp, fault.status, fault.message, fault.error_type, fault.headers)
            if fault.kind == "reset_before_headers":
                return resp.abort()
            if fault.kind == "stall_before_headers":
                await asyncio.sleep(fault.seconds)
                fault = None
        if req.headers.get("x-api-key") != self.api_key:
            return await self._error(resp, 401, "invalid x-api-key")
        if not req.headers.get("anthropic-version"):
            return await self._error(resp, 400, "anthropic-version: header is required")
        if req.method == "GET" and req.path == "/v1/models":
            return await self._send_doc(resp, self._models_page(req.query), fault)
        if req.method == "POST" and req.path == "/v1/messages":
            return await self._messages(req, resp, fault)
        await self._error(resp, 404, "Not found")

    async def _messages(self, req: Request, resp: Response, fault: Fault | None) -> None:
        try:
            body = req.json()
        except ValueError:
            return await self._error(resp, 400, "There was an error parsing the body.")
        problem = _validate(body) if isinstance(body, dict) else "body: Input should be an object"
        if problem:
            return await self._error(resp, 400, problem)
        if body["model"] not in self.models:
            return await self._error(resp, 404, f"model: {body['model']}")
        if body.get("stream"):
            return await self._stream(resp, self.reply, body["model"], fault)
        await self._send_doc(resp, self._whole_message(self.reply, body["model"]), fault)

    # --- answers ---------------------------------------------------------------------------

    def _usage(self, reply: Reply, output_tokens: int) -> dict[str, Any]:
        # The neutral input count includes cached tokens; Anthropic's input_tokens does not.
        cache_write = self.cache_creation_input_tokens
        return {
            "input_tokens": max(reply.input_tokens - reply.cached_input_tokens - cache_write, 0),
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": reply.cached_input_tokens,
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }

    def _whole_message(self, reply: Reply, model: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
        for call in reply.tool_calls:
            content.append(
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.name,
                    "input": json.loads(call.arguments or "{}"),
                }
            )
        return {
            "id": f"msg_{next(_ids):024d}",
            "type": "message",
            "role": "assistant",
            "model": reply.model or model,
            "content": content,
            "stop_reason": _STOP_REASONS.get(reply.finish, reply.finish),
            "stop_sequence": None,
            "usage": self._usage(reply, reply.output_tokens),
        }

    def _stream_events(self, reply: Reply, model: str) -> list[tuple[bytes, bool]]:
        """The SSE events of a reply, each flagged whether it is a content delta."""
        start = {**self._whole_message(reply, model), "content": [], "stop_reason": None}
        start["usage"] = self._usage(reply, 1)
        out: list[tuple[bytes, bool]] = [
            (sse({"type": "message_start", "message": start}, "message_start"), False)
        ]
        ping = (sse('{"type": "ping"}', "ping"), False)
        index = 0
        if self.thinking_chunks:
            out.append(_block_start(index, {"type": "thinking", "thinking": "", "signature": ""}))
            out.append(ping)
            for chunk in self.thinking_chunks:
                out.append((_delta(index, {"type": "thinking_delta", "thinking": chunk})[0], False))
            signature = {"type": "signature_delta", "signature": "EqQBCkgIARABGAIiQL2fake0signature"}
            out.append((_delta(index, signature)[0], False))
            out.append(_block_stop(index))
            index += 1
        if reply.text_chunks:
            out.append(_block_start(index, {"type": "text", "text": ""}))
            out.append(ping)
            for chunk in reply.text_chunks:
                out.append(_delta(index, {"type": "text_delta", "text": chunk}))
            out.append(_block_stop(index))
            index += 1
        else:
            out.append(ping)
        for call in reply.tool_calls:
            out.append(
                _block_start(index, {"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
            )
            for fragment in ["", *call.argument_chunks]:  # the API opens with an empty fragment
                out.append(_delta(index, {"type": "input_json_delta", "partial_json": fragment}))
            out.append(_block_stop(index))
            index += 1
        delta = {"stop_reason": _STOP_REASONS.get(reply.finish, reply.finish), "stop_sequence": None}
        usage = {"output_tokens": reply.output_tokens}
        out.append((sse({"type": "message_delta", "delta": delta, "usage": usage}, "message_delta"), False))
        out.append((sse({"type": "message_stop"}, "message_stop"), False))
        return out

    async def _stream(self, resp: Response, reply: Reply, model: str, fault: Fault | None) -> None:
        events = self._stream_events(reply, model)
        await resp.start_stream(200, content_type="text/event-stream; charset=utf-8", headers=_headers())
        cut = fault is not None and fault.kind == "no_terminator"
        pending = None if cut else fault
        sent = 0
        for data, is_content in events:
            if cut and data.startswith(b"event: message_stop"):
                break
            # A fault strikes before the next content delta once `after_chunks` were sent
            # (or before message_delta when the reply has fewer).
            at_fault_point = is_content or data.startswith(b"event: message_delta")
            if pending is not None and at_fault_point and sent >= pending.after_chunks:
                if await self._mid_stream_fault(resp, pending):
                    return
                pending = None
            await resp.write(data)
            if is_content:
                sent += 1
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
            elif self.thinking_delay and b'"thinking_delta"' in data:
                await asyncio.sleep(self.thinking_delay)
        await resp.end()
        if cut:
            await resp.close()

    async def _mid_stream_fault(self, resp: Response, fault: Fault) -> bool:
        """Fail mid-stream; True when the response is over."""
        if fault.kind == "stall_mid_stream":
            await asyncio.sleep(fault.seconds)
            return False  # a stalled server that comes back carries on where it was
        if fault.kind == "disconnect_mid_stream":
            resp.abort()
            return True
        if fault.kind == "malformed":
            await resp.write(
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta"\n\n'
            )
        elif fault.kind == "error_event":
            error = {"type": fault.error_type or "overloaded_error", "message": fault.message or "Overloaded"}
            await resp.write(sse({"type": "error", "error": error}, "error"))
        else:
            return False
        await resp.end()
        return True

    async def _send_doc(self, resp: Response, doc: Any, fault: Fault | None) -> None:
        """A whole JSON answer; the mid-stream faults cut or spoil its body instead."""
        data = json.dumps(doc).encode()
        if fault is None or fault.kind == "error_event":
            if fault is not None:
                return await self._error(resp, 529, fault.message, fault.error_type)
            return await resp.send(200, data, headers=_headers())
        if fault.kind == "malformed":
            return await resp.send(200, data[: len(data) // 2], headers=_headers())
        # Declare the full length, send half: the client is left waiting for the rest.
        await resp.send(200, data[: len(data) // 2], headers={**_headers(), "content-length": str(len(data))})
        if fault.kind == "stall_mid_stream":
            await asyncio.sleep(fault.seconds)
        if fault.kind == "disconnect_mid_stream":
            resp.abort()
        else:
            await resp.close()

    async def _error(
        self,
        resp: Response,
        status: int,
        message: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        kind = error_type or _ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        hdrs = _headers()
        if status == 429:
            hdrs["retry-after"] = "3"
        hdrs.update(headers or {})
        body = {
            "type": "error",
            "error": {"type": kind, "message": message or _DEFAULT_MESSAGES.get(status, "Error")},
            "request_id": hdrs["request-id"],
        }
        await resp.send(status, body, headers=hdrs)

    def _models_page(self, query: str) -> dict[str, Any]:
        params = dict(p.partition("=")[::2] for p in query.split("&") if p)
        limit = max(1, min(int(params.get("limit") or 20), 1000))
        start = 0
        if params.get("after_id") in self.models:
            start = self.models.index(params["after_id"]) + 1
        page = self.models[start : start + limit]
        data = [
            {
                "type": "model",
                "id": name,
                "display_name": name.replace("-", " ").title(),
                "created_at": "2025-09-29T00:00:00Z",
                "max_input_tokens": 200000,
                "max_tokens": 64000,
            }
            for name in page
        ]
        return {
            "data": data,
            "has_more": start + limit < len(self.models),
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }


def _headers() -> dict[str, str]:
    return {"request-id": f"req_{next(_ids):024d}"}


def _block_start(index: int, block: dict[str, Any]) -> tuple[bytes, bool]:
    payload = {"type": "content_block_start", "index": index, "content_block": block}
    return sse(payload, "content_block_start"), False


def _delta(index: int, delta: dict[str, Any]) -> tuple[bytes, bool]:
    return sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta"), True


def _block_stop(index: int) -> tuple[bytes, bool]:
    return sse({"type": "content_block_stop", "index": index}, "content_block_stop"), False


def _validate(body: dict[str, Any]) -> str | None:
    """The first problem the real API would report, in its words, or None."""
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            return f"{name}: Field required"
    for name in body:
        if name not in _KNOWN_FIELDS:
            return f"{name}: Extra inputs are not permitted"
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not 0 <= temperature <= 1:
        return "temperature: Input should be less than or equal to 1"
    messages = body["messages"]
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if content in ("", []) and not (i + 1 == len(messages) and msg.get("role") == "assistant"):
            return (
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        if msg.get("role") != "assistant" or not isinstance(content, list):
            continue
        uses = [b.get("id") for b in content if b.get("type") == "tool_use"]
        if not uses:
            continue
        if i + 1 == len(messages):
            continue  # a trailing assistant turn is a prefill, not a conversation yet
        following = messages[i + 1].get("content")
        following = following if isinstance(following, list) else []
        results = [b.get("tool_use_id") for b in following[: len(uses)] if b.get("type") == "tool_result"]
        if messages[i + 1].get("role") != "user" or sorted(results) != sorted(uses):
            return _TOOL_RESULT_MESSAGE.format(i=i + 1)
    return None
