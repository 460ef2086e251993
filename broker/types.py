"""Provider-neutral types: what sits between the gRPC API and the wire protocols.

The servicer converts proto <-> these (broker/convert.py); providers convert these <-> one
vendor's JSON. Nothing here knows any provider's wire format or a proto, and nothing in
providers/ sees a proto. Every domain type of a completion lives here: the caller's
`CompletionCall` (with its `Requirements`), the per-target `CompletionRequest` a provider
sees (built from a call by `CompletionCall.upstream`), the provider's stream events, the
completion's outputs (`Started`, deltas, `Finished`) and the model facts.
Dataclasses with slots: one request creates many events, so they stay cheap.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    OTHER = "other"
    REFUSAL = "refusal"


class ResponseFormat(enum.StrEnum):
    DEFAULT = "default"
    TEXT = "text"
    JSON = "json"
    JSON_SCHEMA = "json_schema"


class ToolChoiceMode(enum.StrEnum):
    DEFAULT = "default"
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    TOOL = "tool"


class Capability(enum.StrEnum):
    VISION = "vision"
    TOOLS = "tools"
    JSON_MODE = "json_mode"
    REASONING = "reasoning"
    STRUCTURED_OUTPUTS = "structured_outputs"
    DOCUMENTS = "documents"


class CacheTTL(enum.StrEnum):
    """A prompt-cache breakpoint's lifetime; DEFAULT is the provider's (Anthropic: 5m)."""

    DEFAULT = ""
    FIVE_MINUTES = "5m"
    ONE_HOUR = "1h"


@dataclass(slots=True, frozen=True)
class TextPart:
    text: str
    # A prompt-cache breakpoint after this part; None: none.
    cache: CacheTTL | None = None


@dataclass(slots=True, frozen=True)
class ImagePart:
    """An image by inline bytes or by URL; media_type is required with bytes."""

    data: bytes | None = None
    url: str | None = None
    media_type: str = ""
    cache: CacheTTL | None = None


@dataclass(slots=True, frozen=True)
class DocumentPart:
    """A document by inline bytes (PDF or plain text) or by URL (PDF)."""

    data: bytes | None = None
    url: str | None = None
    media_type: str = "application/pdf"
    title: str = ""
    cache: CacheTTL | None = None


@dataclass(slots=True, frozen=True)
class ReasoningPart:
    """A model's reasoning as it produced it, kept byte-exact for the provider type that made
    it (`provider_type`); `CompletionCall.upstream` drops it for any other type.
    Anthropic: `text` + `signature` (thinking) or `redacted_data` (redacted_thinking)."""

    text: str = ""
    signature: str = ""
    redacted_data: str = ""
    provider_type: str = ""


ContentPart = TextPart | ImagePart | DocumentPart | ReasoningPart


@dataclass(slots=True, frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model produced it


@dataclass(slots=True)
class Message:
    role: Role
    content: list[ContentPart] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str = ""
    is_error: bool = False

    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def has_image(self) -> bool:
        return any(isinstance(p, ImagePart) for p in self.content)

    def has_document(self) -> bool:
        return any(isinstance(p, DocumentPart) for p in self.content)

    def reasoning(self) -> list[ReasoningPart]:
        return [p for p in self.content if isinstance(p, ReasoningPart)]


@dataclass(slots=True, frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)  # JSON Schema
    # Arguments constrained to the schema (checked against the strict rules by convert).
    strict: bool = False
    cache: CacheTTL | None = None


@dataclass(slots=True, frozen=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.DEFAULT
    tool_name: str = ""


@dataclass(slots=True, frozen=True)
class JsonSchemaFormat:
    """A structured-output format: the answer is JSON matching `schema` (root an object)."""

    name: str
    schema: dict[str, Any]
    description: str = ""
    strict: bool = False


class ReasoningEffort(enum.StrEnum):
    MINIMAL = "minimal"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


@dataclass(slots=True, frozen=True)
class ReasoningConfig:
    """Thinking asked for: exactly one of an effort, a token budget, or disabled."""

    effort: ReasoningEffort | None = None
    budget_tokens: int | None = None
    disabled: bool = False

    @property
    def enabled(self) -> bool:
        return not self.disabled


@dataclass(slots=True, frozen=True)
class GenerationParams:
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    response_format: ResponseFormat = ResponseFormat.DEFAULT
    # With ResponseFormat.JSON_SCHEMA.
    json_schema: JsonSchemaFormat | None = None
    # None: the provider's default (the model may still think; nothing is asked).
    reasoning: ReasoningConfig | None = None


@dataclass(slots=True, frozen=True)
class RequestMetadata:
    """Who a request is for: an opaque end-user id (the vendor's user field) and bounded tags
    (log line, traces). Never a metric label."""

    end_user_id: str = ""
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Requirements:
    """What a model must offer to be selected (or to serve a named model): empty, anything goes."""

    capabilities: frozenset[Capability] = frozenset()
    min_context_window: int = 0
    # Embedding models only: native vector size at least this.
    min_dimensions: int = 0
    # "chat" or "embedding": which models selection considers ("" = chat).
    kind: str = ""
    max_input_price_micro_usd_per_mtok: int | None = None
    max_output_price_micro_usd_per_mtok: int | None = None
    allow_providers: tuple[str, ...] = ()
    exclude_providers: tuple[str, ...] = ()
    preference: str = "priority"  # "priority", "cheapest" or "fastest"

    def is_empty(self) -> bool:
        return self == Requirements()


@dataclass(slots=True)
class Prompt:
    """What a completion asks for, whoever asks: the model, the conversation, tools, parameters.

    Both a caller's `CompletionCall` and the per-target `CompletionRequest` are one; `model`
    is a model reference in the first and the provider's own model id in the second."""

    model: str
    messages: list[Message]
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    params: GenerationParams = field(default_factory=GenerationParams)
    metadata: RequestMetadata = field(default_factory=RequestMetadata)
    # Vendor parameters (checked by convert and by each wire module: they never override what
    # the broker sets). A CompletionCall holds provider type -> that type's options; a
    # CompletionRequest holds its own type's options only (CompletionCall.upstream picks them).
    provider_options: dict[str, Any] = field(default_factory=dict)

    def needed_capabilities(self) -> set[Capability]:
        """The capabilities this request needs of any model that serves it."""
        needed: set[Capability] = set()
        if any(m.has_image() for m in self.messages):
            needed.add(Capability.VISION)
        if any(m.has_document() for m in self.messages):
            needed.add(Capability.DOCUMENTS)
        if self.tools:
            needed.add(Capability.TOOLS)
        fmt = self.params.response_format
        if fmt is ResponseFormat.JSON:
            needed.add(Capability.JSON_MODE)
        if fmt is ResponseFormat.JSON_SCHEMA or any(t.strict for t in self.tools):
            needed.add(Capability.STRUCTURED_OUTPUTS)
        reasoning = self.params.reasoning
        if reasoning is not None and reasoning.enabled:
            needed.add(Capability.REASONING)
        return needed


@dataclass(slots=True)
class CompletionCall(Prompt):
    """A validated completion request from a caller, before a model is resolved.

    `model` is what the caller named: `provider/model`, a bare model id, an alias, or empty
    with `requirements` to select one; `fallback_models` are tried in order after it."""

    requirements: Requirements = field(default_factory=Requirements)
    fallback_models: list[str] = field(default_factory=list)

    def upstream(
        self,
        model: str,
        *,
        provider_type: str = "",
        reasoning_origin: str = "",
        default_max_tokens: int | None,
        max_output_tokens: int | None,
        reasoning_model: bool | None,
        timeout: float | None,
        caller_times_reads: bool = False,
    ) -> CompletionRequest:
        """This call as one provider is asked it: `model` is that provider's own id;
        `reasoning_origin` (Provider.reasoning_origin, default the type) decides which history
        reasoning it may see and is the request's provider_type."""
        origin = reasoning_origin or provider_type
        return CompletionRequest(
            model=model,
            messages=messages_for(self.messages, origin),
            tools=self.tools,
            tool_choice=self.tool_choice,
            params=self.params,
            metadata=self.metadata,
            provider_options=self.provider_options.get(provider_type, {}),
            provider_type=origin,
            default_max_tokens=default_max_tokens,
            max_output_tokens=max_output_tokens,
            reasoning_model=reasoning_model,
            timeout=timeout,
            caller_times_reads=caller_times_reads,
        )


def messages_for(messages: list[Message], provider_type: str) -> list[Message]:
    """The history as a provider of `provider_type` may see it: reasoning parts another type
    produced are dropped (a signature is bound to its vendor, and foreign thinking would be
    rejected or misread); the list is shared, not copied, when there is nothing to drop."""
    if not any(
        isinstance(p, ReasoningPart) and p.provider_type != provider_type for m in messages for p in m.content
    ):
        return messages
    out: list[Message] = []
    for m in messages:
        if any(isinstance(p, ReasoningPart) and p.provider_type != provider_type for p in m.content):
            kept = [
                p
                for p in m.content
                if not (isinstance(p, ReasoningPart) and p.provider_type != provider_type)
            ]
            m = Message(m.role, kept, m.tool_calls, m.tool_call_id, m.is_error)
        out.append(m)
    return out


@dataclass(slots=True)
class CompletionRequest(Prompt):
    """One completion as a provider sees it: the model is the provider's own id, the history
    holds only reasoning this provider's type produced, and `provider_options` are this
    type's alone (a dict of vendor parameters, not keyed by type)."""

    # The provider's type ("openai", "anthropic", ...), for reasoning parts it produces.
    provider_type: str = ""

    # The provider's configured output limit for a request that sets none (ProviderConfig
    # default_max_tokens); None: the protocol's own rule (Anthropic, which requires a limit,
    # sends 4096; the others send none). Capped by max_output_tokens, see output_limit().
    default_max_tokens: int | None = None
    # The model's max output, from discovery or the catalogue (None: unknown).
    max_output_tokens: int | None = None
    # A reasoning model (o-series, gpt-5 family, per the catalogue); None: not in the catalogue.
    reasoning_model: bool | None = None
    # Seconds the caller will still wait, or None; bounds the pool wait, the connect and
    # (unless caller_times_reads) each read.
    timeout: float | None = None
    # True when whoever reads the stream times each wait for the next event itself (the
    # completion service's time-to-first-token and stall timer): the HTTP reads then have no
    # timeout of their own, so one timer and one message cover a silent upstream. False (a
    # provider used on its own): read_timeout_seconds bounds each network read.
    caller_times_reads: bool = False

    def output_limit(self, protocol_default: int | None) -> int | None:
        """The output limit to send: the caller's own, else the configured default, else the
        protocol's; a default (never the caller's own limit) is capped by the model's max output."""
        if self.params.max_tokens is not None:
            return self.params.max_tokens
        limit = self.default_max_tokens if self.default_max_tokens is not None else protocol_default
        if limit is not None and self.max_output_tokens:
            limit = min(limit, self.max_output_tokens)
        return limit


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    # True when the upstream reported no usage and the counts are the broker's estimate.
    estimated: bool = False
    # Output tokens spent reasoning, included in output_tokens (billed once, as output).
    reasoning_tokens: int = 0
    # Of cache_write_input_tokens, those written with a one-hour TTL (Anthropic: 2x input).
    cache_write_1h_input_tokens: int = 0


@dataclass(slots=True, frozen=True)
class Cost:
    """Integer micro-USD. known=False means no price is known (not free)."""

    known: bool = False
    input_micro_usd: int = 0
    output_micro_usd: int = 0

    @property
    def total_micro_usd(self) -> int:
        return self.input_micro_usd + self.output_micro_usd


# --- stream events: the one path; unary accumulates them --------------------------------


@dataclass(slots=True, frozen=True)
class StartEvent:
    """The upstream accepted the request (2xx). `model` is the model requested of it."""

    model: str = ""


@dataclass(slots=True, frozen=True)
class TextDeltaEvent:
    text: str


@dataclass(slots=True, frozen=True)
class ToolCallDeltaEvent:
    """First delta of a call has id and name; later ones with the same index add arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments_delta: str = ""


@dataclass(slots=True, frozen=True)
class ReasoningDeltaEvent:
    """A piece of the model's reasoning, forwarded to the caller (content: after it, no
    fallback). `index` numbers reasoning blocks in order (0, 1, ...); Anthropic sends the
    block's `signature` on its last delta and a redacted block whole as `redacted_data`."""

    index: int
    text: str = ""
    signature: str = ""
    redacted_data: str = ""


