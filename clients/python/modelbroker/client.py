"""A thin Python client for model-broker, sync and async.

    from modelbroker.client import BrokerClient, user
    with BrokerClient("127.0.0.1:50051") as c:
        for ev in c.stream("openai/gpt-4o-mini", [user("Hi")]):
            if isinstance(ev, TextDelta): print(ev.text, end="")
        answer = c.complete("openai/gpt-4o-mini", "Hi")      # a str is one user message

Reasoning models: `ReasoningDelta` events come apart from the text; to continue a
conversation (a tool loop with Anthropic thinking), send back the assistant turn as the
broker gave it: `answer.message` (unary) or `Turn` fed every stream event, `.message()`.

gRPC errors surface as `BrokerError` subclasses (by status code) carrying the ErrorInfo
reason and metadata, RetryInfo's delay and BadRequest's field violations.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc

ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT, "tool": pb.ROLE_TOOL}
FINISH_REASONS = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}

# --- errors ------------------------------------------------------------------------------------


class BrokerError(Exception):
    """A failed RPC: the status code, message and google.rpc details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.retry_delay = retry_delay
        self.field_violations = list(field_violations)


class InvalidRequestError(BrokerError):
    pass


class ModelNotFoundError(BrokerError):
    pass


class FailedPreconditionError(BrokerError):
    pass


class AuthenticationError(BrokerError):
    pass


class PermissionDeniedError(BrokerError):
    pass


class RateLimitedError(BrokerError):
    pass


class DeadlineExceededError(BrokerError):
    pass


class UnavailableError(BrokerError):
    pass


class StreamInterruptedError(UnavailableError):
    """The stream failed after output arrived; what was received is all there is."""


