"""The replay table: recording -> provider config -> request -> what the vendor meant -> gap.

One row per case. A row names its recording in ../shared/recordings (`recording`, default the
row's own id), how the daemon's provider is configured over the replay server (`provider`,
merged over the vendor's default in harness.provider_config), the request (converted from the
recorded vendor request unless `body` replaces it or `edit` changes it), how the bytes are
delivered, and `expect`: what the vendor meant, written out by hand from the recording (text,
tool calls with ids, names and argument JSON, finish reason, usage, or the gRPC status code and
ErrorInfo reason a caller should get).

`gap` says why a row cannot pass as a plain replay yet, and how that is tested:
  - xfail=True: the row runs as if the gap were closed and is marked xfail(strict=True); for a
    vendor with no provider type the failure must be exactly that (harness.MissingProviderType,
    raised after the recorded request was converted), so the row flips the day the provider
    lands (XPASS, a failure under strict, or a plain failure naming what differs);
  - xfail=False: the row passes while asserting the gap as it stands (`absent`: API names that
    do not exist yet; plus, for reasoning, that the thinking never leaks into the answer text).
`pending` marks a defect issue 10 item 4 is fixing: the row asserts the correct behaviour and
is xfail(strict=True) until the fix lands; then `pending` becomes `fixed` (what the row proves).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["chat", "discovery", "embed", "count_tokens", "oauth_token", "responses"]


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


# In Expect.sent: the key must not be in the body the daemon sent.
ABSENT: Any = _Absent()


# What an Anthropic request without max_tokens gets while `default_max_tokens` is unset, as
# broker/config.py documents it ("Unset: Anthropic (which requires one) gets 4096"), capped by
# the model's max output (64,000 for claude-sonnet-4-5, so 4096 stands).
ANTHROPIC_DOCUMENTED_DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Long:
    """A text too long to inline: its length in characters, start, end and SHA-256 (UTF-8)."""

    chars: int
    start: str
    end: str
    sha256: str


@dataclass(frozen=True)
class Call:
    name: str
    arguments: Any  # the JSON value the arguments text must parse to
    id: str | None = None  # None: the vendor sent no id, so any non-empty id


@dataclass(frozen=True)
class Usage:
    """Counts the vendor reported: they must arrive exactly, and not be marked estimated."""

    input: int
    output: int
    cached: int = 0


# In Expect.usage: the vendor reported no usage, so the broker must mark its counts estimated.
ESTIMATED: Literal["estimated"] = "estimated"


@dataclass(frozen=True)
class Model:
    """A discovery result: ListModels must list `id` with these facts (None: not checked)."""

    id: str
    context_window: int | None = None
    max_output_tokens: int | None = None
    capabilities: frozenset[str] | None = None  # CAPABILITY_* names without the prefix


@dataclass(frozen=True)
class Expect:
    text: str | Long = ""
    calls: tuple[Call, ...] = ()
    finish: str | None = "STOP"  # FINISH_REASON_* without the prefix; None for errors
    usage: Usage | Literal["estimated"] | None = None  # None: not checked
    # "CODE REASON", e.g. "INVALID_ARGUMENT CONTEXT_LENGTH_EXCEEDED"; None: the call succeeds.
    error: str | None = None
    message_has: tuple[str, ...] = ()  # substrings of the status message
    error_metadata: Mapping[str, str] = field(default_factory=dict)  # ErrorInfo metadata subset
    retry_delay: float | None = None  # RetryInfo seconds (+-1)
    # A stream cut after content: the text that reached the caller before the error.
    delivered: str | None = None
    upstream_calls: int | None = 1  # chat requests the upstream saw; None: not checked
    # Dotted paths into the last chat request body the daemon sent ("messages.1.content").
    sent: Mapping[str, Any] = field(default_factory=dict)
    # Reasoning the vendor streamed (a piece of it): it must never appear in the answer text.
    reasoning: str | None = None
    models: tuple[Model, ...] = ()  # discovery rows
    models_absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class Gap:
    reason: str
    xfail: bool = False
    # API names that must not exist while the gap is open: "Message:field-substring" for a
    # proto message of modelbroker.v1, "ModelBroker:Method" for an RPC, "provider_type:name".
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    id: str
    expect: Expect
    recording: str = ""  # default: the row's id
    kind: Kind = "chat"
    provider: Mapping[str, Any] = field(default_factory=dict)
    model: str = ""  # default: from the recorded request (body or URI)
    body: Mapping[str, Any] | None = None  # replaces the recorded vendor request body
    edit: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    rpc: Literal["stream", "unary"] | None = None  # default: as the recorded client asked
    segment: int | None = None  # exact n-byte pieces; None: MB_TEST_SEGMENT (random by default)
    pace_seconds: float = 0.0  # between body events
    gateway_rejects_max_tokens: bool = False
    gap: Gap | None = None
    pending: str | None = None
    # The issue 10 item 4 fix this row proves (it was `pending` until the fix landed).
    fixed: str | None = None
    note: str = ""  # what the row does not assert, and why

    @property
    def source(self) -> str:
        return self.recording or self.id


def _drop(*keys: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {k: v for k, v in body.items() if k not in keys}


def _with(**items: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {**body, **items}


REASONING_ABSENT = (
    "StreamCompleteResponse:reason",
    "StreamCompleteResponse:think",
    "ContentPart:reason",
    "ContentPart:think",
)
REASONING = Gap(
    "thinking/reasoning is dropped: the API has no reasoning field (issue 13); the answer is asserted",
    absent=REASONING_ABSENT,
)
NO_GEMINI = Gap("no gemini provider type (issue 15)", xfail=True)
NO_VERTEX = Gap("no vertex provider type (issue 15)", xfail=True)
NO_BEDROCK = Gap("no bedrock provider type (issue 16)", xfail=True)
NO_AZURE = Gap("no azure_openai provider type (issue 16)", xfail=True)


NO_COUNT_TOKENS = "no CountTokens RPC in modelbroker.v1 (no issue asks for one)"


def _embed_gap(vendor_gap: Gap, provider_type: str) -> Gap:
    """An embeddings recording of a vendor with no provider type yet: the Embed RPC exists
    (issue 14); replay it once the provider type (and its embed()) lands."""
    return Gap(
        f"Embed exists, but {vendor_gap.reason}: replay it with that type's embeddings",
        absent=(f"provider_type:{provider_type}",),
    )


def _no_rpc(method: str, why: str, vendor_gap: Gap) -> Gap:
    """A recording of an API the broker does not offer: asserted absent until it is added."""
    return Gap(f"{why}; {vendor_gap.reason}", absent=(f"ModelBroker:{method}",))


def _item4(what: str) -> str:
    return f"issue 10 item 4: {what}"


# Texts and ids too long for a row.
_WEB_SEARCH_TEXT = Long(
    650,
    "Based on the search results, here's the current weather in San Francisco:",
    "Level 1 storm system bringing periods of rain this weekend.",
    "8276daa53931f800c12bfbcf468939eafe2c07c487758624f9690edaab5ec387",
)
_PARROT_TEXT = Long(
    462,
    "The image is an emoji of a parrot.",
    "which makes the bright colors of the parrot stand out.",
    "52ebfc2bdc2b9b90139a3bfcba7c66a81c0a6efaeacc3df7f32afc0ad53306be",
)
_STREET_TEXT = Long(
    1938,
    "This is a great question! Safely crossing the street is all about being aware and predictable.",
    "always assume a driver might not see you.",
    "8c4308d5109d741f711e414af671ed9e2f61492c45fb0d3e99e5c81007336546",
)
_POMERANIAN = (
    "Sure! Pomeranians are a breed of dog that belong to the Canidae family and the Canis genus. "
    "They are specifically classified as Canis lupus familiaris. Pomeranians are a small breed of "
    "dog that are known for their fluffy coats, perky ears, and lively personalities. They are a "
    "popular breed for companionship and are often seen in various dog shows and competitions."
)
_PELICAN = "- Captain\n- Scoop"
_FIXED_VERSION_JOKE = (
    "The version is **0.32a0**.\n\nHere's a joke: I guess you could say this version is still in "
    'the "alpha" stages of being useful! 😄'
)
_MAGIC_STRING_ANSWER = (
    "I notice that you've sent what appears to be some kind of test string or command. I don't "
    'have any special "magic string" triggers or backdoor commands that would expose internal '
    "systems or change my behavior.\n\nI'm Claude, an AI assistant created by Anthropic to be "
    "helpful, harmless, and honest. How can I assist you today with a legitimate task or question?"
)
_MULTIPLY_ID = "call_1EYWDzueHEp8OsB8jJSEp7WB"
_GROQ_CALL_ID = "pyd_ai_53c381537e5a4ce2852509adfb88b3d5"
_FIXED_VERSION_ID = "toolu_01UmKD1vMphVCN9vw8PEMk1q"
_SECRET_IDS = ("toolu_vrtx_016s1MRCMWAj5jrWE33xHh9m", "toolu_vrtx_01E5iVtKZ7MHAmWVVGZ8Zf3R")
_SECRETS_ANSWER = (
    "I've successfully retrieved the secrets associated with both passwords:\n\n"
    '1. **Password: "mellon"** → Secret: "Welcome to Moria!"\n'
    '2. **Password: "radiance"** → Secret: "Life before Death"'
)
_PARIS_NOVA = (
    "The capital of France is Paris. Paris is not only the capital city but also the most populous "
    "city in France, and it is a major center for culture, commerce, fashion, and international "
    "diplomacy. Known for its historical landmarks, such as the Eiffel Tower, the Louvre Museum, and "
    'Notre-Dame Cathedral, Paris is often referred to as "The City of Light" or "The City of Love."'
)
_NOVA_TOOL_TEXT = (
    "<thinking> To find the temperature of the capital of France, I need to first determine the "
    "capital of France and then get the current temperature in that city. The capital of France is "
    'Paris. I will use the "get_temperature" tool to find the current temperature in Paris.</thinking>\n'
)
_GPT5_NANO_HELLO = (
    "Hi there! How can I help today? I can answer questions, brainstorm ideas, write or edit text, "
    "explain concepts, help with coding, plan projects, translate languages, or just chat. What would "
    "you like to do? If you\u2019re not sure, tell me a topic you\u2019re curious about and I\u2019ll give you a "
    "quick rundown."
)
# What api.openai.com and Azure OpenAI answer `max_tokens` with for reasoning models (SOURCES.md).
GATEWAY_MAX_TOKENS_ERROR = {
    "error": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    }
}
_HI_GEMINI = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}
_HI_BEDROCK = {"messages": [{"role": "user", "content": [{"text": "Hello"}]}]}


CASES: list[Case] = [
    # --- OpenAI Chat Completions and compatible hosts (Groq, OpenRouter, a gateway) -------------
    Case(
        "oa-400-context-length",
        Expect(
            error="INVALID_ARGUMENT CONTEXT_LENGTH_EXCEEDED",
            finish=None,
            message_has=("configured limit of 272000 tokens",),
        ),
    ),
    Case(
        "oa-400-unsupported-value",
        Expect(
            error="INVALID_ARGUMENT UPSTREAM_INVALID_REQUEST",
            finish=None,
            message_has=("does not support 'system' with this model",),
            error_metadata={"param": "messages[0].role"},
        ),
    ),
    Case(
        "oa-404-model",
        Expect(error="NOT_FOUND MODEL_NOT_FOUND", finish=None, message_has=("gpt-5.2-proo",)),
    ),
    Case(
        "oa-gpt5-stream",
        Expect(text="Paris.", usage=Usage(13, 11)),
        note="the request's `moderation` option and the answer's moderation chunk have no API field",
    ),
    Case(
        "oa-gpt5-gateway-max-tokens",
        Expect(
            text="Paris.",
            usage=Usage(13, 11),
            sent={"max_completion_tokens": 1024, "max_tokens": ABSENT},
        ),
        recording="oa-gpt5-stream",
        edit=_with(max_tokens=1024),
        gateway_rejects_max_tokens=True,
        fixed=_item4("max_completion_tokens for gpt-5 is decided by the model, not the hostname"),
        note="served by a gateway host (not api.openai.com) that answers max_tokens with OpenAI's 400",
    ),
    Case(
        "oa-groq-midstream-error",
        Expect(
            error="INVALID_ARGUMENT UPSTREAM_INVALID_REQUEST",
            finish=None,
            message_has=("Tool call validation failed",),
            reasoning="We need to call the tool with invalid parameters first",
        ),
        gap=REASONING,
        fixed=_item4("an in-stream tool_use_failed (status_code 400) is INVALID_ARGUMENT, not retried"),
    ),
    Case(
        "oa-groq-reasoning",
        Expect(
            text="The tool returned the expected result for the valid call.",
            usage=Usage(339, 58),
            reasoning="The user wants to test error handling",
            sent={"messages.2.tool_calls.0.id": _GROQ_CALL_ID, "messages.3.tool_call_id": _GROQ_CALL_ID},
        ),
        gap=REASONING,
    ),
    Case(
        "oa-image-request",
        Expect(
            text=_PARROT_TEXT,
            usage=Usage(267, 106),
            sent={
                "messages.0.content": [
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "https://github.com/tmc/langchaingo/blob/main/docs/static/img/parrot-icon.png?raw=true"
                        },
                    },
                    {"type": "text", "text": "describe this image in detail"},
                ],
                "temperature": 0,
            },
        ),
        gap=Gap(
            "a non-streamed answer (stream:false, one chat.completion JSON): the daemon always asks "
            "for a stream and refuses a JSON body as UPSTREAM_PROTOCOL_ERROR by design",
            xfail=True,
        ),
    ),
    Case(
        "oa-midstream-server-error",
        Expect(
            error="UNAVAILABLE STREAM_INTERRUPTED",
            finish=None,
            delivered='The question "',
            message_has=("The server had an error while processing your request",),
            error_metadata={"cause": "UPSTREAM_UNAVAILABLE"},
        ),
    ),
    Case(
        "oa-models-docs",
        Expect(
            finish=None,
            upstream_calls=None,
            models=(Model("replay/model-id-0"), Model("replay/model-id-1"), Model("replay/model-id-2")),
        ),
        kind="discovery",
    ),
    Case(
        "oa-openrouter-429",
        Expect(
            error="RESOURCE_EXHAUSTED UPSTREAM_RATE_LIMITED",
            finish=None,
            message_has=("temporarily rate-limited upstream",),
            upstream_calls=None,  # transient: the broker's own retries may ask again
        ),
        fixed=_item4("upstream error detail is kept (OpenRouter's error.metadata.raw)"),
    ),
    Case(
        "oa-openrouter-reasoning",
        Expect(text="2 + 2 = 4", usage=Usage(43, 36), reasoning="This is a simple arithmetic question."),
        gap=REASONING,
    ),
    Case(
        "oa-openrouter-stream-error",
        Expect(
            error="INVALID_ARGUMENT UPSTREAM_INVALID_REQUEST",
            finish=None,
            message_has=("Token limit reached",),
            reasoning="We need to respond to a greeting.",
            sent={"max_tokens": 10},
        ),
        gap=REASONING,
        note="reasoning, finish_reason length, then an error chunk {code: 400}: pydantic-ai raises ModelHTTPError",
    ),
    Case(
        "oa-parallel-tools",
        Expect(
            calls=(
                Call("get_country", {}, "call_q2UyBRP7eXNTzAoR8lEhjc9Z"),
                Call("get_product_name", {}, "call_b51ijcpFkDiTQG1bQzsrmtW5"),
            ),
            finish="TOOL_CALLS",
            usage=Usage(364, 40),
            sent={"tool_choice": "required"},
        ),
        note="`strict` on a tool has no API field (issue 13)",
    ),
    Case("oa-text-stream", Expect(text=_POMERANIAN, usage=Usage(19, 82))),
    Case(
        "oa-text-stream-split5",
        Expect(text=_POMERANIAN, usage=Usage(19, 82)),
        recording="oa-text-stream",
        segment=5,
    ),
    Case(
        "oa-tool-followup",
        Expect(
            text="The result of \\( 1231 \\times 2331 \\) is \\( 2,869,461 \\).",
            usage=Usage(87, 26),
            sent={
                "messages.1": {"role": "assistant", "content": ""},
                "messages.2.tool_calls.0.id": _MULTIPLY_ID,
                "messages.3": {"role": "tool", "tool_call_id": _MULTIPLY_ID, "content": "2869461"},
            },
        ),
        fixed=_item4("an empty assistant turn in history is passed on (OpenAI answered it with 200)"),
    ),
    Case(
        "oa-tool-index1-cached",
        Expect(
            text="Now listing your Coder workspaces:",
            calls=(Call("bmcp_coder_coder_list_workspaces", {}, "toolu_vrtx_01DbFqUgk6aAtJ4nDBqzFWDF"),),
            finish="TOOL_CALLS",
            usage=Usage(25939, 58, cached=25429),
        ),
        note="the call is index 1 with arguments '' (no arguments: {}); parallel_tool_calls has no API field",
    ),
    Case(
        "oa-tool-single",
        Expect(
            calls=(Call("multiply", {"a": 1231, "b": 2331}, _MULTIPLY_ID),),
            finish="TOOL_CALLS",
            usage=Usage(54, 20),
        ),
    ),
    # --- Anthropic Messages -----------------------------------------------------------------
    Case(
        "an-400-prompt-too-long",
        Expect(
            error="INVALID_ARGUMENT CONTEXT_LENGTH_EXCEEDED",
            finish=None,
            message_has=("prompt is too long: 205429 tokens > 200000 maximum",),
        ),
    ),
    Case(
        "an-404-model",
        Expect(error="NOT_FOUND MODEL_NOT_FOUND", finish=None, message_has=("claude-sonet-4-5",)),
    ),
    Case(
        "an-adaptive-thinking",
        Expect(
            text="\n\n1. **Captain Scoop**\n2. **Gullet**",
            usage=Usage(34, 44),
            reasoning="Brief answer with two pet pelican names.",
        ),
        gap=REASONING,
        note="`thinking: adaptive` cannot be requested (issue 13)",
    ),
    Case(
        "an-image",
        Expect(
            text="Red square, green square.",
            usage=Usage(83, 9),
            sent={
                "messages.0.content.0.type": "image",
                "messages.0.content.0.source.media_type": "image/png",
            },
        ),
    ),
    Case(
        "an-midstream-error",
        Expect(
            error="UNAVAILABLE UPSTREAM_UNAVAILABLE",
            finish=None,
            message_has=("Overloaded",),
            upstream_calls=None,  # nothing reached the caller: retried
        ),
    ),
    Case(
        "an-models-docs",
        Expect(
            finish=None,
            upstream_calls=None,
            models=(
                Model(
                    "replay/claude-opus-4-6",
                    context_window=1_000_000,
                    max_output_tokens=128_000,
                    capabilities=frozenset({"VISION", "TOOLS"}),
                ),
            ),
        ),
        kind="discovery",
        fixed=_item4("Anthropic's /v1/models max_tokens becomes the model's max output (was 0)"),
    ),
    Case(
        "an-parallel-tools",
        Expect(
            calls=(
                Call("Read", {"file_path": "/tmp/blah/foo"}, "toolu_01ParallelFirst000000000"),
                Call("Read", {"file_path": "/tmp/blah/bar"}, "toolu_01ParallelSecond00000000"),
            ),
            finish="TOOL_CALLS",
            usage=Usage(2 + 22 + 13993, 72, cached=13993),
            reasoning='The user wants me to read two files: "foo" and "bar".',
        ),
        gap=REASONING,
    ),
    Case(
        "an-redacted-thinking",
        Expect(text=_MAGIC_STRING_ANSWER, usage=Usage(92, 189)),
        gap=Gap(
            "two redacted_thinking blocks are dropped: no API field for opaque reasoning (issue 13)",
            absent=REASONING_ABSENT,
        ),
    ),
    Case(
        "an-refusal",
        Expect(finish="CONTENT_FILTER", usage=Usage(97, 0)),
        gap=Gap(
            "a refusal comes back as CONTENT_FILTER with its explanation (stop_details) lost: "
            "no refusal field (issue 13 item 5)",
            absent=("StreamEnd:refusal", "CompleteResponse:refusal"),
        ),
    ),
    Case("an-text", Expect(text=_PELICAN, usage=Usage(17, 10), sent={"max_tokens": 8192})),
    Case(
        "an-text-no-limit",
        Expect(
            text=_PELICAN, usage=Usage(17, 10), sent={"max_tokens": ANTHROPIC_DOCUMENTED_DEFAULT_MAX_TOKENS}
        ),
        recording="an-text",
        edit=_drop("max_tokens"),
        fixed=_item4(
            "a request without max_tokens gets the documented, configurable default "
            "(default_max_tokens), not the catalogue maximum (64,000 for claude-sonnet-4-5)"
        ),
    ),
    Case(
        "an-thinking",
        Expect(text=_PELICAN, usage=Usage(46, 84), reasoning="The user wants two names for a pet pelican"),
        gap=REASONING,
    ),
    Case(
        "an-thinking-paced",
        Expect(text=_PELICAN, usage=Usage(46, 84), reasoning="The user wants two names for a pet pelican"),
        recording="an-thinking",
        provider={"ttft_timeout_seconds": 0.5},
        pace_seconds=0.1,
        gap=REASONING,
        fixed=_item4("thinking deltas and pings count as progress for the TTFT timer"),
        note="each SSE event 0.1 s apart, ttft_timeout_seconds 0.5: the first text comes after ~3 s of thinking",
    ),
    Case(
        "an-thinking-tool-cache",
        Expect(
            calls=(Call("Read", {"file_path": "/tmp/blah/foo"}, "toolu_01RX68weRSquLx6HUTj65iBo"),),
            finish="TOOL_CALLS",
            usage=Usage(2 + 22 + 13993, 61, cached=13993),
            reasoning='The user wants me to read a file called "foo".',
        ),
        gap=REASONING,
    ),
    Case(
        "an-tool-followup",
        Expect(
            text=_FIXED_VERSION_JOKE,
            usage=Usage(617, 41),
            sent={
                "messages.1.content.0": {
                    "type": "tool_use",
                    "id": _FIXED_VERSION_ID,
                    "name": "fixed_version",
                    "input": {},
                },
                "messages.2.content.0.tool_use_id": _FIXED_VERSION_ID,
                "messages.2.content.0.content": "0.32a0",
            },
        ),
    ),
    Case(
        "an-tool-followup-split3",
        Expect(text=_FIXED_VERSION_JOKE, usage=Usage(617, 41)),
        recording="an-tool-followup",
        segment=3,
    ),
    Case(
        "an-tool-use",
        Expect(
            calls=(Call("fixed_version", {}, _FIXED_VERSION_ID),),
            finish="TOOL_CALLS",
            usage=Usage(563, 37),
        ),
    ),
    Case(
        "an-web-search",
        Expect(text=_WEB_SEARCH_TEXT, usage=Usage(10423, 341)),
        note="the server-side web_search call, its results and the citations have no API field (and the "
        "web_search_20250305 tool cannot be requested); the answer text is asserted",
    ),
    # --- Ollama native ----------------------------------------------------------------------
    Case(
        "ol-400-no-tools",
        Expect(
            error="FAILED_PRECONDITION CAPABILITY_MISSING",
            finish=None,
            message_has=("does not support tools",),
        ),
    ),
    Case("ol-404-model", Expect(error="NOT_FOUND MODEL_NOT_FOUND", finish=None, message_has=("not found",))),
    Case(
        "ol-discovery-docs",
        Expect(
            finish=None,
            upstream_calls=None,
            models=(
                Model(
                    "replay/deepseek-r1", context_window=8192, capabilities=frozenset({"VISION", "JSON_MODE"})
                ),
                Model("replay/llama3.2"),
            ),
        ),
        kind="discovery",
        note="/api/show answers every model with the documented example (llama, 8192 context, vision)",
    ),
    Case(
        "ol-midstream-error",
        Expect(
            error="UNAVAILABLE STREAM_INTERRUPTED",
            finish=None,
            delivered="Okay, here we go",
            message_has=("an error was encountered while running the model",),
        ),
    ),
    Case(
        "ol-text-stream",
        Expect(
            text="Okay, here we go!\n\n1, 2, 3, 4, 5\n",
            usage=Usage(16, 22),
            sent={"options.num_predict": 50, "options.temperature": 0},
        ),
    ),
    Case(
        "ol-thinking-toolcall",
        Expect(
            calls=(Call("", {"location": "New York"}, "call_fadz9if9"),),
            finish="TOOL_CALLS",
            usage=Usage(150, 181),
            reasoning="Okay, the user is asking about the weather in New York.",
        ),
        gap=REASONING,
        note="the model named no function (name ''): passed on as the vendor sent it",
    ),
    Case(
        "ol-tool-stream-docs",
        Expect(calls=(Call("get_weather", {"city": "Tokyo"}),), finish="TOOL_CALLS", usage=Usage(169, 15)),
    ),
    # --- Gemini API (issue 15) ----------------------------------------------------------------
    Case(
        "gm-400-api-key-invalid",
        Expect(
            error="FAILED_PRECONDITION UPSTREAM_AUTH_FAILED", finish=None, message_has=("API key not valid",)
        ),
        gap=NO_GEMINI,
    ),
    Case(
        "gm-403-no-key",
        Expect(
            error="FAILED_PRECONDITION UPSTREAM_PERMISSION_DENIED",
            finish=None,
            message_has=("unregistered callers",),
        ),
        gap=NO_GEMINI,
    ),
    Case(
        "gm-404-model",
        Expect(error="NOT_FOUND MODEL_NOT_FOUND", finish=None, message_has=("gemini-3.6-flahs",)),
        gap=NO_GEMINI,
    ),
    Case(
        "gm-429-quota",
        Expect(
            error="RESOURCE_EXHAUSTED UPSTREAM_RATE_LIMITED",
            finish=None,
            message_has=("exceeded your current quota",),
            retry_delay=58,
            upstream_calls=None,
        ),
        model="gemini-3-flash",
        body=_HI_GEMINI,
        gap=NO_GEMINI,
        note="logged, not captured: no request recorded, so a one-line request stands in",
    ),
    Case(
        "gm-cached-content",
        Expect(text="Paris.", usage=Usage(3520, 2 + 42, cached=3512)),
        gap=NO_GEMINI,
        note="output tokens = candidates + thoughts (both billed as output)",
    ),
    Case(
        "gm-count-tokens",
        Expect(finish=None, upstream_calls=None),
        kind="count_tokens",
        gap=_no_rpc("CountTokens", NO_COUNT_TOKENS, NO_GEMINI),
    ),
    Case(
        "gm-embed",
        Expect(finish=None, upstream_calls=None),
        kind="embed",
        gap=_embed_gap(NO_GEMINI, "gemini"),
    ),
    Case(
        "gm-models",
        Expect(
            finish=None,
            upstream_calls=None,
            models=(
                Model("replay/gemini-2.5-flash", context_window=1_048_576, max_output_tokens=65_536),
                Model("replay/gemini-2.5-pro", context_window=1_048_576, max_output_tokens=65_536),
            ),
            models_absent=("replay/veo-3.1-generate-preview", "replay/imagen-4.0-fast-generate-001"),
        ),
        kind="discovery",
        gap=NO_GEMINI,
    ),
    Case("gm-safety-block", Expect(finish="CONTENT_FILTER", usage=Usage(14, 0)), gap=NO_GEMINI),
    Case("gm-text", Expect(text="Hello! How can I help you today?", usage=Usage(9, 9 + 34)), gap=NO_GEMINI),
    Case(
        "gm-text-stream", Expect(text="The capital of France is Paris.\n", usage=Usage(13, 8)), gap=NO_GEMINI
    ),
    Case(
        "gm-thinking-stream",
        Expect(text=_STREET_TEXT, usage=Usage(34, 469 + 787), reasoning="**Clarifying User Goals**"),
        gap=NO_GEMINI,
    ),
    Case(
        "gm-tool-call-stream",
        Expect(calls=(Call("get_country", {}),), finish="TOOL_CALLS", usage=Usage(29, 10 + 202)),
        gap=NO_GEMINI,
    ),
    Case(
        "gm-tool-followup-stream",
        Expect(text="The capital of Mexico is Mexico City.", usage=Usage(257, 8)),
        gap=NO_GEMINI,
        note="the functionCall's thoughtSignature cannot be sent back (issue 13)",
    ),
    Case(
        "gm-tool-json-array",
        Expect(calls=(Call("multiply", {"x": 5, "y": 3}),), finish="TOOL_CALLS", usage=Usage(60, 16 + 32)),
        gap=NO_GEMINI,
        note="streamGenerateContent without alt=sse: one JSON array",
    ),
    # --- Vertex AI (issue 15) -----------------------------------------------------------------
    Case("vx-claude-stream", Expect(text="4200 + 42 = 4242", usage=Usage(17, 15)), gap=NO_VERTEX),
    Case("vx-claude-text", Expect(text="4200 + 42 = 4242", usage=Usage(17, 15)), gap=NO_VERTEX),
    Case(
        "vx-claude-tool-result-stream",
        Expect(
            text=_SECRETS_ANSWER,
            usage=Usage(774, 54),
            sent={"messages.2.content.1.tool_use_id": _SECRET_IDS[1]},
        ),
        gap=NO_VERTEX,
    ),
    Case(
        "vx-claude-tool-stream",
        Expect(
            calls=(
                Call("secret_retrieval_tool", {"password": "mellon"}, _SECRET_IDS[0]),
                Call("secret_retrieval_tool", {"password": "radiance"}, _SECRET_IDS[1]),
            ),
            finish="TOOL_CALLS",
            usage=Usage(599, 98),
        ),
        gap=NO_VERTEX,
    ),
    Case(
        "vx-count-tokens",
        Expect(finish=None, upstream_calls=None),
        kind="count_tokens",
        gap=_no_rpc("CountTokens", NO_COUNT_TOKENS, NO_VERTEX),
    ),
    Case(
        "vx-oauth-token",
        Expect(finish=None, upstream_calls=None),
        kind="oauth_token",
        gap=Gap(
            "the OAuth2 token exchange a vertex provider makes: no vertex provider type (issue 15)",
            absent=("provider_type:vertex",),
        ),
    ),
    Case(
        "vx-prompt-blocked",
        Expect(
            error="INVALID_ARGUMENT CONTENT_FILTERED",
            finish=None,
            message_has=("Prompt Injection and Jailbreak filters",),
        ),
        gap=NO_VERTEX,
    ),
    Case("vx-stream-flex", Expect(text="OK", usage=Usage(5, 1 + 100)), gap=NO_VERTEX),
    Case("vx-text", Expect(text="The capital of France is Paris.\n", usage=Usage(13, 8)), gap=NO_VERTEX),
    # --- Bedrock (issue 16) -------------------------------------------------------------------
    Case(
        "bd-400-invalid-model-stream",
        Expect(
            error="INVALID_ARGUMENT UPSTREAM_INVALID_REQUEST",
            finish=None,
            message_has=("The provided model identifier is invalid.",),
        ),
        gap=NO_BEDROCK,
    ),
    Case(
        "bd-400-invalid-model",
        Expect(
            error="INVALID_ARGUMENT UPSTREAM_INVALID_REQUEST",
            finish=None,
            message_has=("The provided model identifier is invalid.",),
        ),
        gap=NO_BEDROCK,
    ),
    Case(
        "bd-403-access-denied",
        Expect(
            error="FAILED_PRECONDITION UPSTREAM_PERMISSION_DENIED",
            finish=None,
            message_has=("have access to the model",),
        ),
        gap=NO_BEDROCK,
        note="an InvokeModel (Anthropic body) capture; the Converse provider gets the same 403",
    ),
    Case(
        "bd-429-throttling",
        Expect(
            error="RESOURCE_EXHAUSTED UPSTREAM_RATE_LIMITED",
            finish=None,
            message_has=("Too many tokens",),
            upstream_calls=2,  # ThrottlingException is retried (issue 16), max_attempts 2 here
        ),
        model="us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        body=_HI_BEDROCK,
        gap=NO_BEDROCK,
        note="reconstructed from a logged SDK error: no request recorded, so a one-line request stands in",
    ),
    Case(
        "bd-cache-point",
        Expect(text="21", usage=Usage(2 + 1322, 5, cached=1322)),
        gap=NO_BEDROCK,
        note="the request's document and cachePoint blocks have no API field (issue 13)",
    ),
    Case(
        "bd-content-filtered-stream",
        Expect(
            text=" - The generated text has been blocked by our content filters.",
            finish="CONTENT_FILTER",
            usage=Usage(1, 0),
        ),
        gap=NO_BEDROCK,
    ),
    Case(
        "bd-count-tokens",
        Expect(finish=None, upstream_calls=None),
        kind="count_tokens",
        gap=_no_rpc("CountTokens", NO_COUNT_TOKENS, NO_BEDROCK),
    ),
    Case(
        "bd-embed-titan",
        Expect(finish=None, upstream_calls=None),
        kind="embed",
        gap=_embed_gap(NO_BEDROCK, "bedrock"),
    ),
    Case("bd-text-stream", Expect(text=_PARIS_NOVA, usage=Usage(13, 82)), gap=NO_BEDROCK),
    Case(
        "bd-text",
        Expect(
            text="Hello! How can I assist you today? Whether you have questions, need information, or "
            "just want to chat, I'm here to help.",
            usage=Usage(7, 30),
        ),
        gap=NO_BEDROCK,
    ),
    Case(
        "bd-thinking-stream",
        Expect(
            text="Hello! It's nice to meet you. How can I help you today?",
            usage=Usage(36, 73),
            reasoning='The user has greeted me with a simple "Hello".',
        ),
        gap=NO_BEDROCK,
    ),
    Case(
        "bd-tool-result-stream",
        Expect(
            text="The current temperature in Paris, the capital of France, is 30°C.", usage=Usage(577, 18)
        ),
        gap=NO_BEDROCK,
    ),
    Case(
        "bd-tool-stream",
        Expect(
            text=_NOVA_TOOL_TEXT,
            calls=(Call("get_temperature", {"city": "Paris"}, "tooluse_lAG_zP8QRHmSYOwZzzaCqA"),),
            finish="TOOL_CALLS",
            usage=Usage(471, 91),
        ),
        gap=NO_BEDROCK,
        note="Nova writes its <thinking> as answer text: it is text, as the vendor sent it",
    ),
    # --- Azure OpenAI (issue 16) --------------------------------------------------------------
    Case(
        "az-400-content-filter",
        Expect(
            error="INVALID_ARGUMENT CONTENT_FILTERED",
            finish=None,
            message_has=("content management policy",),
        ),
        gap=NO_AZURE,
        note="the request's json_schema response format has no API field (issue 13)",
    ),
    Case(
        "az-400-unknown-model-v1",
        Expect(error="NOT_FOUND MODEL_NOT_FOUND", finish=None, message_has=("Unknown model",)),
        gap=NO_AZURE,
    ),
    Case(
        "az-responses-v1",
        Expect(finish=None, upstream_calls=None),
        kind="responses",
        gap=Gap(
            "the Responses API (/openai/v1/responses): the broker speaks Chat Completions; "
            "no azure_openai provider type (issue 16)",
            absent=("provider_type:azure_openai",),
        ),
    ),
    Case(
        "az-stream",
        Expect(text="4200 + 42 equals 4242.", usage=ESTIMATED),
        gap=NO_AZURE,
        note="no usage in the stream (the recorded client did not ask for it)",
    ),
    Case("az-text-gpt5", Expect(text=_GPT5_NANO_HELLO, usage=Usage(8, 271)), gap=NO_AZURE),
    Case("az-text", Expect(text="The capital of France is **Paris**.", usage=Usage(14, 9)), gap=NO_AZURE),
    Case(
        "az-tool-stream",
        Expect(
            calls=(
                Call("secret_retrieval_tool", {"password": "mellon"}, "call_GF8LHohCf34vryrD5mTlArH8"),
                Call("secret_retrieval_tool", {"password": "radiance"}, "call_7KowxRhncpXrPLQpuAMemn0y"),
            ),
            finish="TOOL_CALLS",
            usage=ESTIMATED,
        ),
        gap=NO_AZURE,
    ),
]

BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "duplicate case ids"


def describe(case: Case) -> str:
    """One line for the summary: the recording and what the row does not assert."""
    parts = [case.id if case.source == case.id else f"{case.id} (from {case.source})"]
    if case.note:
        parts.append(case.note)
    return ": ".join(parts)


def dump_table() -> str:
    """The table as JSON lines (for a quick look: python -c 'from tests.replay.cases import *; print(dump_table())')."""
    rows = []
    for c in CASES:
        rows.append(
            json.dumps(
                {
                    "id": c.id,
                    "recording": c.source,
                    "kind": c.kind,
                    "gap": c.gap.reason if c.gap else None,
                    "pending": c.pending,
                }
            )
        )
    return "\n".join(rows)
