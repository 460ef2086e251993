"""A fake Gemini API (Generative Language API) on loopback, byte-faithful where the broker can tell.

Streams `POST /v1beta/models/{m}:streamGenerateContent?alt=sse` as the recordings show
(gm-text-stream, gm-thinking-stream, gm-tool-call-stream): one `data: <JSON>` line per
event ended by CRLF CRLF, JSON written with ", " only after keys' colons (`{"candidates":
[...],"usageMetadata": {...}`), usage repeated and cumulative, finishReason on the last
candidate with an empty text part, function calls whole with the thought signature on the
first call (Gemini 3). Without `alt=sse` the same answer is one JSON array (gm-tool-json-array);
`:generateContent` answers one object. Errors are google.rpc Status bodies pretty-printed
with two-space indents (gm-400-api-key-invalid, gm-403-no-key, gm-404-model, gm-429-quota:
RetryInfo carries the delay, there is no Retry-After); a failure after the stream started
is the same body written bare into the stream (python-genai's reading; no recording).

It checks what the API rejects cheaply, in its words where they were recorded or quoted:
the key (403 without one, 400 API_KEY_INVALID with a wrong one), unknown fields, roles,
function responses matching the calls of the turn before, thinkingLevel with
thinkingBudget, thinkingLevel before Gemini 3, 2.5 Pro's budget floor, both schema fields
at once, and on Gemini 3 a replayed function call turn whose first call carries no thought
signature (the documented bypass value accepted) or one this fake did not issue.
`FakeGemini.generate` is the whole generate path, reused by the fake Vertex AI.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
from typing import Any

from tests.fakes.http import FakeHTTPServer, Request, Response
from tests.fakes.script import Fault, Reply

DEFAULT_MODELS = [
    "gemini-2.5-flash",
    "gemini-2.5-pro",
    "gemini-2.5-flash-lite",
    "gemini-3-pro-preview",
    "gemini-2.0-flash",
]
EMBEDDING_MODELS = ["gemini-embedding-001"]
SKIP_SIGNATURE = "skip_thought_signature_validator"
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MESSAGES = {
    400: "Request contains an invalid argument.",
    401: "Request had invalid authentication credentials.",
    403: "The caller does not have permission",
    404: "Requested entity was not found.",
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
    504: "Deadline expired before operation could complete.",
}
_NO_KEY = (
    "Method doesn't allow unregistered callers (callers without established identity). Please use API Key "
    "or other form of API consumer identity to call this API."
)
_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP", "content_filter": "SAFETY"}
_TOP_LEVEL = {
    "contents", "systemInstruction", "tools", "toolConfig", "safetySettings", "generationConfig",
    "cachedContent", "labels", "modelArmorConfig",
}  # fmt: skip
_GENERATION = {
    "temperature", "topP", "topK", "candidateCount", "maxOutputTokens", "stopSequences", "presencePenalty",
    "frequencyPenalty", "seed", "responseMimeType", "responseSchema", "responseJsonSchema",
    "responseModalities", "responseLogprobs", "logprobs", "mediaResolution", "thinkingConfig", "speechConfig",
}  # fmt: skip
_PART_KINDS = {
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
}
_MISSING_SIGNATURE = (
    "Function call is missing a thought_signature in functionCall parts. This is required for tools to work "
    "correctly, and missing thought_signature may lead to degraded model performance. Additional data, "
    "function call `{name}` , position {pos}. Please refer to https://ai.google.dev/gemini-api/docs/thought-signatures "
    "for more details."
)
_ids = itertools.count(1)


def compact(doc: Any) -> str:
    """JSON as Google's streaming frontend writes it: `": "` after keys, `","` between members."""
    return json.dumps(doc, separators=(",", ": "), ensure_ascii=False)


