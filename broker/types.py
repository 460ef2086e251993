"""Provider-neutral types: what sits between the gRPC API and the wire protocols.

The servicer converts proto <-> these; providers convert these <-> one vendor's JSON.
Nothing here knows any provider's wire format, and nothing in providers/ sees a proto.
Dataclasses with slots: one request creates many events, so they stay cheap.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


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


class ResponseFormat(enum.StrEnum):
    DEFAULT = "default"
    TEXT = "text"
    JSON = "json"


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


@dataclass(slots=True, frozen=True)
class TextPart:
    text: str


@dataclass(slots=True, frozen=True)
class ImagePart:
    """An image by inline bytes or by URL; media_type is required with bytes."""

    data: bytes | None = None
    url: str | None = None
    media_type: str = ""


ContentPart = TextPart | ImagePart


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


@dataclass(slots=True, frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)  # JSON Schema


@dataclass(slots=True, frozen=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.DEFAULT
    tool_name: str = ""


@dataclass(slots=True, frozen=True)
class GenerationParams:
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    response_format: ResponseFormat = ResponseFormat.DEFAULT


@dataclass(slots=True)
class CompletionRequest:
    """One completion as a provider sees it: the model is the provider's own id."""

    model: str
    messages: list[Message]
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    params: GenerationParams = field(default_factory=GenerationParams)
    # The provider's configured output limit for a request that sets none (ProviderConfig
    # default_max_tokens); None: the protocol's own rule (Anthropic, which requires a limit,
    # sends 4096; the others send none). Capped by max_output_tokens, see output_limit().
    default_max_tokens: int | None = None
    # The model's max output, from discovery or the catalogue (None: unknown).
    max_output_tokens: int | None = None
    # A reasoning model (o-series, gpt-5 family, per the catalogue); None: not in the catalogue.
    reasoning_model: bool | None = None
    # Seconds the caller will still wait, or None; bounds the upstream timeout.
    timeout: float | None = None

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
class ProgressEvent:
    """The upstream is working but has no answer content to show: a thinking or reasoning
    delta, a signature, a keep-alive ping. It re-arms the time-to-first-token and stall
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


CompletionEvent = StartEvent | TextDeltaEvent | ToolCallDeltaEvent | ProgressEvent | EndEvent


# --- model facts --------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Pricing:
    """USD per million tokens, as decimal strings would lose nothing: kept in micro-USD."""

    input_micro_usd_per_mtok: int
    output_micro_usd_per_mtok: int
    cached_input_micro_usd_per_mtok: int | None = None
    # Anthropic bills prompt-cache writes at 1.25x input; None means the input price.
    cache_write_input_micro_usd_per_mtok: int | None = None


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