@dataclass(slots=True, frozen=True)
class Refusal:
    """Why the model or the vendor declined: the explanation and, where given, a category."""

    explanation: str = ""
    category: str = ""


@dataclass(slots=True, frozen=True)
class ProgressEvent:
    """The upstream is working but has nothing to show: a keep-alive ping, hidden reasoning
    (reasoning text is a ReasoningDeltaEvent). It re-arms the time-to-first-token and stall
    timers and is never forwarded to the caller, nor counted as the first content.
    `chars` is the size of generated (hidden) text, for a usage estimate; 0 for pings."""

    chars: int = 0


@dataclass(slots=True, frozen=True)
class EndEvent:
    finish_reason: FinishReason
    usage: Usage
    # False when the stream carried no usage at all (llama.cpp's server with include_usage):
    # the counts are then zeros, not counts, and the broker estimates them.
    usage_reported: bool = True
    # With FinishReason.REFUSAL (or a content filter that explained itself).
    refusal: Refusal | None = None


CompletionEvent = (
    StartEvent | TextDeltaEvent | ReasoningDeltaEvent | ToolCallDeltaEvent | ProgressEvent | EndEvent
)


# --- a completion's outputs: what the completion service yields to the servicer ----------


@dataclass(slots=True, frozen=True)
class Started:
    """The first output, sent with the first content: who is answering."""

    request_id: str
    provider: str
    model: str
    # The provider's type: the provider_type of reasoning parts sent back in history.
    provider_type: str = ""