_BY_CODE: dict[grpc.StatusCode, type[BrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def error_from_rpc(err: grpc.RpcError) -> BrokerError:
    """Turn a grpc error (sync or aio) into the typed exception with its details unpacked."""
    code: grpc.StatusCode = err.code()
    message: str = err.details() or ""
    reason, metadata, delay, violations = "", {}, None, []
    status = rpc_status.from_call(err)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                detail.Unpack(ri)
                delay = ri.retry_delay.ToTimedelta().total_seconds()
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                detail.Unpack(br)
                violations = [(v.field, v.description) for v in br.field_violations]
    cls = StreamInterruptedError if reason == "STREAM_INTERRUPTED" else _BY_CODE.get(code, BrokerError)
    return cls(
        code, message, reason=reason, metadata=metadata, retry_delay=delay, field_violations=violations
    )


# --- events and answers -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    # True when the upstream reported no usage and the broker estimated it (~4 chars a token).
    estimated: bool = False
    # Output tokens spent reasoning (part of output_tokens), where the vendor reports them.
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Cost:
    known: bool
    total_micro_usd: int

    @property
    def usd(self) -> float | None:
        """For display only; the exact figure is the integer micro-USD."""
        return self.total_micro_usd / 1_000_000 if self.known else None


@dataclass(frozen=True, slots=True)
class StreamStarted:
    request_id: str
    model: str
    provider: str
    provider_type: str = ""


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning (never part of the answer text)."""

    index: int
    text: str
    signature: str = ""
    redacted_data: str = ""


@dataclass(frozen=True, slots=True)
class Refusal:
    explanation: str
    category: str = ""


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    id: str
    name: str
    arguments_delta: str


@dataclass(frozen=True, slots=True)
class StreamEnded:
    finish_reason: str
    usage: Usage
    cost: Cost
    refusal: Refusal | None = None


Event = StreamStarted | TextDelta | ReasoningDelta | ToolCallDelta | StreamEnded


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> Any:
        return json.loads(self.arguments)


@dataclass(slots=True)
class Answer:
    text: str
    finish_reason: str
    usage: Usage
    cost: Cost
    model: str
    provider: str
    request_id: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    # The reasoning text, joined (display only; send `message` back in history).
    reasoning: str = ""
    refusal: Refusal | None = None
    # The assistant turn as the broker answered it, reasoning parts included: history.
    message: pb.Message = field(default_factory=lambda: pb.Message(role=pb.ROLE_ASSISTANT))


class Turn:
    """A streamed assistant turn, assembled as the broker's unary answer would be: text and
    reasoning parts in order (signatures and redacted blocks kept), then the tool calls."""

    def __init__(self) -> None:
        self.provider_type = ""
        self._parts: list[pb.ContentPart] = []
        self._calls: dict[int, list[str]] = {}
        self._index = -1  # the reasoning block the last reasoning part holds
        self.ended: StreamEnded | None = None

    def add(self, ev: Event) -> None:
        if isinstance(ev, StreamStarted):
            self.provider_type = ev.provider_type
        elif isinstance(ev, TextDelta):
            last = self._parts[-1] if self._parts else None
            if last is not None and last.WhichOneof("part") == "text":
                last.text += ev.text
            elif ev.text:
                self._parts.append(pb.ContentPart(text=ev.text))
        elif isinstance(ev, ReasoningDelta):
            last = self._parts[-1] if self._parts else None
            if last is None or last.WhichOneof("part") != "reasoning" or self._index != ev.index:
                last = pb.ContentPart(reasoning=pb.ReasoningPart(provider_type=self.provider_type))
                self._parts.append(last)
                self._index = ev.index
            last.reasoning.text += ev.text
            last.reasoning.signature += ev.signature
            last.reasoning.redacted_data += ev.redacted_data
        elif isinstance(ev, ToolCallDelta):
            call = self._calls.setdefault(ev.index, ["", "", ""])
            call[0] = ev.id or call[0]
            call[1] = ev.name or call[1]
            call[2] += ev.arguments_delta
        elif isinstance(ev, StreamEnded):
            self.ended = ev

    @property
    def text(self) -> str:
        return "".join(p.text for p in self._parts if p.WhichOneof("part") == "text")

    def message(self) -> pb.Message:
        m = pb.Message(role=pb.ROLE_ASSISTANT, content=self._parts)
        for _, (cid, name, args) in sorted(self._calls.items()):
            m.tool_calls.add(id=cid, name=name, arguments=args or "{}")
        return m


@dataclass(slots=True)
class Embeddings:
    """One vector per input, in input order."""

    vectors: list[list[float]]
    usage: Usage
    cost: Cost
    model: str
    provider: str
    request_id: str

    @property
    def dimensions(self) -> int:
        return len(self.vectors[0]) if self.vectors else 0


def embeddings_from_proto(resp: pb.EmbedResponse) -> Embeddings:
    ordered = sorted(resp.embeddings, key=lambda e: e.index)
    return Embeddings(
        vectors=[list(e.values) for e in ordered],
        usage=_usage(resp.usage),
        cost=_cost(resp.cost),
        model=resp.model,
        provider=resp.provider,
        request_id=resp.request_id,
    )


def build_embed_request(
    model: str,
    inputs: str | Sequence[str],
    *,
    dimensions: int | None = None,
    fallback_models: Sequence[str] = (),
    min_dimensions: int = 0,
) -> pb.EmbedRequest:
    """`model` may be "" with `min_dimensions` to let the broker select an embedding model."""
    req = pb.EmbedRequest(
        model=model,
        inputs=[inputs] if isinstance(inputs, str) else list(inputs),
        fallback_models=list(fallback_models),
    )
    if dimensions is not None:
        req.dimensions = dimensions
    if min_dimensions:
        req.requirements.min_dimensions = min_dimensions
    return req


def _usage(u: pb.Usage) -> Usage:
    return Usage(u.input_tokens, u.output_tokens, u.cached_input_tokens, u.estimated, u.reasoning_tokens)


def _refusal(holder: pb.CompleteResponse | pb.StreamEnd) -> Refusal | None:
    if not holder.HasField("refusal"):
        return None
    return Refusal(holder.refusal.explanation, holder.refusal.category)


def _cost(c: pb.Cost) -> Cost:
    return Cost(c.known, c.total_micro_usd)


def event_from_proto(msg: pb.StreamCompleteResponse) -> Event:
    kind = msg.WhichOneof("event")
    if kind == "start":
        return StreamStarted(
            msg.start.request_id, msg.start.model, msg.start.provider, msg.start.provider_type
        )
    if kind == "text_delta":
        return TextDelta(msg.text_delta.text)
    if kind == "reasoning_delta":
        r = msg.reasoning_delta
        return ReasoningDelta(r.index, r.text, r.signature, r.redacted_data)
    if kind == "tool_call_delta":
        d = msg.tool_call_delta
        return ToolCallDelta(d.index, d.id, d.name, d.arguments_delta)
    return StreamEnded(
        FINISH_REASONS.get(msg.end.finish_reason, "unspecified"),
        _usage(msg.end.usage),
        _cost(msg.end.cost),
        _refusal(msg.end),
    )


def answer_from_proto(resp: pb.CompleteResponse) -> Answer:
    text = "".join(p.text for p in resp.message.content if p.WhichOneof("part") == "text")
    return Answer(
        text=text,
        finish_reason=FINISH_REASONS.get(resp.finish_reason, "unspecified"),
        usage=_usage(resp.usage),
        cost=_cost(resp.cost),
        model=resp.model,
        provider=resp.provider,
        request_id=resp.request_id,
        tool_calls=[ToolCall(t.id, t.name, t.arguments) for t in resp.message.tool_calls],
        reasoning="".join(
            p.reasoning.text for p in resp.message.content if p.WhichOneof("part") == "reasoning"
        ),
        refusal=_refusal(resp),
        message=resp.message,
    )


# --- building requests ---------------------------------------------------------------------------

MessageLike = pb.Message | Mapping[str, Any]


def system(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_SYSTEM, content=[pb.ContentPart(text=text)])


def user(text: str, *attachments: pb.Image | pb.ContentPart) -> pb.Message:
    parts = [pb.ContentPart(text=text)] + [
        a if isinstance(a, pb.ContentPart) else pb.ContentPart(image=a) for a in attachments
    ]
    return pb.Message(role=pb.ROLE_USER, content=parts)


def assistant(text: str = "", tool_calls: Sequence[ToolCall] = ()) -> pb.Message:
    m = pb.Message(role=pb.ROLE_ASSISTANT)
    if text:
        m.content.add(text=text)
    for tc in tool_calls:
        m.tool_calls.add(id=tc.id, name=tc.name, arguments=tc.arguments)
    return m


def tool_result(tool_call_id: str, content: str, *, is_error: bool = False) -> pb.Message:
    return pb.Message(
        role=pb.ROLE_TOOL,
        tool_call_id=tool_call_id,
        is_error=is_error,
        content=[pb.ContentPart(text=content)],
    )


def tool(name: str, description: str, parameters: Mapping[str, Any], *, strict: bool = False) -> pb.Tool:
    s = struct_pb2.Struct()
    s.update(dict(parameters))
    return pb.Tool(name=name, description=description, parameters=s, strict=strict)


def document(
    data: bytes = b"", *, url: str = "", media_type: str = "application/pdf", title: str = ""
) -> pb.ContentPart:
    """A document part (PDF bytes or URL, or UTF-8 text with media_type text/plain) for `user(...)`."""
    doc = pb.Document(media_type=media_type, title=title)
    if url:
        doc.url = url
    else:
        doc.data = data
    return pb.ContentPart(document=doc)


EFFORTS = {"minimal": 1, "low": 2, "medium": 3, "high": 4}


def reasoning(effort_or_budget: str | int | None) -> pb.Reasoning:
    """`reasoning("high")`, `reasoning(4096)` (a token budget) or `reasoning(None)` (off)."""
    if effort_or_budget is None:
        return pb.Reasoning(disabled=True)
    if isinstance(effort_or_budget, int):
        return pb.Reasoning(budget_tokens=effort_or_budget)
    if effort_or_budget not in EFFORTS:
        raise ValueError(f"effort must be one of {', '.join(EFFORTS)} or a token budget")
    return pb.Reasoning(effort=pb.ReasoningEffort.Value(f"REASONING_EFFORT_{effort_or_budget.upper()}"))


def json_schema(
    name: str, schema: Mapping[str, Any], *, strict: bool = True, description: str = ""
) -> pb.JsonSchema:
    s = struct_pb2.Struct()
    s.update(dict(schema))
    return pb.JsonSchema(name=name, schema=s, strict=strict, description=description)


def _message(m: MessageLike) -> pb.Message:
    if isinstance(m, pb.Message):
        return m
    role = ROLES.get(str(m.get("role", "")))
    if role is None:
        raise ValueError(f"unknown role {m.get('role')!r}: use one of {', '.join(ROLES)}")
    content = m.get("content", "")
    msg = pb.Message(role=role, tool_call_id=str(m.get("tool_call_id", "")))
    if isinstance(content, str):
        if content:
            msg.content.add(text=content)
    else:
        for part in content:
            msg.content.append(
                part if isinstance(part, pb.ContentPart) else json_format.ParseDict(part, pb.ContentPart())
            )
    return msg


def build_request(
    model: str,
    messages: str | Sequence[MessageLike],
    *,
    tools: Sequence[pb.Tool] = (),
    params: pb.GenerationParams | None = None,
    fallback_models: Sequence[str] = (),
    requirements: pb.Requirements | None = None,
    stream: bool = True,
    reasoning: pb.Reasoning | None = None,
    json_schema: pb.JsonSchema | None = None,
    end_user_id: str = "",
    tags: Mapping[str, str] | None = None,
    provider_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> pb.StreamCompleteRequest | pb.CompleteRequest:
    msgs = [user(messages)] if isinstance(messages, str) else [_message(m) for m in messages]
    cls = pb.StreamCompleteRequest if stream else pb.CompleteRequest
    req = cls(model=model, messages=msgs, tools=list(tools), fallback_models=list(fallback_models))
    if params is not None:
        req.params.CopyFrom(params)
    if reasoning is not None:
        req.params.reasoning.CopyFrom(reasoning)
    if json_schema is not None:
        req.params.json_schema.CopyFrom(json_schema)
    if requirements is not None:
        req.requirements.CopyFrom(requirements)
    if end_user_id or tags:
        req.metadata.end_user_id = end_user_id
        req.metadata.tags.update(dict(tags or {}))
    for ptype, options in (provider_options or {}).items():
        req.provider_options[ptype].update(dict(options))
    return req


def _metadata(api_key: str | None, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    md = list(extra)
    if api_key:
        md.append(("authorization", f"Bearer {api_key}"))
    return md


# --- clients ------------------------------------------------------------------------------------


class BrokerClient:
    """Blocking client. `timeout` is the default deadline in seconds for every call."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = 300.0,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        # `options`: gRPC channel arguments, e.g. ("grpc.ssl_target_name_override", "broker.internal").
        self.channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials
            else grpc.insecure_channel(target, options=options)
        )
        self.stub = pb_grpc.ModelBrokerStub(self.channel)
        self.api_key = api_key
        self.timeout = timeout

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(self, model: str, messages: str | Sequence[MessageLike], **kw: Any) -> Iterator[Event]:
        timeout = kw.pop("timeout", self.timeout)
        req = build_request(model, messages, stream=True, **kw)
        call = self.stub.StreamComplete(req, timeout=timeout, metadata=_metadata(self.api_key))
        try:
            for msg in call:
                yield event_from_proto(msg)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()  # a consumer that stops early cancels the upstream generation too

    def complete(self, model: str, messages: str | Sequence[MessageLike], **kw: Any) -> Answer:
        timeout = kw.pop("timeout", self.timeout)
        req = build_request(model, messages, stream=False, **kw)
        try:
            resp = self.stub.Complete(req, timeout=timeout, metadata=_metadata(self.api_key))
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return answer_from_proto(resp)

    def embed(self, model: str, inputs: str | Sequence[str], **kw: Any) -> Embeddings:
        """Vectors for `inputs` (a str is one input); kw: dimensions, fallback_models, timeout."""
        timeout = kw.pop("timeout", self.timeout)
        req = build_embed_request(model, inputs, **kw)
        try:
            resp = self.stub.Embed(req, timeout=timeout, metadata=_metadata(self.api_key))
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return embeddings_from_proto(resp)

    def list_models(self, provider: str = "") -> list[pb.ModelInfo]:
        """Every model, all pages (the daemon answers at most 1000 per ListModels call)."""
        models: list[pb.ModelInfo] = []
        token = ""
        while True:
            try:
                resp = self.stub.ListModels(
                    pb.ListModelsRequest(provider=provider, page_token=token),
                    timeout=self.timeout,
                    metadata=_metadata(self.api_key),
                )
            except grpc.RpcError as err:
                raise error_from_rpc(err) from None
            models += resp.models
            token = resp.next_page_token
            if not token:
                return models

    def list_providers(self) -> list[pb.ProviderInfo]:
        try:
            resp = self.stub.ListProviders(
                pb.ListProvidersRequest(), timeout=self.timeout, metadata=_metadata(self.api_key)
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return list(resp.providers)

    def usage(self, *key_names: str) -> pb.GetUsageResponse:
        """This key's spend, budget left, requests and tokens for the UTC day and month (GetUsage);
        an admin key may name other keys, and sees every key with no names."""
        try:
            return self.stub.GetUsage(  # type: ignore[no-any-return]
                pb.GetUsageRequest(key_names=list(key_names)),
                timeout=self.timeout,
                metadata=_metadata(self.api_key),
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None


class AsyncBrokerClient:
    """asyncio client on grpc.aio; use `async with`."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = 300.0,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        self.channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials
            else grpc.aio.insecure_channel(target, options=options)
        )
        self.stub = pb_grpc.ModelBrokerStub(self.channel)
        self.api_key = api_key
        self.timeout = timeout

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def stream(
        self, model: str, messages: str | Sequence[MessageLike], **kw: Any
    ) -> AsyncIterator[Event]:
        timeout = kw.pop("timeout", self.timeout)
        req = build_request(model, messages, stream=True, **kw)
        call = self.stub.StreamComplete(req, timeout=timeout, metadata=_metadata(self.api_key))
        try:
            async for msg in call:
                yield event_from_proto(msg)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()

    async def complete(self, model: str, messages: str | Sequence[MessageLike], **kw: Any) -> Answer:
        timeout = kw.pop("timeout", self.timeout)
        req = build_request(model, messages, stream=False, **kw)
        try:
            resp = await self.stub.Complete(req, timeout=timeout, metadata=_metadata(self.api_key))
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return answer_from_proto(resp)

    async def embed(self, model: str, inputs: str | Sequence[str], **kw: Any) -> Embeddings:
        """Vectors for `inputs` (a str is one input); kw: dimensions, fallback_models, timeout."""
        timeout = kw.pop("timeout", self.timeout)
        req = build_embed_request(model, inputs, **kw)
        try:
            resp = await self.stub.Embed(req, timeout=timeout, metadata=_metadata(self.api_key))
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return embeddings_from_proto(resp)

    async def list_models(self, provider: str = "") -> list[pb.ModelInfo]:
        """Every model, all pages (the daemon answers at most 1000 per ListModels call)."""
        models: list[pb.ModelInfo] = []
        token = ""
        while True:
            try:
                resp = await self.stub.ListModels(
                    pb.ListModelsRequest(provider=provider, page_token=token),
                    timeout=self.timeout,
                    metadata=_metadata(self.api_key),
                )
            except grpc.RpcError as err:
                raise error_from_rpc(err) from None
            models += resp.models
            token = resp.next_page_token
            if not token:
                return models

    async def list_providers(self) -> list[pb.ProviderInfo]:
        try:
            resp = await self.stub.ListProviders(
                pb.ListProvidersRequest(), timeout=self.timeout, metadata=_metadata(self.api_key)
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return list(resp.providers)

    async def usage(self, *key_names: str) -> pb.GetUsageResponse:
        """As BrokerClient.usage."""
        try:
            return await self.stub.GetUsage(  # type: ignore[no-any-return]
                pb.GetUsageRequest(key_names=list(key_names)),
                timeout=self.timeout,
                metadata=_metadata(self.api_key),
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
