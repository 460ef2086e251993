"""A fake OpenAI Chat Completions server that answers as api.openai.com does, byte for byte.

Streams render PROTOCOLS.md section A exactly: a role chunk with empty content, content and
tool-call chunks (id/type/name first, then argument fragments), a finish chunk with an
empty delta, the usage chunk with `"choices":[]`, then `data: [DONE]`. Every chunk carries
`obfuscation` (on by default upstream) so parsers prove they ignore it. Errors use the
`{"error":{message,type,param,code}}` body with the type/code OpenAI uses per status.

    async with FakeOpenAI(api_key="sk-test-key") as fake:
        fake.reply = weather_tool_reply()
        fake.faults.append(Fault("status", status=429, headers={"retry-after": "3"}))
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.http import FakeHTTPServer, Request, Response, sse
from tests.fakes.script import Fault, Reply

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o")
CHAT_PATH = "/v1/chat/completions"
EMBED_PATH = "/v1/embeddings"
# Native vector sizes of the embedding models the fake serves (PROTOCOLS-2026.md 7.1).
EMBED_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
# The error texts of /v1/embeddings (PROTOCOLS-2026.md 7.1), each a 400 invalid_request_error.
EMBED_EMPTY = (
    "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."
)
EMBED_TOO_MANY = "Invalid 'input': array too long. Expected an array with maximum length 2048, but got an array with length {n} instead."
EMBED_TOO_LONG = "Invalid 'input[{i}]': maximum input length is 8192 tokens."

# status -> (message, type, param, code), as OpenAI answers them.
_ERRORS: dict[int, tuple[str, str, str | None, str | None]] = {
    400: (
        "Invalid value for 'temperature': must be between 0 and 2.",
        "invalid_request_error",
        "temperature",
        "invalid_value",
    ),
    403: (
        "Country, region, or territory not supported",
        "request_forbidden",
        None,
        "unsupported_country_region_territory",
    ),
    404: (
        "The model `gpt-5-nope` does not exist or you do not have access to it.",
        "invalid_request_error",
        None,
        "model_not_found",
    ),
    409: ("The request conflicted with another request.", "invalid_request_error", None, None),
    429: (
        "Rate limit reached for gpt-4o-mini in organization org-fake on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1. Please try again in 20s. Visit "
        "https://platform.openai.com/account/rate-limits to learn more.",
        "requests",
        None,
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
        None,
    ),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None, None),
}
# Fault.error_type values OpenAI pairs with their own wording.
_TYPED_ERRORS: dict[str, tuple[str, str, str | None, str]] = {
    "insufficient_quota": (
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: "
        "https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        None,
        "insufficient_quota",
    ),
    "context_length_exceeded": (
        "This model's maximum context length is 128000 tokens. However, your messages "
        "resulted in 131072 tokens. Please reduce the length of the messages.",
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
    ),
}
# 502/504 come from the CDN in front of the API, as HTML.
_GATEWAY_HTML = (
    "<html>\r\n<head><title>{s} {r}</title></head>\r\n<body>\r\n<center><h1>{s} {r}</h1></center>"
    "\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)
_MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) "
    "if you're accessing the API from your browser and are prompted for a username and password. You "
    "can obtain an API key from https://platform.openai.com/account/api-keys."
)
_MID_STREAM = ("stall_mid_stream", "disconnect_mid_stream", "malformed", "error_event")


def error_body(status: int, message: str | None = None, error_type: str | None = None) -> dict[str, Any]:
    """OpenAI's error document for a status (all four keys are always present)."""
    msg: str
    etype: str
    param: str | None
    code: str | None
    if error_type is not None and error_type in _TYPED_ERRORS:
        msg, etype, param, code = _TYPED_ERRORS[error_type]
    elif status in _ERRORS:
        msg, etype, param, code = _ERRORS[status]
        if error_type:
            etype = code = error_type
    else:
        etype = error_type or ("server_error" if status >= 500 else "invalid_request_error")
        msg, param, code = f"Request failed with status {status}.", None, error_type
    return {"error": {"message": message or msg, "type": etype, "param": param, "code": code}}


