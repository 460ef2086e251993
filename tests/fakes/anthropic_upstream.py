"""A fake Anthropic Messages API on loopback, byte-faithful where the broker can tell.

Streams `POST /v1/messages` the way api.anthropic.com does (event names, compact JSON,
`{"type": "ping"}` with its space, `partial_json` starting with ""), answers the whole
message when `stream` is false, lists models with Anthropic's pagination, and validates
what the real API rejects cheaply (key, version header, required fields, extra fields,
unknown model, tool_use without tool_result). A `Reply` says what to answer and each
`Fault` in `faults` (first in, first out; one per request) says how to fail instead.

The 2026 surface, as the recordings show it (an-thinking, an-adaptive-thinking,
an-redacted-thinking, an-refusal, an-thinking-tool-cache): thinking blocks streamed as
thinking_delta pieces and one signature_delta, redacted_thinking blocks whole, a refusal's
stop_details, usage with cache_creation and output_tokens_details.thinking_tokens. The fake
signs the thinking it sends (an HMAC of the text) and remembers the redacted data it made,
so a request that sends thinking back edited, foreign or re-encoded gets the API's 400; the
thinking, sampling, tool_choice and cache_control rules are checked as the API does
(`tests/fakes/anthropic_checks.py`). Every request body is kept (`message_bodies`, and the raw
bytes in `requests`) for tests to assert exactly what went out.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.anthropic_checks import Signatures, validate
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


@dataclass
class Thinking:
    """A thinking block: its text as thinking_delta pieces, then one signature_delta."""

    chunks: list[str]
    # None: the fake signs the text (an HMAC it checks when the block comes back).
    signature: str | None = None
    # Sonnet 4 opens the block without the signature key (recording an-thinking-tool-cache).
    signature_key_in_start: bool = True

    @property
    def text(self) -> str:
        return "".join(self.chunks)


@dataclass
class RedactedThinking:
    """A redacted_thinking block: whole in content_block_start, no deltas (an-redacted-thinking)."""

    data: str | None = None  # None: the fake makes up opaque data (and accepts it back)


@dataclass
class _Answer:
    """One reply rendered: the blocks in order, with the signatures made for this request."""

    blocks: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[list[str]] = field(default_factory=list)  # the streamed pieces per block
    no_signature_key: set[int] = field(default_factory=set)  # thinking opened without "signature"


_ADAPTIVE_ONLY = (
    '"thinking.type.enabled" is not supported for this model. Use "thinking.type.adaptive" and '
    '"output_config.effort" to control thinking behavior.'
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
        # Of those, written with the one-hour TTL (usage.cache_creation.ephemeral_1h_input_tokens).
        self.cache_creation_1h_input_tokens = 0
        # Reasoning (no neutral Reply field either): blocks before the answer's text, each
        # thinking_delta `thinking_delay` seconds apart, as the API streams them with thinking
        # on (recordings an-thinking, an-redacted-thinking). `thinking_chunks` is one signed
        # Thinking block, kept for the suites that only need some thinking.
        self.reasoning: list[Thinking | RedactedThinking] = []
        self.thinking_chunks: list[str] = []
        self.thinking_delay = 0.0
        # A text block before the reasoning, as adaptive thinking may start (an-adaptive-thinking).
        self.leading_text_chunks: list[str] = []
        # usage.output_tokens_details.thinking_tokens in message_delta (None: not reported).
        self.thinking_tokens: int | None = None
        # message_delta.delta.stop_details (a refusal's {"type","category","explanation"}).
        self.stop_details: dict[str, Any] | None = None
        # Models that reject thinking.type "enabled" (Opus 4.7, Claude 5, Fable), when listed.
        self.adaptive_only = {"claude-opus-4-7", "claude-fable-5-1", "claude-sonnet-5"}
        self.signatures = Signatures()
        # The content blocks of every answer sent, in order (thinking with its signature).
        self.answers: list[list[dict[str, Any]]] = []
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
        """Every `POST /v1/messages` body received, parsed (the raw bytes: `message_raw_bodies`)."""
        return [r.json() for r in self.requests if r.method == "POST" and r.path == "/v1/messages"]

    @property
    def message_raw_bodies(self) -> list[bytes]:
        return [r.body for r in self.requests if r.method == "POST" and r.path == "/v1/messages"]

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
        problem = (
            validate(body, self.signatures) if isinstance(body, dict) else "body: Input should be an object"
        )
        if problem:
            return await self._error(resp, 400, problem)
        if body["model"] not in self.models:
            return await self._error(resp, 404, f"model: {body['model']}")
        thinking = body.get("thinking") or {}
        if body["model"] in self.adaptive_only and thinking.get("type") == "enabled":
            return await self._error(resp, 400, _ADAPTIVE_ONLY)
        if body.get("stream"):
            return await self._stream(resp, self.reply, body["model"], fault)
        await self._send_doc(resp, self._whole_message(self.reply, body["model"]), fault)

    # --- answers ---------------------------------------------------------------------------

    def _usage(self, reply: Reply, output_tokens: int, *, final: bool = False) -> dict[str, Any]:
        # The neutral input count includes cached tokens; Anthropic's input_tokens does not.
        cache_write = self.cache_creation_input_tokens
        one_hour = self.cache_creation_1h_input_tokens
        usage: dict[str, Any] = {
            "input_tokens": max(reply.input_tokens - reply.cached_input_tokens - cache_write, 0),
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": reply.cached_input_tokens,
        }
        if not final:  # message_start and whole messages carry the TTL split (an-thinking)
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": cache_write - one_hour,
                "ephemeral_1h_input_tokens": one_hour,
            }
        usage["output_tokens"] = output_tokens
        if final and self.thinking_tokens is not None:
            usage["output_tokens_details"] = {"thinking_tokens": self.thinking_tokens}
        if not final:
            usage["service_tier"] = "standard"
        return usage

    def _answer(self, reply: Reply) -> _Answer:
        """The reply's content blocks in order; thinking signed now, so each request's are fresh."""
        out = _Answer()
        if self.leading_text_chunks:
            out.blocks.append({"type": "text", "text": "".join(self.leading_text_chunks)})
            out.chunks.append(self.leading_text_chunks)
        reasoning = list(self.reasoning) or ([Thinking(self.thinking_chunks)] if self.thinking_chunks else [])
        for block in reasoning:
            if isinstance(block, RedactedThinking):
                out.blocks.append({"type": "redacted_thinking", "data": self.signatures.redacted(block.data)})
                out.chunks.append([])
                continue
            signature = self.signatures.sign(block.text, block.signature)
            if not block.signature_key_in_start:
                out.no_signature_key.add(len(out.blocks))
            out.blocks.append({"type": "thinking", "thinking": block.text, "signature": signature})
            out.chunks.append(block.chunks)
        if reply.text_chunks:
            out.blocks.append({"type": "text", "text": reply.text})
            out.chunks.append(reply.text_chunks)
        for call in reply.tool_calls:
            out.blocks.append(
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.name,
                    "input": json.loads(call.arguments or "{}"),
                }
            )
            out.chunks.append(call.argument_chunks)
        self.answers.append(out.blocks)
        return out

    def _whole_message(self, reply: Reply, model: str, answer: _Answer | None = None) -> dict[str, Any]:
        answer = answer or self._answer(reply)
        usage = self._usage(reply, reply.output_tokens)
        if self.thinking_tokens is not None:
            usage["output_tokens_details"] = {"thinking_tokens": self.thinking_tokens}
        return {
            "id": f"msg_{next(_ids):024d}",
            "type": "message",
            "role": "assistant",
            "model": reply.model or model,
            "content": answer.blocks,
            "stop_reason": _STOP_REASONS.get(reply.finish, reply.finish),
            "stop_sequence": None,
            "stop_details": self.stop_details,
            "usage": usage,
        }

    def _stream_events(self, reply: Reply, model: str) -> list[tuple[bytes, bool]]:
        """The SSE events of a reply, each flagged whether it is a content delta (thinking is
        not: the faults' `after_chunks` count the answer's deltas, as they always did)."""
        answer = self._answer(reply)
        start = {**self._whole_message(reply, model, answer), "content": [], "stop_reason": None}
        start["stop_details"] = None
        start["usage"] = self._usage(reply, 1)
        out: list[tuple[bytes, bool]] = [
            (sse({"type": "message_start", "message": start}, "message_start"), False)
        ]
        ping = (sse('{"type": "ping"}', "ping"), False)
        pinged = False
        for index, (block, chunks) in enumerate(zip(answer.blocks, answer.chunks, strict=True)):
            kind = block["type"]
            opening: dict[str, Any] = block  # redacted_thinking: whole, no deltas
            if kind == "thinking":
                opening = {"type": "thinking", "thinking": ""}
                if index not in answer.no_signature_key:
                    opening["signature"] = ""
            elif kind == "text":
                opening = {"type": "text", "text": ""}
            elif kind == "tool_use":
                opening = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            out.append(_block_start(index, opening))
            if not pinged:  # the API pings once, after the first block opens
                out.append(ping)
                pinged = True
            if kind == "thinking":
                for chunk in chunks:
                    out.append((_delta(index, {"type": "thinking_delta", "thinking": chunk})[0], False))
                signature = {"type": "signature_delta", "signature": block["signature"]}
                out.append((_delta(index, signature)[0], False))
            elif kind == "text":
                for chunk in chunks:
                    out.append(_delta(index, {"type": "text_delta", "text": chunk}))
            elif kind == "tool_use":
                for fragment in ["", *chunks]:  # the API opens with an empty fragment
                    out.append(_delta(index, {"type": "input_json_delta", "partial_json": fragment}))
            out.append(_block_stop(index))
        if not pinged:
            out.append(ping)
        delta = {
            "stop_reason": _STOP_REASONS.get(reply.finish, reply.finish),
            "stop_sequence": None,
            "stop_details": self.stop_details,
        }
        usage = self._usage(reply, reply.output_tokens, final=True)
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