@dataclass(slots=True, frozen=True)
class Finished:
    """The last output: why the answer ended, what it used and cost."""

    finish_reason: FinishReason
    usage: Usage
    cost: Cost
    refusal: Refusal | None = None


Output = Started | TextDeltaEvent | ReasoningDeltaEvent | ToolCallDeltaEvent | Finished


# --- embeddings ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class EmbedCall:
    """An Embed RPC, checked and bounded (broker/convert.py)."""

    model: str
    inputs: tuple[str, ...]
    dimensions: int | None = None
    fallback_models: tuple[str, ...] = ()
    # With an empty model: what to select (min_dimensions, providers, prices, preference).
    requirements: Requirements = field(default_factory=Requirements)


@dataclass(slots=True, frozen=True)
class EmbedRequest:
    """What a provider is asked: one resolved model, the whole batch (the provider splits it)."""

    model: str
    inputs: tuple[str, ...]
    dimensions: int | None = None
    timeout: float | None = None  # seconds left of the caller's deadline


@dataclass(slots=True, frozen=True)
class EmbedResult:
    """One vector per input, in input order; `input_tokens` as the upstream reported it."""

    vectors: tuple[tuple[float, ...], ...]
    input_tokens: int = 0
    usage_reported: bool = True


@dataclass(slots=True, frozen=True)
class Embedded:
    """The answer of the embedding service to the servicer."""

    request_id: str
    provider: str
    model: str
    vectors: tuple[tuple[float, ...], ...]
    usage: Usage
    cost: Cost


