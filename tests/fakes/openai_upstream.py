"""A fake OpenAI Chat Completions server that answers as api.openai.com does, byte for byte.

Streams render PROTOCOLS.md section A exactly: a role chunk with empty content, content and
tool-call chunks (id/type/name first, then argument fragments), a finish chunk with an
empty delta, the usage chunk with `"choices":[]`, then `data: [DONE]`. Every chunk carries
`obfuscation` (on by default upstream) so parsers prove they ignore it. Errors use the
`{"error":{message,type,param,code}}` body with the type/code OpenAI uses per status
(tests/fakes/openai_errors.py). The answer's bytes, and the Groq and OpenRouter dialects
(`vendor`), are written by tests/fakes/openai_stream.py. Every request is kept
(`requests`, `chat_bodies`), so tests assert the body the server received.

    async with FakeOpenAI(api_key="sk-test-key") as fake:
        fake.reply = weather_tool_reply()
        fake.faults.append(Fault("status", status=429, headers={"retry-after": "3"}))
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.http import FakeHTTPServer, Request, Response
from tests.fakes.openai_errors import (
    GATEWAY_HTML,
    MISSING_KEY,
    error_body,
    mask_key,
)
from tests.fakes.openai_stream import Streamer, completion_body
from tests.fakes.script import Fault, Reply

__all__ = ["CHAT_PATH", "EMBED_PATH", "FakeOpenAI", "error_body", "fake_vector", "mask_key"]

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


def fake_vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for a text (so tests can check which input got which vector)."""
    seed = hashlib.sha256(text.encode()).digest()
    raw = [((seed[i % 32] + i * 37) % 251) / 125.0 - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def base64_vector(vector: list[float]) -> str:
    """`encoding_format: "base64"`: the vector's float32 values, little-endian, in base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


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
        # The dialect of the answer: "openai" (api.openai.com, vLLM, llama.cpp), "groq" or
        # "openrouter", each as its recording shows it (tests/fakes/openai_stream.py).
        self.vendor = "openai"
        # Reasoning before the answer (no neutral Reply field): one delta per chunk in
        # `reasoning_field` ("reasoning": Groq, OpenRouter, vLLM; "reasoning_content":
        # llama.cpp, DeepSeek), `reasoning_delay` seconds apart; `reasoning_tokens` in usage.
        self.reasoning_chunks: list[str] = []
        self.reasoning_field = "reasoning"
        self.reasoning_delay = 0.0
        self.reasoning_tokens = 0
        # A refusal: `delta.refusal` fragments (message.refusal unstreamed), before any content.
        self.refusal_chunks: list[str] = []
        # prompt_tokens_details.cache_write_tokens (GPT-5.6 and later); None: not sent.
        self.cache_write_tokens: int | None = None
        # llama-cpp-python's server: no usage chunk despite include_usage, and no finish_reason.
        self.send_usage = True
        self.send_finish_reason = True
        # Embeddings: seconds to wait before answering (cancellation tests), and every call's
        # input count in arrival order (batch-splitting tests); peak concurrent calls.
        self.embed_delay = 0.0
        self.embed_sizes: list[int] = []
        self.embed_open = 0
        self.embed_peak = 0
        # Not None: every vector of an answer is this instead (bad-vector tests).
        self.embed_vector: Any = None
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
                    "message": MISSING_KEY,
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
                status, GATEWAY_HTML.format(s=status, r=reason), headers=hdrs, content_type="text/html"
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
        # "base64": the little-endian float32 bytes of each vector, as api.openai.com sends them.
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64_vector(fake_vector(t, dims)) if as_base64 else fake_vector(t, dims),
            }
            for i, t in enumerate(inputs)
        ]
        if self.embed_vector is not None:
            for item in data:
                item["embedding"] = self.embed_vector
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
        if "max_tokens" in body and _reasoning_family(str(model)):
            await self._send_error(resp, 400, headers, None, "unsupported_parameter")
            return
        reply = self.reply
        if body.get("stream"):
            await Streamer(body, reply, resp, fault, fake=self).run(headers)
        else:
            # Mid-stream faults need a stream; a whole-body answer ignores them.
            await resp.send(200, completion_body(body, reply, self), headers=headers)


def _reasoning_family(model: str) -> bool:
    """o-series and gpt-5 family: they answer `max_tokens` with a 400 (max_completion_tokens only)."""
    return model.startswith(("gpt-5", "o1", "o3", "o4"))


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1686935002, "owned_by": "system"}


def _no_model(name: str) -> str:
    return f"The model `{name}` does not exist or you do not have access to it."