def fake_vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for a text (so tests can check which input got which vector)."""
    seed = hashlib.sha256(text.encode()).digest()
    raw = [((seed[i % 32] + i * 37) % 251) / 125.0 - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def mask_key(key: str) -> str:
    """How OpenAI echoes a wrong key: "sk-wrong-key" -> "sk-wro*****key"."""
    return f"{key[:6]}*****{key[-3:]}" if len(key) > 9 else "*****"


@dataclass
class _DroppingServer(FakeHTTPServer):
    """FakeHTTPServer whose stop() also drops idle keep-alive connections.

    FakeHTTPServer.stop() cancels connection tasks, but a task cancelled while it awaits
    its EOF watcher swallows the cancellation (suppress(BaseException)) and keeps serving
    the pooled connection, so a "stopped" upstream still answers. Aborting the transports
    makes stop() look like a crash whatever the timing.
    """

    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    # TCP connections accepted so far: tests of connection reuse read it.
    accepted: int = 0

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            await super()._on_conn(reader, writer)
        finally:
            self._writers.discard(writer)

    async def stop(self) -> None:
        await super().stop()
        for writer in list(self._writers):
            writer.transport.abort()


class FakeOpenAI:
    """POST /v1/chat/completions (streamed or not) and GET /v1/models on 127.0.0.1."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: Iterable[str] = DEFAULT_MODELS,
        echo_full_key: bool = False,
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.models = list(models)
        # Echo the whole wrong key back instead of a masked one: tests prove redaction.
        self.echo_full_key = echo_full_key
        self.reply = Reply()
        self.faults: list[Fault] = []
        # Hidden reasoning before the answer (no neutral Reply field): one delta per chunk in
        # `reasoning_field` ("reasoning": Groq, OpenRouter; "reasoning_content": vLLM,
        # llama.cpp), `reasoning_delay` seconds apart.
        self.reasoning_chunks: list[str] = []
        self.reasoning_field = "reasoning"
        self.reasoning_delay = 0.0
        # llama-cpp-python's server: no usage chunk despite include_usage, and no finish_reason.
        self.send_usage = True
        self.send_finish_reason = True
        # Embeddings: seconds to wait before answering (cancellation tests), and every call's
        # input count in arrival order (batch-splitting tests); peak concurrent calls.
        self.embed_delay = 0.0
        self.embed_sizes: list[int] = []
        self.embed_open = 0
        self.embed_peak = 0
        self.server = _DroppingServer(self._handle, port=port)

    @property
    def url(self) -> str:
        """The base_url a client configures: OpenAI's includes /v1."""
        return f"{self.server.url}/v1"

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    @property
    def connections(self) -> int:
        """TCP connections accepted since construction (1 for many requests = pooling works)."""
        return self.server.accepted

    @property
    def chat_bodies(self) -> list[Any]:
        return [r.json() for r in self.server.requests if r.path == CHAT_PATH]

    async def start(self) -> FakeOpenAI:
        """Start, or restart after stop() on the same port (the server keeps its port)."""
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop()

    async def __aenter__(self) -> FakeOpenAI:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- routing -------------------------------------------------------------------------------

    async def _handle(self, req: Request, resp: Response) -> None:
        headers = {"x-request-id": f"req_{secrets.token_hex(16)}"}
        fault = self.faults.pop(0) if req.path == CHAT_PATH and self.faults else None
        if fault is not None:
            if fault.kind == "reset_before_headers":
                resp.abort()
                return
            if fault.kind == "stall_before_headers":
                await asyncio.sleep(fault.seconds)
            elif fault.kind == "status":
                await self._send_error(
                    resp, fault.status, headers, fault.message, fault.error_type, fault.headers
                )
                return
        if self.api_key is not None and (denied := self._auth_error(req)) is not None:
            await resp.send(401, denied, headers=headers)
            return
        if req.method == "GET" and req.path == "/v1/models":
            await resp.send(
                200, {"object": "list", "data": [_model(m) for m in self.models]}, headers=headers
            )
        elif req.method == "GET" and req.path.startswith("/v1/models/"):
            name = req.path.removeprefix("/v1/models/")
            if name in self.models:
                await resp.send(200, _model(name), headers=headers)
            else:
                await self._send_error(resp, 404, headers, _no_model(name))
        elif req.method == "POST" and req.path == CHAT_PATH:
            await self._chat(req, resp, headers, fault)
        elif req.method == "POST" and req.path == EMBED_PATH:
            await self._embed(req, resp, headers)
        else:
            msg = f"Invalid URL ({req.method} {req.path})"
            await resp.send(
                404,
                {"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": None}},
                headers=headers,
            )

    def _auth_error(self, req: Request) -> dict[str, Any] | None:
        auth = req.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return {
                "error": {
                    "message": _MISSING_KEY,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        sent = auth.removeprefix("Bearer ").strip()
        if sent == self.api_key:
            return None
        shown = sent if self.echo_full_key else mask_key(sent)
        message = (
            f"Incorrect API key provided: {shown}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
        return {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }

    async def _send_error(
        self,
        resp: Response,
        status: int,
        headers: dict[str, str],
        message: str | None = None,
        error_type: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        hdrs = {**headers, **(extra or {})}
        if status in (502, 504):
            reason = "Bad Gateway" if status == 502 else "Gateway Time-out"
            await resp.send(
                status, _GATEWAY_HTML.format(s=status, r=reason), headers=hdrs, content_type="text/html"
            )
            return
        await resp.send(status, error_body(status, message, error_type), headers=hdrs)

    # --- embeddings ---------------------------------------------------------------------------------

    async def _embed(self, req: Request, resp: Response, headers: dict[str, str]) -> None:
        """POST /v1/embeddings as PROTOCOLS-2026.md 7.1: a token is a whitespace-separated word here."""
        body = json.loads(req.body)
        model, inputs = body.get("model"), body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        self.embed_sizes.append(len(inputs) if isinstance(inputs, list) else 0)
        self.embed_open += 1
        self.embed_peak = max(self.embed_peak, self.embed_open)
        try:
            if self.embed_delay:
                await asyncio.sleep(self.embed_delay)
        finally:
            self.embed_open -= 1
        if model not in EMBED_DIMENSIONS:
            await self._send_error(resp, 404, headers, _no_model(str(model)), "model_not_found")
            return
        if not isinstance(inputs, list) or any(not isinstance(t, str) or t == "" for t in inputs):
            await self._send_error(resp, 400, headers, EMBED_EMPTY, "invalid_request_error")
            return
        if len(inputs) > 2048:
            await self._send_error(
                resp, 400, headers, EMBED_TOO_MANY.format(n=len(inputs)), "invalid_request_error"
            )
            return
        tokens = [len(t.split()) for t in inputs]
        for i, n in enumerate(tokens):
            if n > 8192:
                await self._send_error(
                    resp, 400, headers, EMBED_TOO_LONG.format(i=i), "invalid_request_error"
                )
                return
        dims = body.get("dimensions") or EMBED_DIMENSIONS[model]
        data = [
            {"object": "embedding", "index": i, "embedding": fake_vector(t, dims)}
            for i, t in enumerate(inputs)
        ]
        total = sum(tokens)
        doc = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }
        await resp.send(200, doc, headers=headers)

    # --- chat completions --------------------------------------------------------------------------

    async def _chat(self, req: Request, resp: Response, headers: dict[str, str], fault: Fault | None) -> None:
        try:
            body = json.loads(req.body)
        except ValueError:
            msg = (
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
                "sent was not valid JSON."
            )
            await self._send_error(resp, 400, headers, msg, "invalid_request_error")
            return
        model = body.get("model")
        if model not in self.models:
            await self._send_error(resp, 404, headers, _no_model(str(model)))
            return
        if body.get("stream_options") is not None and not body.get("stream"):
            msg = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            await resp.send(
                400,
                {
                    "error": {
                        "message": msg,
                        "type": "invalid_request_error",
                        "param": "stream_options",
                        "code": None,
                    }
                },
                headers=headers,
            )
            return
        reply = self.reply
        if body.get("stream"):
            await _Streamer(body, reply, resp, fault, fake=self).run(headers)
        else:
            # Mid-stream faults need a stream; a whole-body answer ignores them.
            await resp.send(200, _completion(body, reply), headers=headers)


class _Streamer:
    """Writes one streamed answer, with a mid-stream fault where the script asks for it."""

    def __init__(
        self,
        body: dict[str, Any],
        reply: Reply,
        resp: Response,
        fault: Fault | None,
        *,
        fake: FakeOpenAI | None = None,
    ) -> None:
        opts = body.get("stream_options") or {}
        self.fake = fake
        self.include_usage = bool(opts.get("include_usage")) and (fake is None or fake.send_usage)
        self.obfuscate = opts.get("include_obfuscation", True) is not False
        self.reply = reply
        self.resp = resp
        self.fault = fault if fault is not None and fault.kind in (*_MID_STREAM, "no_terminator") else None
        self.base = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": reply.model or body["model"],
            "service_tier": "default",
            "system_fingerprint": "fp_fake0openai",
        }

    def chunk(self, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
        obj: dict[str, Any] = dict(self.base)
        obj["choices"] = (
            [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        )
        if self.include_usage:
            obj["usage"] = usage
        if self.obfuscate:
            obj["obfuscation"] = secrets.token_urlsafe(6)
        return sse(obj)

    def content_deltas(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [{"content": c} for c in self.reply.text_chunks]
        for i, call in enumerate(self.reply.tool_calls):
            deltas.append(
                {
                    "tool_calls": [
                        {
                            "index": i,
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": ""},
                        }
                    ]
                }
            )
            deltas += [
                {"tool_calls": [{"index": i, "function": {"arguments": a}}]} for a in call.argument_chunks
            ]
        return deltas

    async def run(self, headers: dict[str, str]) -> None:
        r, resp = self.reply, self.resp
        await resp.start_stream(200, headers={**headers, "openai-processing-ms": "112"})
        await resp.write(self.chunk({"role": "assistant", "content": "", "refusal": None}))
        fake = self.fake
        if fake is not None:
            for text in fake.reasoning_chunks:
                await resp.write(self.chunk({fake.reasoning_field: text}))
                if fake.reasoning_delay:
                    await asyncio.sleep(fake.reasoning_delay)
        deltas = self.content_deltas()
        for n, delta in enumerate(deltas):
            if n == self._fault_at(len(deltas)) and not await self._fault():
                return
            await self._pause()
            await resp.write(self.chunk(delta))
        if self._fault_at(len(deltas)) == len(deltas) and not await self._fault():
            return
        await self._pause()
        if self.fake is None or self.fake.send_finish_reason:
            await resp.write(self.chunk({}, finish=r.finish))
        if self.include_usage:
            usage = {
                "prompt_tokens": r.input_tokens,
                "completion_tokens": r.output_tokens,
                "total_tokens": r.input_tokens + r.output_tokens,
                "prompt_tokens_details": {"cached_tokens": r.cached_input_tokens, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            }
            await resp.write(self.chunk(None, usage=usage))
        if self.fault is None or self.fault.kind != "no_terminator":
            await resp.write(sse("[DONE]"))
        await resp.end()

    def _fault_at(self, total: int) -> int:
        if self.fault is None or self.fault.kind == "no_terminator":
            return -1
        return min(max(self.fault.after_chunks, 0), total)

    async def _pause(self) -> None:
        if self.reply.chunk_delay:
            await asyncio.sleep(self.reply.chunk_delay)

    async def _fault(self) -> bool:
        """Act out the mid-stream fault; True when the stream goes on afterwards."""
        assert self.fault is not None
        f, resp = self.fault, self.resp
        if f.kind == "stall_mid_stream":
            await asyncio.sleep(f.seconds)
            return True
        if f.kind == "disconnect_mid_stream":
            resp.abort()
        elif f.kind == "malformed":
            await resp.write(
                b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","choices":[{"index"\n\n'
            )
            await resp.end()
        elif f.kind == "error_event":
            # The newer vLLM shape carries the HTTP status as an int `code`; OpenAI's own
            # mid-stream errors have the same envelope.
            err = error_body(f.status, f.message, f.error_type)["error"]
            err["code"] = f.status
            await resp.write(sse({"error": err}))
            await resp.write(sse("[DONE]"))
            await resp.end()
        return False


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1686935002, "owned_by": "system"}


def _no_model(name: str) -> str:
    return f"The model `{name}` does not exist or you do not have access to it."


def _completion(body: dict[str, Any], r: Reply) -> dict[str, Any]:
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in r.tool_calls
    ]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": r.text or None,
        "refusal": None,
        "annotations": [],
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": r.model or body["model"],
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": r.finish}],
        "usage": {
            "prompt_tokens": r.input_tokens,
            "completion_tokens": r.output_tokens,
            "total_tokens": r.input_tokens + r.output_tokens,
            "prompt_tokens_details": {"cached_tokens": r.cached_input_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_fake0openai",
    }