def error_body(status: int, message: str | None = None, details: list[dict[str, Any]] | None = None) -> bytes:
    err: dict[str, Any] = {
        "code": status,
        "message": message or _MESSAGES.get(status, "Error"),
        "status": _STATUS.get(status, "UNKNOWN"),
    }
    if details:
        err["details"] = details
    return (json.dumps({"error": err}, indent=2) + "\n").encode()


def major(model: str) -> int:
    tail = model.split("gemini-", 1)[-1]
    head = tail.split("-", 1)[0].split(".", 1)[0]
    return int(head) if head.isdigit() else 0


class ThoughtSignatures:
    """The signatures this fake issued (compared as bytes: either base64 alphabet comes back)."""

    def __init__(self) -> None:
        self._key = b"fake-gemini-signature-key"
        self._issued: set[bytes] = set()

    def sign(self, what: str) -> str:
        mac = hmac.new(self._key, f"{what}-{next(_ids)}".encode(), hashlib.sha256).digest()
        raw = b"\x12\x20" + mac + mac[:9]  # 43 bytes: a "+" or "/" in the base64 now and then
        self._issued.add(raw)
        return base64.b64encode(raw).decode()

    def issued(self, signature: str) -> bool:
        try:
            raw = base64.b64decode(signature.replace("-", "+").replace("_", "/") + "==", validate=False)
        except ValueError:
            return False
        return raw in self._issued


