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

import hashlib
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


@dataclass(frozen=True, eq=False)
class Digest:
    """In Expect.sent: a long value (a signature) by its length and SHA-256 prefix, as Thought
    writes them ("length:sha256[:16]"); equal to the string it stands for."""

    value: str

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Digest):
            return other.value == self.value
        if not isinstance(other, str):
            return False
        return f"{len(other)}:{hashlib.sha256(other.encode()).hexdigest()[:16]}" == self.value

    def __hash__(self) -> int:
        return hash(self.value)


@dataclass(frozen=True)
class Thought:
    """One reasoning block: its text, and its signature / redacted data as "length:sha256[:16]"
    (harness._digest), "" when absent."""

    text: str = ""
    signature: str = ""
    redacted: str = ""


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
    # Every reasoning block the caller gets, in order, exactly (None: not checked).
    thought: tuple[Thought, ...] | None = None
    provider_type: str = ""  # StreamStart.provider_type / ReasoningPart.provider_type with thought
    refusal: tuple[str, str] | None = None  # (explanation, category)
    reasoning_tokens: int | None = None
    cache_write: tuple[int, int] | None = None  # (cache_write_input_tokens, of which 1h)
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


# A non-streamed recording: the daemon always streams (ConverseStream, stream: true) and takes a
# JSON body answering it for what it is, not the protocol (as oa-image-request).
NO_UNARY_BEDROCK = Gap(
    "a non-streamed answer (one Converse JSON): the daemon always asks for ConverseStream and "
    "refuses a JSON body as UPSTREAM_PROTOCOL_ERROR by design",
    xfail=True,
)
NO_UNARY_AZURE = Gap(
    "a non-streamed answer (stream:false, one chat.completion JSON): the daemon always asks for a "
    "stream and refuses a JSON body as UPSTREAM_PROTOCOL_ERROR by design",
    xfail=True,
)


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
    "Always assume a driver might not see you.",
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
# gm-thinking-stream's four thought summaries, one reasoning block (consecutive thought parts).
_STREET_THINKING = (
    "**Clarifying User Goals**\n\nI'm currently focused on defining the user's ultimate goal: "
    "ensuring their safety while crossing the street. I've pinpointed that this is a real-world "
    "scenario with significant safety considerations. However, I'm also mindful of my limitations "
    "as an AI and my inability to physically assist or visually assess the situation.\n\n\n"
    "**Developing a Safety Protocol**\n\nI'm now formulating a comprehensive safety procedure. I've "
    "pinpointed the essential first step: finding a safe crossing location, such as marked "
    "crosswalks or intersections. Stopping at the curb, and looking and listening for traffic are "
    'vital too. The rationale behind "look left, right, then left again" now needs further '
    "exploration. I'm focusing on crafting universally applicable and secure steps.\n\n\n"
    "**Prioritizing Safe Crossing**\n\nI've revised the procedure's initial step, emphasizing safe "
    "crossing zones (crosswalks, intersections). Next, I'm integrating the \"look left, right, then "
    "left\" sequence, considering why it's repeated. I'm focusing on crafting universal, "
    "safety-focused instructions that suit diverse situations and address my inherent "
    "limitations.\n\n\n"
    "**Crafting Safe Instructions**\n\nI've identified the core user intent: to learn safe "
    "street-crossing. Now, I'm focusing on crafting universally applicable steps. Finding safe "
    "crossing locations and looking-listening for traffic remain paramount. I'm prioritizing "
    "direct, clear language, addressing my limitations as an AI. I'm crafting advice that works "
    "generally, regardless of specific circumstances or locations.\n\n\n"
)
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
_PELICAN_THINKING = (
    "The user wants two names for a pet pelican, and wants me to be brief. I'll give two simple, fitting "
    "names.\n\nSome options:\n- Pete\n- Percy\n- Captain\n- Scoop\n- Bill\n- Gully\n\nI'll pick two good "
    "ones and keep it very short."
)
_REFUSAL_EXPLANATION = (
    "This request was blocked as it seems to violate Anthropic's Terms of Service restrictions on reverse "
    "engineering or duplicating model outputs. To learn more, visit "
    "https://www.anthropic.com/legal/commercial-terms. API integrators: you can reduce refusals for your "
    "users by configuring a fallback model \u2014 see "
    "https://platform.claude.com/docs/en/build-with-claude/refusals-and-fallback"
)
_GROQ_MIDSTREAM_REASONING = (
    "We need to call the tool with invalid parameters first, then second call with valid args. The user "
    "wants us to test error handling. So first call should have wrong parameters (e.g., missing required "
    '"name" or extra param). The tool expects only "name". If we send extra property, that might cause '
    'error. Or missing "name". We\'ll do a call with missing name: {}. Then second call with name: "test". '
    "Let's do that."
)
_OLLAMA_THINKING = (
    "Okay, the user is asking about the weather in New York. Let me check the available tools. There's a "
    "get_weather tool, which I think is meant to fetch weather information. The function name is probably "
    '"get_weather" and it takes a parameter, maybe the location. The user specified "New York," so I need to '
    'call the get_weather function with "New York" as the argument. Let me make sure the parameters are '
    'correct. The tool\'s parameters are described as having a type "properties" but no specific details. '
    "Since the user provided the location, I'll pass that directly. I should structure the tool call with the "
    'name and arguments as a JSON object. Alright, that\'s it. Just call get_weather with "New York" as the '
    "argument.\n"
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
_BEDROCK_THINKING = (
    'The user has greeted me with a simple "Hello". I should respond in a friendly and welcoming manner. '
    "This is a straightforward greeting, so I'll respond warmly and ask how I can help them today."
)


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
            error="UNAVAILABLE STREAM_INTERRUPTED",
            finish=None,
            message_has=("Tool call validation failed", "of reasoning"),
            error_metadata={"cause": "UPSTREAM_INVALID_REQUEST", "delivered_reasoning_chars": "412"},
            reasoning="We need to call the tool with invalid parameters first",
            thought=(Thought(_GROQ_MIDSTREAM_REASONING),),
            provider_type="openai",
        ),
        fixed=_item4(
            "an in-stream tool_use_failed (status_code 400) is not retried; after the reasoning the "
            "caller saw, it ends the stream as STREAM_INTERRUPTED naming that cause"
        ),
    ),
    Case(
        "oa-groq-midstream-error-unary",
        Expect(
            error="INVALID_ARGUMENT UPSTREAM_INVALID_REQUEST",
            finish=None,
            message_has=("Tool call validation failed",),
        ),
        recording="oa-groq-midstream-error",
        rpc="unary",
        fixed=_item4("unary holds the reasoning back: the upstream's verdict, INVALID_ARGUMENT, not retried"),
    ),
    Case(
        "oa-groq-reasoning",
        Expect(
            text="The tool returned the expected result for the valid call.",
            usage=Usage(339, 58),
            reasoning_tokens=38,
            reasoning="The user wants to test error handling",
            thought=(
                Thought(
                    "The user wants to test error handling by calling tool with non-existent parameters first "
                    "(we did) and then second try with valid args. We have succeeded. Now respond concisely."
                ),
            ),
            provider_type="openai",
            sent={"messages.2.tool_calls.0.id": _GROQ_CALL_ID, "messages.3.tool_call_id": _GROQ_CALL_ID},
        ),
        note="Groq's usage comes on the finish_reason chunk, reasoning_tokens in completion_tokens_details",
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
        Expect(
            text="2 + 2 = 4",
            usage=Usage(43, 36),
            reasoning_tokens=13,
            reasoning="This is a simple arithmetic question.",
            thought=(Thought("This is a simple arithmetic question. 2+2 equals 4."),),
            provider_type="openai",
            sent={"reasoning": {"effort": "medium"}},
        ),
        provider={"vendor": "openrouter"},
        note="the recorded request's reasoning {enabled: true} is the API's effort MEDIUM, sent as OpenRouter's "
        "reasoning object; reasoning_details (the Anthropic signature behind OpenRouter) is not carried",
    ),
    Case(
        "oa-openrouter-stream-error",
        Expect(
            error="UNAVAILABLE STREAM_INTERRUPTED",
            finish=None,
            message_has=("Token limit reached",),
            error_metadata={"cause": "UPSTREAM_INVALID_REQUEST"},
            reasoning="We need to respond to a greeting.",
            thought=(Thought("We need to respond to a greeting. The user"),),
            provider_type="openai",
            sent={"max_tokens": 10},
        ),
        note="reasoning (delivered), finish_reason length, then an error chunk {code: 400}: an interruption "
        "that names the upstream's verdict",
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
            sent={
                "tool_choice": "required",
                "tools.0.function.strict": True,
                "tools.1.function.strict": ABSENT,
                "tools.18.function.parameters.$defs.Answer.required": ["label", "answer"],
            },
        ),
        note="strict tools pass the strict-mode check (a $defs/$ref schema included) and keep `strict: true`",
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
            thought=(Thought("Brief answer with two pet pelican names.", "284:a7760717572fee1c"),),
            provider_type="anthropic",
            cache_write=(0, 0),
            sent={"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}},
        ),
        note="adaptive thinking is how an effort is asked of Opus 4.6 (the recorded request's plain "
        "`adaptive` is effort HIGH, Anthropic's default); text, then thinking, then text, in that order",
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
            thought=(
                Thought(
                    'The user wants me to read two files: "foo" and "bar". I\'ll read both of them.',
                    "328:39aef8ba88bef943",
                ),
            ),
            provider_type="anthropic",
            cache_write=(22, 0),
        ),
    ),
    Case(
        "an-redacted-thinking",
        Expect(
            text=_MAGIC_STRING_ANSWER,
            usage=Usage(92, 189),
            thought=(Thought(redacted="744:a5fcad0dab0d0189"), Thought(redacted="296:f2ba85446010cd8c")),
            provider_type="anthropic",
            sent={"thinking": {"type": "enabled", "budget_tokens": 1024}},
        ),
        note="two redacted_thinking blocks, each whole in one ReasoningDelta (opaque data, no text)",
    ),
    Case(
        "an-redacted-thinking-unary",
        Expect(
            text=_MAGIC_STRING_ANSWER,
            usage=Usage(92, 189),
            thought=(Thought(redacted="744:a5fcad0dab0d0189"), Thought(redacted="296:f2ba85446010cd8c")),
            provider_type="anthropic",
        ),
        recording="an-redacted-thinking",
        rpc="unary",
        note="the unary answer carries the same blocks as ReasoningParts, ready to send back",
    ),
    Case(
        "an-refusal",
        Expect(
            finish="REFUSAL",
            usage=Usage(97, 0),
            reasoning_tokens=0,
            refusal=(_REFUSAL_EXPLANATION, "reasoning_extraction"),
            thought=(),
            sent={"thinking": {"type": "adaptive"}},
        ),
        note="stop_reason refusal with stop_details: FINISH_REASON_REFUSAL, explanation and category kept",
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
        Expect(
            text=_PELICAN,
            usage=Usage(46, 84),
            reasoning="The user wants two names for a pet pelican",
            thought=(Thought(_PELICAN_THINKING, "512:8d439df56f0a3bab"),),
            provider_type="anthropic",
            sent={
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "max_tokens": 8192,
                "temperature": 1.0,
            },
        ),
    ),
    Case(
        "an-thinking-paced",
        Expect(
            text=_PELICAN,
            usage=Usage(46, 84),
            reasoning="The user wants two names for a pet pelican",
            thought=(Thought(_PELICAN_THINKING, "512:8d439df56f0a3bab"),),
            provider_type="anthropic",
        ),
        recording="an-thinking",
        provider={"ttft_timeout_seconds": 0.5},
        pace_seconds=0.1,
        fixed=_item4("thinking deltas and pings count as progress for the TTFT timer"),
        note="each SSE event 0.1 s apart, ttft_timeout_seconds 0.5: thinking reaches the caller as it comes",
    ),
    Case(
        "an-thinking-tool-cache",
        Expect(
            calls=(Call("Read", {"file_path": "/tmp/blah/foo"}, "toolu_01RX68weRSquLx6HUTj65iBo"),),
            finish="TOOL_CALLS",
            usage=Usage(2 + 22 + 13993, 61, cached=13993),
            reasoning='The user wants me to read a file called "foo".',
            thought=(
                Thought(
                    'The user wants me to read a file called "foo". Let me find and read it.',
                    "328:39aef8ba88bef943",
                ),
            ),
            provider_type="anthropic",
            cache_write=(22, 0),
        ),
        note="the 22 tokens written to the cache (5 m) are reported as cache_write_input_tokens",
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
                    "replay/deepseek-r1",
                    context_window=8192,
                    capabilities=frozenset({"VISION", "JSON_MODE", "STRUCTURED_OUTPUTS"}),
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
            thought=(Thought(_OLLAMA_THINKING),),
            provider_type="ollama",
        ),
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
    ),
    Case(
        "gm-403-no-key",
        Expect(
            error="FAILED_PRECONDITION UPSTREAM_PERMISSION_DENIED",
            finish=None,
            message_has=("unregistered callers",),
        ),
    ),
    Case(
        "gm-404-model",
        Expect(error="NOT_FOUND MODEL_NOT_FOUND", finish=None, message_has=("gemini-3.6-flahs",)),
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
        note="logged, not captured: no request recorded, so a one-line request stands in",
    ),
    Case(
        "gm-cached-content",
        Expect(text="Paris.", usage=Usage(3520, 2 + 42, cached=3512)),
        note="output tokens = candidates + thoughts (both billed as output)",
    ),
    Case(
        "gm-count-tokens",
        Expect(finish=None, upstream_calls=None),
        kind="count_tokens",
        gap=Gap(NO_COUNT_TOKENS, absent=("ModelBroker:CountTokens",)),
    ),
    Case(
        "gm-embed",
        Expect(finish=None, upstream_calls=None),
        kind="embed",
        gap=Gap(
            "Embed on type gemini exists (batchEmbedContents), but the replay harness has no Embed path "
            "(no vendor's Embed recording is replayed): tests/test_gemini_provider.py serves this "
            "recording's bytes to the provider and checks its request"
        ),
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
    ),
    Case(
        "gm-safety-block",
        Expect(
            finish="CONTENT_FILTER",
            usage=Usage(14, 0),
            refusal=("Gemini stopped the answer: finishReason SAFETY", "HARM_CATEGORY_HATE_SPEECH"),
        ),
        note="the blocked rating's category is kept; the answer has no parts",
    ),
    Case(
        "gm-text",
        Expect(text="Hello! How can I help you today?", usage=Usage(9, 9 + 34), reasoning_tokens=34),
        note="thoughts billed (thoughtsTokenCount) though none were returned",
    ),
    Case("gm-text-stream", Expect(text="The capital of France is Paris.\n", usage=Usage(13, 8))),
    Case(
        "gm-thinking-stream",
        Expect(
            text=_STREET_TEXT,
            usage=Usage(34, 469 + 787),
            reasoning="**Clarifying User Goals**",
            thought=(Thought(_STREET_THINKING), Thought(signature="6152:e99c40ab9d8666d5")),
            provider_type="gemini",
            reasoning_tokens=787,
        ),
        note="the signature on the first answer part is a reasoning block of its own, in front of it",
    ),
    Case(
        "gm-tool-call-stream",
        Expect(
            calls=(Call("get_country", {}),),
            finish="TOOL_CALLS",
            usage=Usage(29, 10 + 202),
            thought=(Thought(signature="1408:5d9ba8d754fc1f7d"),),
            provider_type="gemini",
            reasoning_tokens=202,
        ),
        note="Gemini names no call id: the broker makes one",
    ),
    Case(
        "gm-tool-followup-stream",
        Expect(
            text="The capital of Mexico is Mexico City.",
            usage=Usage(257, 8),
            sent={
                "contents.1.parts.0.functionCall.id": "pyd_ai_29bf73b69e02448588e15893d47a3e7e",
                "contents.1.parts.0.thoughtSignature": Digest("1408:258361627909cff1"),
                "contents.2.parts.0.functionResponse.name": "get_country",
            },
        ),
        note="the signature goes back on the functionCall part it came on, byte for byte",
    ),
    Case(
        "gm-tool-json-array",
        Expect(
            calls=(Call("multiply", {"x": 5, "y": 3}),),
            finish="TOOL_CALLS",
            usage=Usage(60, 16 + 32),
            thought=(Thought(signature="300:9a1169f597b47fca"),),
            provider_type="gemini",
        ),
        note="streamGenerateContent without alt=sse: one JSON array, read whole (the broker asks for SSE)",
    ),
    # --- Vertex AI (issue 15) -----------------------------------------------------------------
    Case("vx-claude-stream", Expect(text="4200 + 42 = 4242", usage=Usage(17, 15))),
    Case("vx-claude-text", Expect(text="4200 + 42 = 4242", usage=Usage(17, 15))),
    Case(
        "vx-claude-tool-result-stream",
        Expect(
            text=_SECRETS_ANSWER,
            usage=Usage(774, 54),
            sent={"messages.2.content.1.tool_use_id": _SECRET_IDS[1]},
        ),
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
    ),
    Case(
        "vx-count-tokens",
        Expect(finish=None, upstream_calls=None),
        kind="count_tokens",
        gap=Gap(NO_COUNT_TOKENS, absent=("ModelBroker:CountTokens",)),
    ),
    Case(
        "vx-oauth-token",
        Expect(finish=None, upstream_calls=None),
        kind="oauth_token",
        gap=Gap(
            "not a completion: its answer is the token endpoint's in every vx-* chat row (the harness's "
            "service-account key names the replay server as token_uri: harness.token_wire); the JWT "
            "grant itself is verified against a fake token endpoint in tests/test_google_auth.py"
        ),
    ),
    Case(
        "vx-prompt-blocked",
        Expect(
            error="INVALID_ARGUMENT CONTENT_FILTERED",
            finish=None,
            message_has=("Prompt Injection and Jailbreak filters", "MODEL_ARMOR"),
            error_metadata={"block_reason": "MODEL_ARMOR"},
        ),
    ),
    Case(
        "vx-stream-flex",
        Expect(
            text="OK",
            usage=Usage(5, 1 + 100),
            thought=(Thought(signature="724:b513c8671ea59624"),),
            provider_type="vertex",
            reasoning_tokens=100,
        ),
    ),
    Case("vx-text", Expect(text="The capital of France is Paris.\n", usage=Usage(13, 8))),
    # --- Bedrock (issue 16) -------------------------------------------------------------------
    Case(
        "bd-400-invalid-model-stream",
        Expect(
            error="INVALID_ARGUMENT UPSTREAM_INVALID_REQUEST",
            finish=None,
            message_has=("The provided model identifier is invalid.",),
        ),
    ),
    Case(
        "bd-400-invalid-model",
        Expect(
            error="INVALID_ARGUMENT UPSTREAM_INVALID_REQUEST",
            finish=None,
            message_has=("The provided model identifier is invalid.",),
        ),
        note="a Converse (unary) capture: the daemon asks ConverseStream and gets the same plain JSON 400",
    ),
    Case(
        "bd-403-access-denied",
        Expect(
            error="FAILED_PRECONDITION UPSTREAM_PERMISSION_DENIED",
            finish=None,
            message_has=("have access to the model", "AccessDeniedException"),
            sent={"toolConfig.tools.0.toolSpec.name": "get_weather", "inferenceConfig": {"maxTokens": 512}},
        ),
        note="an InvokeModel (Anthropic body) capture; the Converse provider gets the same 403",
    ),
    Case(
        "bd-429-throttling",
        Expect(
            error="RESOURCE_EXHAUSTED UPSTREAM_RATE_LIMITED",
            finish=None,
            message_has=("Too many tokens", "ThrottlingException"),
            upstream_calls=2,  # ThrottlingException is retried (issue 16), max_attempts 2 here
        ),
        model="us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        body=_HI_BEDROCK,
        note="reconstructed from a logged SDK error: no request recorded, so a one-line request stands in",
    ),
    Case(
        "bd-cache-point",
        Expect(text="21", usage=Usage(2 + 1322, 5, cached=1322)),
        gap=NO_UNARY_BEDROCK,
    ),
    Case(
        "bd-cache-point-request",
        Expect(
            error="UNAVAILABLE UPSTREAM_PROTOCOL_ERROR",
            finish=None,
            message_has=("expected application/vnd.amazon.eventstream", "application/json"),
            upstream_calls=2,  # a protocol error before content is retried
            sent={
                # The recorded request's cache points, document and tools, sent back as recorded.
                "system.1": {"cachePoint": {"type": "default"}},
                "messages.0.content.1": {
                    "document": {
                        "name": "Document 1",
                        "format": "txt",
                        "source": {"bytes": "WW91IGFyZSBhIGdyZWF0IG1hdGhlbWF0aWNpYW4="},
                    }
                },
                "messages.0.content.2": {"text": "\n"},
                "messages.0.content.3": {"cachePoint": {"type": "default"}},
                "messages.0.content.5": {"cachePoint": {"type": "default"}},
                "toolConfig.tools.2": {"cachePoint": {"type": "default"}},
                "toolConfig.toolChoice": {"auto": {}},
            },
        ),
        recording="bd-cache-point",
        gap=Gap(
            "the recording is a unary Converse answer, which the streaming provider refuses (see "
            "bd-cache-point); this row asserts the request mapping: cache points, document, tools"
        ),
    ),
    Case(
        "bd-content-filtered-stream",
        Expect(
            text=" - The generated text has been blocked by our content filters.",
            finish="CONTENT_FILTER",
            usage=Usage(1, 0),
            refusal=("the model's content filter blocked the answer", "content_filtered"),
            sent={"toolConfig.toolChoice": {"tool": {"name": "__mirascope_formatted_output_tool__"}}},
        ),
    ),
    Case(
        "bd-count-tokens",
        Expect(finish=None, upstream_calls=None),
        kind="count_tokens",
        gap=_no_rpc(
            "CountTokens", NO_COUNT_TOKENS, Gap("Bedrock's count-tokens is not called by the provider")
        ),
    ),
    Case(
        "bd-embed-titan",
        Expect(finish=None, upstream_calls=None),
        kind="embed",
        gap=Gap(
            "the replay suite runs completions only: this recording is replayed byte for byte through "
            "the bedrock provider's Embed (Titan v2 InvokeModel) in "
            "tests/test_bedrock_provider.py::test_recorded_titan_embedding"
        ),
    ),
    Case(
        "bd-text-stream",
        Expect(text=_PARIS_NOVA, usage=Usage(13, 82), sent={"inferenceConfig": {"temperature": 0.0}}),
    ),
    Case(
        "bd-text",
        Expect(
            text="Hello! How can I assist you today? Whether you have questions, need information, or "
            "just want to chat, I'm here to help.",
            usage=Usage(7, 30),
        ),
        gap=NO_UNARY_BEDROCK,
    ),
    Case(
        "bd-thinking-stream",
        Expect(
            text="Hello! It's nice to meet you. How can I help you today?",
            usage=Usage(36, 73),
            reasoning='The user has greeted me with a simple "Hello".',
            thought=(Thought(_BEDROCK_THINKING, "496:d9d1b6f5b9e816d9"),),
            provider_type="bedrock",
            sent={"additionalModelRequestFields": {"thinking": {"type": "enabled", "budget_tokens": 1024}}},
        ),
    ),
    Case(
        "bd-tool-result-stream",
        Expect(
            text="The current temperature in Paris, the capital of France, is 30°C.",
            usage=Usage(577, 18),
            sent={
                "messages.2.content.0": {
                    "toolResult": {
                        "toolUseId": "tooluse_lAG_zP8QRHmSYOwZzzaCqA",
                        "content": [{"text": "30°C"}],
                        "status": "success",
                    }
                }
            },
        ),
    ),
    Case(
        "bd-tool-stream",
        Expect(
            text=_NOVA_TOOL_TEXT,
            calls=(Call("get_temperature", {"city": "Paris"}, "tooluse_lAG_zP8QRHmSYOwZzzaCqA"),),
            finish="TOOL_CALLS",
            usage=Usage(471, 91),
        ),
        note="Nova writes its <thinking> as answer text: it is text, as the vendor sent it",
    ),
    # --- Azure OpenAI (issue 16) --------------------------------------------------------------
    Case(
        "az-400-content-filter",
        Expect(
            error="INVALID_ARGUMENT CONTENT_FILTERED",
            finish=None,
            message_has=("content management policy", "(filtered: self_harm:medium)"),
            error_metadata={"categories": "self_harm:medium"},
            sent={"response_format.json_schema.name": "FentanylHandbook"},
        ),
    ),
    Case(
        "az-400-unknown-model-v1",
        Expect(
            error="NOT_FOUND MODEL_NOT_FOUND", finish=None, message_has=("Unknown model", "/openai/v1/ route")
        ),
    ),
    Case(
        "az-responses-v1",
        Expect(finish=None, upstream_calls=None),
        kind="responses",
        gap=Gap(
            "the Responses API (/openai/v1/responses): the broker speaks Chat Completions to Azure "
            "(both routes), not the Responses API"
        ),
    ),
    Case(
        "az-stream",
        Expect(text="4200 + 42 equals 4242.", usage=ESTIMATED),
        note="no usage in the stream (the recorded client did not ask for it)",
    ),
    Case("az-text-gpt5", Expect(text=_GPT5_NANO_HELLO, usage=Usage(8, 271)), gap=NO_UNARY_AZURE),
    Case(
        "az-text", Expect(text="The capital of France is **Paris**.", usage=Usage(14, 9)), gap=NO_UNARY_AZURE
    ),
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
