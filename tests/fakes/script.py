"""What a fake upstream should answer, in protocol-neutral terms.

Every fake (OpenAI, Anthropic, Ollama) renders a `Reply` in its own wire format and
interprets a `Fault` the way that vendor would fail, so the contract and reliability
suites can drive any provider with the same script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FaultKind = Literal[
    "status",  # an HTTP error status with the protocol's error body
    "reset_before_headers",  # TCP reset before any response byte
    "stall_before_headers",  # accept the request, send nothing for `seconds`
    "stall_mid_stream",  # send `after_chunks` content chunks, then nothing for `seconds`
    "disconnect_mid_stream",  # send `after_chunks` content chunks, then reset the connection
    "malformed",  # send `after_chunks` content chunks, then a line that is not valid JSON
    "no_terminator",  # send all content, then close cleanly without the protocol's end marker
    "error_event",  # send `after_chunks` content chunks, then the protocol's in-stream error
]


@dataclass
class Fault:
    kind: FaultKind
    status: int = 500
    # Error message; the fake wraps it in the vendor's error body (None: a default per status).
    message: str | None = None
    # Vendor error type/code override (e.g. "insufficient_quota", "overloaded_error").
    error_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    after_chunks: int = 1
    seconds: float = 30.0


@dataclass
class ToolCallScript:
    id: str
    name: str
    # The arguments JSON text, split into the fragments a streaming vendor would send.
    argument_chunks: list[str]

    @property
    def arguments(self) -> str:
        return "".join(self.argument_chunks)


@dataclass
class Reply:
    text_chunks: list[str] = field(default_factory=lambda: ["Hel", "lo", " there", "!"])
    tool_calls: list[ToolCallScript] = field(default_factory=list)
    # Neutral finish reason: "stop", "length", "tool_calls", "content_filter".
    finish: str = "stop"
    input_tokens: int = 12
    output_tokens: int = 5
    cached_input_tokens: int = 0
    # Pause between chunks, seconds.
    chunk_delay: float = 0.0
    # The model name the upstream reports (None: echo the requested model).
    model: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_chunks)


def weather_tool_reply() -> Reply:
    """The tool-call answer the contract test expects from every provider."""
    return Reply(
        text_chunks=[],
        tool_calls=[
            ToolCallScript(id="call_w1", name="get_weather", argument_chunks=['{"city":', ' "Paris"}'])
        ],
        finish="tool_calls",
        input_tokens=40,
        output_tokens=9,
    )


def as_json_args(chunks: list[str]) -> Any:
    import json

    return json.loads("".join(chunks))