class FakeGemini:
    def __init__(
        self, *, api_key: str = "AIzaSyFAKE-gemini-0123456789", models: list[str] | None = None, port: int = 0
    ) -> None:
        self.api_key = api_key
        self.models = list(DEFAULT_MODELS if models is None else models)
        self.reply = Reply()
        self.faults: list[Fault] = []
        # Thought summaries streamed first when the request asks includeThoughts (each a part).
        self.thought_chunks: list[str] = []
        # usageMetadata.thoughtsTokenCount (part of Reply.output_tokens); None: not reported.
        self.thoughts_tokens: int | None = None
        # A thought signature on the answer (Gemini 3: the first call, or the last text part).
        self.sign = True
        # promptFeedback.blockReason: the prompt is blocked, 200 without candidates.
        self.block_reason: str | None = None
        self.signatures = ThoughtSignatures()
        self.bodies: list[dict[str, Any]] = []  # every generate body, as received
        self.server = FakeHTTPServer(self._handle, port=port)

    @property
    def url(self) -> str:
        return self.server.url  # the host, as python-genai's base URL

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    async def __aenter__(self) -> FakeGemini:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()

    async def _handle(self, req: Request, resp: Response) -> None:
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None and await self.early_fault(resp, fault):
            return
        if fault is not None and fault.kind == "stall_before_headers":
            fault = None
        key = req.headers.get("x-goog-api-key")
        if key is None:
            return await self.error(resp, 403, _NO_KEY)
        if key != self.api_key:
            details: list[dict[str, Any]] = [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com",
                 "metadata": {"service": "generativelanguage.googleapis.com"}},
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                 "message": "API key not valid. Please pass a valid API key."},
            ]  # fmt: skip
            return await self.error(resp, 400, "API key not valid. Please pass a valid API key.", details)
        path = req.path.removeprefix("/v1beta/")
        if req.method == "GET" and path == "models":
            return await resp.send(
                200, self._listing(req.query), content_type="application/json; charset=UTF-8"
            )
        name, _, method = path.removeprefix("models/").partition(":")
        if req.method == "POST" and method == "batchEmbedContents":
            return await self._embed(req, resp, name)
        if req.method == "POST" and method in ("streamGenerateContent", "generateContent"):
            if name not in self.models:
                return await self.error(
                    resp,
                    404,
                    f"models/{name} is not found for API version v1beta, or is not supported for {method}. Call ModelService.ListModels to see the list of available models and their supported methods.",
                )
            stream = method == "streamGenerateContent"
            return await self.generate(
                req, resp, name, stream=stream, sse="alt=sse" in req.query, fault=fault
            )
        await self.error(resp, 404, "Requested entity was not found.")

    # --- faults and errors ---------------------------------------------------------------------

    async def early_fault(self, resp: Response, fault: Fault) -> bool:
        """A fault that strikes before the answer; True when the response is over."""
        if fault.kind == "status":
            details = None
            if fault.status == 429:
                delay = fault.headers.get("retry-after", "1")  # Google says it in RetryInfo only
                details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay}s"}]
            await self.error(resp, fault.status, fault.message, details)
            return True
        if fault.kind == "reset_before_headers":
            resp.abort()
            return True
        if fault.kind == "stall_before_headers":
            await asyncio.sleep(fault.seconds)
        return False

    async def error(
        self,
        resp: Response,
        status: int,
        message: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        await resp.send(
            status, error_body(status, message, details), content_type="application/json; charset=UTF-8"
        )

    # --- generate ------------------------------------------------------------------------------

    async def generate(
        self, req: Request, resp: Response, model: str, *, stream: bool, sse: bool, fault: Fault | None
    ) -> None:
        try:
            body = req.json()
        except ValueError:
            return await self.error(resp, 400, "Invalid JSON payload received.")
        problem = (
            self.check(body, model)
            if isinstance(body, dict)
            else "Invalid JSON payload received. Expected an object."
        )
        if problem:
            return await self.error(resp, 400, problem)
        self.bodies.append(body)
        if self.block_reason is not None:
            doc = {
                "promptFeedback": {"blockReason": self.block_reason},
                "usageMetadata": {"promptTokenCount": self.reply.input_tokens},
                "modelVersion": model,
            }
            return await resp.send(200, compact(doc), content_type="application/json; charset=UTF-8")
        thinking = ((body.get("generationConfig") or {}).get("thinkingConfig") or {}).get(
            "includeThoughts"
        ) is True
        chunks = self.chunks(self.reply, model, thoughts=thinking)
        if stream and sse:
            return await self._sse(resp, chunks, fault)
        if stream:  # no alt=sse: one JSON array, element by element
            text = "[" + "\n,\r\n".join(json.dumps(c, indent=2) for c in chunks) + "\n]"
            return await resp.send(200, text, content_type="application/json; charset=UTF-8")
        await resp.send(200, compact(self.whole(chunks)), content_type="application/json; charset=UTF-8")

    def chunks(self, reply: Reply, model: str, *, thoughts: bool) -> list[dict[str, Any]]:
        """The answer as streamed GenerateContentResponse chunks (the last has finishReason)."""
        thought_tokens = self.thoughts_tokens or 0
        candidates_total = max(reply.output_tokens - thought_tokens, 0)
        signed = self.sign and major(model) >= 3
        steps: list[list[dict[str, Any]]] = []
        if thoughts:
            steps += [[{"text": t, "thought": True}] for t in self.thought_chunks]
        steps += [[{"text": t}] for t in reply.text_chunks]
        if reply.tool_calls:
            calls = []
            for i, call in enumerate(reply.tool_calls):
                part: dict[str, Any] = {
                    "functionCall": {"name": call.name, "args": json.loads(call.arguments or "{}")}
                }
                if i == 0 and signed:
                    part["thoughtSignature"] = self.signatures.sign(call.name)
                calls.append(part)
            steps.append(calls)
        last: dict[str, Any] = {"text": ""}
        if signed and not reply.tool_calls:
            last["thoughtSignature"] = self.signatures.sign("text")
        steps.append([last])
        response_id = f"fakeResp{next(_ids):012d}"
        out = []
        for n, parts in enumerate(steps, start=1):
            final = n == len(steps)
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
            usage: dict[str, Any] = {"promptTokenCount": reply.input_tokens}
            if final:
                usage["candidatesTokenCount"] = candidates_total
                candidate["finishReason"] = _FINISH.get(reply.finish, "STOP")
                if reply.finish == "content_filter":
                    candidate["content"] = {}
                    candidate["safetyRatings"] = [
                        {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "LOW", "blocked": True}
                    ]
            if thought_tokens:
                usage["thoughtsTokenCount"] = thought_tokens
            if reply.cached_input_tokens:
                usage["cachedContentTokenCount"] = reply.cached_input_tokens
            usage["totalTokenCount"] = (
                reply.input_tokens + (candidates_total if final else 0) + thought_tokens
            )
            out.append(
                {
                    "candidates": [candidate],
                    "usageMetadata": usage,
                    "modelVersion": reply.model or model,
                    "responseId": response_id,
                }
            )
        return out

    def whole(self, chunks: list[dict[str, Any]]) -> dict[str, Any]:
        """generateContent's one answer: the chunks' parts together, the last chunk's rest."""
        doc = json.loads(json.dumps(chunks[-1]))
        parts = [
            p
            for c in chunks
            for p in ((c["candidates"][0].get("content") or {}).get("parts") or [])
            if p.get("text") != "" or "thoughtSignature" in p
        ]
        if doc["candidates"][0].get("content"):
            doc["candidates"][0]["content"]["parts"] = parts
        return dict(doc)

    async def _sse(self, resp: Response, chunks: list[dict[str, Any]], fault: Fault | None) -> None:
        await resp.start_stream(
            200, content_type="text/event-stream", headers={"content-disposition": "attachment"}
        )
        pending = (
            fault
            if fault is not None
            and fault.kind not in ("status", "reset_before_headers", "stall_before_headers")
            else None
        )
        content = 0  # answer chunks sent (a fault's after_chunks counts these)
        for n, chunk in enumerate(chunks):
            final = n == len(chunks) - 1
            if pending is not None and pending.kind == "no_terminator" and final:
                await resp.end()  # the body ends cleanly, without the finishReason chunk
                return await resp.close()
            if (
                pending is not None
                and pending.kind != "no_terminator"
                and (content >= pending.after_chunks or final)
            ):
                if await self._mid_stream_fault(resp, pending):
                    return
                pending = None
            await resp.write(f"data: {compact(chunk)}\r\n\r\n")
            parts = (chunk["candidates"][0].get("content") or {}).get("parts") or []
            if any((p.get("text") and not p.get("thought")) or "functionCall" in p for p in parts):
                content += 1
                if self.reply.chunk_delay:
                    await asyncio.sleep(self.reply.chunk_delay)
        await resp.end()

    async def _mid_stream_fault(self, resp: Response, fault: Fault) -> bool:
        if fault.kind == "stall_mid_stream":
            await asyncio.sleep(fault.seconds)
            return False
        if fault.kind == "disconnect_mid_stream":
            resp.abort()
            return True
        if fault.kind == "malformed":
            await resp.write(b'data: {"candidates": [{"content": {"parts": [{"text": \r\n\r\n')
        elif fault.kind == "error_event":
            await resp.write(error_body(fault.status if fault.status != 500 else 503, fault.message))
        else:
            return False
        await resp.end()
        return True

    # --- what the API refuses ------------------------------------------------------------------

    def check(self, body: dict[str, Any], model: str) -> str | None:
        for key in body:
            if key not in _TOP_LEVEL:
                return f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
        generation = body.get("generationConfig") or {}
        for key in generation:
            if key not in _GENERATION:
                return f"Invalid JSON payload received. Unknown name \"{key}\" at 'generation_config': Cannot find field."
        if "responseSchema" in generation and "responseJsonSchema" in generation:
            return "response_schema and response_json_schema cannot both be set."
        problem = _thinking(generation.get("thinkingConfig"), model)
        if problem:
            return problem
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return "* GenerateContentRequest.contents: contents is not specified\n"
        return self._turns(contents, model)

    def _turns(self, contents: list[Any], model: str) -> str | None:
        pending_calls = 0
        for i, turn in enumerate(contents):
            role, parts = turn.get("role"), turn.get("parts")
            if role not in ("user", "model"):
                return f"Please use a valid role: user, model. (contents[{i}].role is {role!r})"
            if not isinstance(parts, list) or not parts:
                return f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n"
            for j, part in enumerate(parts):
                kinds = [k for k in part if k in _PART_KINDS]
                if len(kinds) != 1:
                    return f"* GenerateContentRequest.contents[{i}].parts[{j}].data: required oneof field 'data' must have one initialized field\n"
            calls = [p for p in parts if "functionCall" in p]
            responses = [p for p in parts if "functionResponse" in p]
            if pending_calls and role == "user" and len(responses) != pending_calls:
                return "Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn."
            pending_calls = len(calls) if role == "model" else 0
            if calls and major(model) >= 3:
                signature = calls[0].get("thoughtSignature")
                if not signature:
                    return _MISSING_SIGNATURE.format(name=calls[0]["functionCall"].get("name"), pos=i + 1)
                if signature != SKIP_SIGNATURE and not self.signatures.issued(signature):
                    return "Corrupted thought signature."
        return None

    # --- listing, embeddings ---------------------------------------------------------------------

    def _listing(self, query: str) -> dict[str, Any]:
        params = dict(p.partition("=")[::2] for p in query.split("&") if p)
        size = max(1, min(int(params.get("pageSize") or 50), 1000))
        start = int(params.get("pageToken") or 0)
        names = self.models + EMBEDDING_MODELS + ["imagen-4.0-generate-001"]
        page = names[start : start + size]
        models = []
        for name in page:
            methods = (
                ["embedContent", "countTextTokens"] if name in EMBEDDING_MODELS
                else ["predict"] if name.startswith("imagen")
                else ["generateContent", "countTokens", "createCachedContent", "batchGenerateContent"]
            )  # fmt: skip
            models.append(
                {
                    "name": f"models/{name}",
                    "version": "001",
                    "displayName": name,
                    "inputTokenLimit": 1048576,
                    "outputTokenLimit": 65536,
                    "supportedGenerationMethods": methods,
                }
            )
        doc: dict[str, Any] = {"models": models}
        if start + size < len(names):
            doc["nextPageToken"] = str(start + size)
        return doc

    async def _embed(self, req: Request, resp: Response, name: str) -> None:
        if name not in EMBEDDING_MODELS:
            return await self.error(
                resp,
                404,
                f"models/{name} is not found for API version v1beta, or is not supported for embedContent. Call ModelService.ListModels to see the list of available models and their supported methods.",
            )
        body = req.json() or {}
        vectors = []
        for i, item in enumerate(body.get("requests") or []):
            if item.get("model") != f"models/{name}":
                return await self.error(
                    resp,
                    400,
                    f"* BatchEmbedContentsRequest.model: Model name must match the model of requests[{i}].\n",
                )
            text = "".join(p.get("text", "") for p in (item.get("content") or {}).get("parts") or [])
            size = int(item.get("outputDimensionality") or 8)
            seed = hashlib.sha256(text.encode()).digest()
            vectors.append({"values": [round((seed[k % 32] - 128) / 128, 6) for k in range(size)]})
        await resp.send(
            200, json.dumps({"embeddings": vectors}, indent=2), content_type="application/json; charset=UTF-8"
        )


def _thinking(config: Any, model: str) -> str | None:
    if not isinstance(config, dict):
        return None
    if "thinkingLevel" in config and "thinkingBudget" in config:
        return "You can only set only one of thinking budget and thinking level."
    if "thinkingLevel" in config and major(model) < 3:
        return "Thinking level is not supported for this model."
    budget = config.get("thinkingBudget")
    if isinstance(budget, int) and "2.5-pro" in model and budget != -1 and not 128 <= budget <= 32768:
        return "The thinking budget is invalid. Please set a budget between 128 and 32768."
    return None
