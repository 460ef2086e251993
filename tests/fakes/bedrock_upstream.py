"""A fake AWS Bedrock endpoint on loopback: ConverseStream, InvokeModel and the control plane.

Byte-faithful where the broker can tell (PROTOCOLS-CLOUD.md C): ConverseStream answers
`application/vnd.amazon.eventstream` messages with real CRCs (headers `:event-type`,
`:content-type`, `:message-type`, payloads with the random `p` padding), text and reasoning
blocks starting with their deltas, tool blocks with `contentBlockStart`, `messageStop` then
`metadata` last; rest-json errors with `x-amzn-ErrorType`; in-stream `exception` messages.

It VERIFIES the SigV4 signature of every request as AWS does: the Authorization header's
scope and signed headers, the X-Amz-Date within 5 minutes, the session token, and the
signature recomputed with botocore's SigV4Auth from the bytes that arrived (the path as
received, encoded once more; the query by its decoded pairs; the body's SHA-256) with the
same secret. A mismatch is the 403 InvalidSignatureException AWS sends, so a signing bug
cannot pass a test. `verified` counts the requests that passed.

`corrupt` ("prelude" or "message") flips a CRC byte in the next stream's second message;
a `Fault("malformed")` does the same after `after_chunks` deltas.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from broker.providers.eventstream import encode_message
from tests.fakes.http import FakeHTTPServer, Request, Response
from tests.fakes.script import Fault, Reply

ACCESS_KEY = "AKIDFAKEBEDROCK0001"
SECRET_KEY = "fake/bedrock+secret0123456789abcdefghijKL"
SESSION_TOKEN = "FwoGZXIvYXdzEFAKE-session-token-0123456789"
EVENT_STREAM = "application/vnd.amazon.eventstream"
DEFAULT_MODELS = (
    "amazon.nova-micro-v1:0",
    "us.amazon.nova-micro-v1:0",
    "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
    "anthropic.claude-3-haiku-20240307-v1:0",
    "amazon.titan-embed-text-v2:0",
)
_EXCEPTIONS = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
_MESSAGES = {
    400: "The provided model identifier is invalid.",
    403: "You don't have access to the model with the specified model ID.",
    429: "Too many requests, please wait before trying again.",
    500: "The server encountered an internal error.",
    503: "Bedrock is unable to process your request.",
}
_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "content_filtered",
}
_PAD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_pad = itertools.count(7)


def _frame(event: str, payload: dict[str, Any]) -> bytes:
    """One event message as Bedrock writes it: compact JSON with a padding field."""
    body = {**payload, "p": _PAD[: next(_pad) % len(_PAD)]}
    headers = {":event-type": event, ":content-type": "application/json", ":message-type": "event"}
    return encode_message(headers, json.dumps(body, separators=(",", ":")).encode())


def exception_frame(kind: str, message: str) -> bytes:
    headers = {":message-type": "exception", ":exception-type": kind, ":content-type": "application/json"}
    return encode_message(headers, json.dumps({"message": message}, separators=(",", ":")).encode())


def corrupted(frame: bytes, where: str) -> bytes:
    """The frame with one CRC byte flipped: the prelude's (byte 8) or the message's (last)."""
    data = bytearray(frame)
    data[8 if where == "prelude" else -1] ^= 0xFF
    return bytes(data)


@dataclass
class Reasoning:
    """A Claude reasoning block: text deltas, then one signature delta (or redacted data)."""

    chunks: list[str] = field(default_factory=list)
    signature: str = ""
    redacted: str = ""


def titan_vector(text: str, dims: int) -> list[float]:
    seed = hashlib.sha256(text.encode()).digest()
    raw = [((seed[i % 32] + i * 31) % 241) / 120.0 - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


class FakeBedrock:
    def __init__(
        self,
        *,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        session_token: str | None = None,
        region: str = "us-east-1",
        models: tuple[str, ...] = DEFAULT_MODELS,
    ) -> None:
        self.access_key, self.secret_key, self.session_token = access_key, secret_key, session_token
        self.region = region
        self.models = list(models)
        self.reply = Reply()
        self.faults: list[Fault] = []
        self.reasoning: list[Reasoning] = []
        self.cache_read = 0
        self.cache_write = 0
        self.stop_reason: str | None = None  # overrides the Reply's finish
        self.trace: dict[str, Any] | None = None  # metadata.trace (guardrail assessments)
        self.corrupt: str | None = None
        self.profiles_page_size = 2
        self.verified = 0
        self.rejected: list[str] = []  # why signatures were refused
        self.server = FakeHTTPServer(self._handle)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    @property
    def converse_bodies(self) -> list[Any]:
        return [r.json() for r in self.requests if r.path.endswith("/converse-stream")]

    async def __aenter__(self) -> FakeBedrock:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()

    # --- SigV4, verified ----------------------------------------------------------------------

    def signature_problem(self, req: Request) -> str | None:
        auth = req.headers.get("authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 "):
            return "Authorization header is missing or not AWS4-HMAC-SHA256"
        fields = dict(
            part.strip().split("=", 1) for part in auth.removeprefix("AWS4-HMAC-SHA256 ").split(",")
        )
        scope = [*fields.get("Credential", "").split("/"), "", "", "", "", ""]
        akid, date, region, service, terminal = scope[:5]
        if akid != self.access_key:
            return "The security token included in the request is invalid."
        amz_date = req.headers.get("x-amz-date", "")
        if not amz_date.startswith(date) or (region, service, terminal) != (
            self.region,
            "bedrock",
            "aws4_request",
        ):
            return f"Credential scope {date}/{region}/{service}/{terminal} is wrong"
        when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
        if abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) > 300:
            return "Signature expired"
        if self.session_token is not None and req.headers.get("x-amz-security-token") != self.session_token:
            return "The security token included in the request is invalid."
        signed = fields.get("SignedHeaders", "").split(";")
        if "host" not in signed or "x-amz-date" not in signed:
            return "host and x-amz-date must be signed"
        if self.session_token is not None and "x-amz-security-token" not in signed:
            return "x-amz-security-token must be signed"
        pairs = [
            (unquote(k), unquote(v)) for k, _, v in (p.partition("=") for p in req.query.split("&") if p)
        ]
        request = AWSRequest(
            method=req.method,
            url=f"http://{req.headers.get('host', '')}{req.path}",
            headers={name: req.headers.get(name, "") for name in signed},
            data=req.body,
            params=pairs,  # type: ignore[arg-type]  # botocore iterates pairs
        )
        request.context["timestamp"] = amz_date
        signer = SigV4Auth(
            ReadOnlyCredentials(self.access_key, self.secret_key, self.session_token), "bedrock", self.region
        )
        expected = signer.signature(
            signer.string_to_sign(request, signer.canonical_request(request)), request
        )
        if fields.get("Signature") != expected:
            return "The request signature we calculated does not match the signature you provided."
        return None

    # --- dispatch -------------------------------------------------------------------------------

    async def _handle(self, req: Request, resp: Response) -> None:
        problem = self.signature_problem(req)
        if problem is not None:
            self.rejected.append(problem)
            kind = (
                "InvalidSignatureException"
                if "signature" in problem.lower()
                else "UnrecognizedClientException"
            )
            return await self._error(resp, 403, problem, kind)
        self.verified += 1
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None and fault.kind == "status":
            return await self._error(resp, fault.status, fault.message, fault.error_type, fault.headers)
        if fault is not None and fault.kind == "reset_before_headers":
            return resp.abort()
        if req.method == "GET" and req.path == "/foundation-models":
            return await resp.send(
                200, {"modelSummaries": [_summary(m) for m in self.models if m[:3] not in ("us.", "eu.")]}
            )
        if req.method == "GET" and req.path == "/inference-profiles":
            return await resp.send(200, self._profiles(req.query))
        parts = req.path.split("/")
        if req.method == "POST" and len(parts) == 4 and parts[1] == "model":
            model = unquote(parts[2])
            if model not in self.models:
                return await self._error(resp, 400, "The provided model identifier is invalid.")
            if parts[3] == "converse-stream":
                return await self._converse(req, resp, fault)
            if parts[3] == "invoke":
                return await self._invoke(req, resp, model)
        await self._error(resp, 404, f"no route {req.method} {req.path}", "UnknownOperationException")

    async def _error(
        self,
        resp: Response,
        status: int,
        message: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        kind = kind or _EXCEPTIONS.get(status, "InternalServerException")
        text = message or _MESSAGES.get(status, "error")
        hdrs = {
            "x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            **(headers or {}),
        }
        await resp.send(status, {"message": text}, headers=hdrs)

    def _profiles(self, query: str) -> dict[str, Any]:
        ids = [m for m in self.models if m[:3] in ("us.", "eu.")]
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        start = int(unquote(params["nextToken"]).split("/")[1]) if "nextToken" in params else 0
        page = ids[start : start + self.profiles_page_size]
        doc: dict[str, Any] = {
            "inferenceProfileSummaries": [
                {
                    "inferenceProfileId": m,
                    "inferenceProfileName": m,
                    "status": "ACTIVE",
                    "type": "SYSTEM_DEFINED",
                }
                for m in page
            ]
        }
        if start + self.profiles_page_size < len(ids):
            # A token with '/', '+' and '=' in it, as AWS's are: the signed query must survive them.
            doc["nextToken"] = f"tok/{start + self.profiles_page_size}/+page=="
        return doc

    async def _invoke(self, req: Request, resp: Response, model: str) -> None:
        body = req.json() or {}
        text = body.get("inputText")
        if not isinstance(text, str):
            return await self._error(
                resp, 400, "Malformed input request: #: required key [inputText] not found"
            )
        dims = int(body.get("dimensions", 1024))
        vector = titan_vector(text, dims)
        await resp.send(
            200,
            {
                "embedding": vector,
                "embeddingsByType": {"float": vector},
                "inputTextTokenCount": len(text.split()),
            },
        )

    # --- ConverseStream -------------------------------------------------------------------------

    def frames(self) -> list[bytes]:
        r = self.reply
        out = [_frame("messageStart", {"role": "assistant"})]
        index = 0
        for block in self.reasoning:
            for chunk in block.chunks:
                out.append(
                    _frame(
                        "contentBlockDelta",
                        {"contentBlockIndex": index, "delta": {"reasoningContent": {"text": chunk}}},
                    )
                )
            if block.signature:
                out.append(
                    _frame(
                        "contentBlockDelta",
                        {
                            "contentBlockIndex": index,
                            "delta": {"reasoningContent": {"signature": block.signature}},
                        },
                    )
                )
            if block.redacted:
                out.append(
                    _frame(
                        "contentBlockDelta",
                        {
                            "contentBlockIndex": index,
                            "delta": {"reasoningContent": {"redactedContent": block.redacted}},
                        },
                    )
                )
            out.append(_frame("contentBlockStop", {"contentBlockIndex": index}))
            index += 1
        if r.text_chunks:
            for chunk in r.text_chunks:
                out.append(
                    _frame("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": chunk}})
                )
            out.append(_frame("contentBlockStop", {"contentBlockIndex": index}))
            index += 1
        for call in r.tool_calls:
            start = {"toolUse": {"toolUseId": call.id, "name": call.name}}
            out.append(_frame("contentBlockStart", {"contentBlockIndex": index, "start": start}))
            for fragment in call.argument_chunks:
                out.append(
                    _frame(
                        "contentBlockDelta",
                        {"contentBlockIndex": index, "delta": {"toolUse": {"input": fragment}}},
                    )
                )
            out.append(_frame("contentBlockStop", {"contentBlockIndex": index}))
            index += 1
        out.append(_frame("messageStop", {"stopReason": self.stop_reason or _STOP.get(r.finish, "end_turn")}))
        usage = {
            "inputTokens": max(r.input_tokens - self.cache_read - self.cache_write, 0),
            "outputTokens": r.output_tokens,
            "totalTokens": r.input_tokens + r.output_tokens,
            "cacheReadInputTokens": self.cache_read,
            "cacheWriteInputTokens": self.cache_write,
        }
        metadata: dict[str, Any] = {"usage": usage, "metrics": {"latencyMs": 42}}
        if self.trace is not None:
            metadata["trace"] = self.trace
        out.append(_frame("metadata", metadata))
        return out

    async def _converse(self, req: Request, resp: Response, fault: Fault | None) -> None:
        try:
            body = json.loads(req.body)
        except ValueError:
            return await self._error(resp, 400, "Malformed request body")
        if not isinstance(body, dict) or not body.get("messages"):
            return await self._error(
                resp, 400, "1 validation error detected: Value at 'messages' failed to satisfy constraint"
            )
        if fault is not None and fault.kind == "stall_before_headers":
            await asyncio.sleep(fault.seconds)
        frames = self.frames()
        if self.corrupt is not None:
            frames[1] = corrupted(frames[1], self.corrupt)
            self.corrupt = None
        await resp.start_stream(
            200, content_type=EVENT_STREAM, headers={"x-amzn-RequestId": "fake-request-id"}
        )
        for i, frame in enumerate(frames):
            if (
                fault is not None
                and fault.kind not in ("status", "stall_before_headers")
                and i == 1 + fault.after_chunks
            ):
                if fault.kind == "error_event":
                    await resp.write(
                        exception_frame(
                            fault.error_type or "throttlingException", fault.message or _MESSAGES[429]
                        )
                    )
                    return await resp.end()
                if fault.kind == "malformed":
                    await resp.write(corrupted(frame, "message"))
                    return await resp.end()
                if fault.kind == "disconnect_mid_stream":
                    return resp.abort()
                if fault.kind == "stall_mid_stream":
                    await asyncio.sleep(fault.seconds)
                if fault.kind == "no_terminator":
                    return await resp.end()
            if self.reply.chunk_delay:
                await asyncio.sleep(self.reply.chunk_delay)
            await resp.write(frame)
        await resp.end()


def _summary(model: str) -> dict[str, Any]:
    provider = model.split(".", 1)[0]
    embedding = "embed" in model
    return {
        "modelArn": f"arn:aws:bedrock:us-east-1::foundation-model/{model}",
        "modelId": model,
        "modelName": model,
        "providerName": provider.title(),
        "inputModalities": ["TEXT"],
        "outputModalities": ["EMBEDDING" if embedding else "TEXT"],
        "responseStreamingSupported": not embedding,
        "customizationsSupported": [],
        "inferenceTypesSupported": ["ON_DEMAND"],
        "modelLifecycle": {"status": "ACTIVE"},
    }