# --- model facts --------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Pricing:
    """USD per million tokens, as decimal strings would lose nothing: kept in micro-USD."""

    input_micro_usd_per_mtok: int
    output_micro_usd_per_mtok: int
    cached_input_micro_usd_per_mtok: int | None = None
    # Anthropic bills prompt-cache writes at 1.25x input; None means the input price.
    cache_write_input_micro_usd_per_mtok: int | None = None
    # Writes with a one-hour TTL (Anthropic: 2x input); None means twice the input price.
    cache_write_1h_input_micro_usd_per_mtok: int | None = None


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """What the broker knows about one model at one provider."""

    provider: str
    name: str
    capabilities: frozenset[Capability] = frozenset()
    capabilities_known: bool = False
    context_window: int | None = None
    max_output_tokens: int | None = None
    pricing: Pricing | None = None
    # A reasoning model (hidden reasoning tokens count against the output limit); None: unknown.
    reasoning: bool | None = None
    source: str = "discovered"
    discovered: bool = False
    # "chat", "embedding", or "" (unknown: the catalogue has no entry); `dimensions` is an
    # embedding model's native vector size.
    kind: str = ""
    dimensions: int | None = None

    @property
    def id(self) -> str:
        return f"{self.provider}/{self.name}"


@dataclass(slots=True, frozen=True)
class DiscoveredModel:
    """A model a provider listed, with whatever facts its listing carried."""

    name: str
    capabilities: frozenset[Capability] | None = None
    context_window: int | None = None
    # The most output tokens the model can produce (Anthropic's listing: `max_tokens`).
    max_output_tokens: int | None = None


class Permissions(Protocol):
    """What a caller may use, as the auth gate resolved it once per RPC (broker/auth.py):
    `may_use` filters what selection picks; `require` refuses a named model with a status
    that names the key and its allow-list."""

    def may_use(self, provider: str, model: str) -> bool: ...

    def require(self, provider: str, model: str, *, requested: str = "", hint: str = "") -> None: ...


class AllowAll:
    """Permissions when caller auth is off."""

    def may_use(self, provider: str, model: str) -> bool:
        return True

    def require(self, provider: str, model: str, *, requested: str = "", hint: str = "") -> None:
        return None


ALLOW_ALL = AllowAll()
