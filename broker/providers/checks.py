"""Range checks on what an upstream sends: numbers and strings the broker passes on.

A hostile or broken upstream must not be able to make the daemon fail with INTERNAL (a
count that overflows int64 in the proto, an index of 1e999, a lone surrogate that cannot
be encoded as UTF-8): every such value is an UpstreamProtocolError (UNAVAILABLE
UPSTREAM_PROTOCOL_ERROR before any content, STREAM_INTERRUPTED after), which is retryable
and counts against the provider's health like any other broken stream. Used by the three
`*_wire.py` parsers; pure functions, no I/O.
"""

from __future__ import annotations

import binascii
import math
import struct
import sys
from typing import Any

import orjson

from broker import errors
from broker.redact import redact

# Token counts: above 2**53 a count is no longer exact in a double (JavaScript callers'
# numbers) and far past any real request; int64 in the proto overflows at 2**63.
MAX_TOKEN_COUNT = 2**53
# A tool call's index in one answer (OpenAI's `index`; the neutral index of Anthropic's
# tool_use blocks); no model makes anywhere near this many calls in one turn.
MAX_TOOL_CALLS = 1024
# Anthropic's content-block `index` (text, thinking and tool blocks of one message).
MAX_BLOCK_INDEX = 1 << 20
# A tool call's id and name as the upstream sends them (names are at most 64 characters
# when the request's tools are valid; the slack is for servers that prefix them).
MAX_TOOL_CALL_ID_CHARS = 512
MAX_TOOL_NAME_CHARS = 256
# A model id in a listing; longer entries are skipped (they could never be requested).
MAX_MODEL_ID_CHARS = 256
# Context windows and output limits in a listing: beyond this the value is taken as unknown.
MAX_LISTED_TOKENS = 2**53


def protocol_error(provider: str, model: str, what: str) -> errors.UpstreamProtocolError:
    return errors.UpstreamProtocolError(f"{provider}: {what}", provider=provider, model=model)


def count(value: Any, *, field: str, provider: str, model: str) -> int:
    """A token count: absent or null is 0; otherwise an integer in [0, MAX_TOKEN_COUNT]."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    raise protocol_error(provider, model, f"usage {field} is {_show(value)}, not a token count")


def index(value: Any, *, field: str, limit: int, provider: str, model: str) -> int:
    """An index the upstream numbers things by: an integer in [0, limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit:
        return value
    raise protocol_error(provider, model, f"{field} is {_show(value)}, not an index below {limit}")


# An embedding's length: the largest models have 4096-8192 dimensions.
MAX_DIMENSIONS = 65536
# Base64 of MAX_DIMENSIONS float32 values (4 characters per 3 bytes, padded): a string this
# long decodes to at most 2 bytes more, so a whole number of float32s is at most MAX_DIMENSIONS.
_MAX_BASE64_CHARS = (4 * MAX_DIMENSIONS + 2) // 3 * 4


def vector(value: Any, *, field: str, provider: str, model: str) -> tuple[float, ...]:
    """An embedding: a non-empty list of finite numbers, at most MAX_DIMENSIONS long."""
    if not isinstance(value, list) or not value or len(value) > MAX_DIMENSIONS:
        raise protocol_error(provider, model, f"{field} is {_show(value)}, not an embedding vector")
    # The common case, all floats, in two C passes instead of a Python loop per number (about
    # 250 instead of 4,000 instructions a number; a 1536-dimension vector is 1536 of them):
    # float.conjugate is the identity on a float and a TypeError on anything else (bool and
    # int included), so the tuple is built and every type checked at once; a sum of finite
    # numbers is finite unless it overflows, and NaN or an infinity anywhere makes it not.
    try:
        out = tuple(map(float.conjugate, value))
    except TypeError:
        return _numbers(value, field=field, provider=provider, model=model)
    if math.isfinite(sum(out)):
        return out
    return _numbers(value, field=field, provider=provider, model=model)


def _numbers(value: list[Any], *, field: str, provider: str, model: str) -> tuple[float, ...]:
    """`vector`, number by number: the first bad one named; ints (JSON writers may send 0 or
    1) become floats; finite numbers whose sum overflowed pass."""
    for x in value:
        if isinstance(x, float):
            if math.isfinite(x):
                continue
        elif isinstance(x, int) and not isinstance(x, bool) and abs(x) <= sys.float_info.max:
            continue  # in range for float() (orjson gives larger integers as floats already)
        raise protocol_error(provider, model, f"{field} holds {_show(x)}, not a finite number")
    return tuple(float(x) for x in value)


def base64_vector(value: str, *, field: str, provider: str, model: str) -> tuple[float, ...]:
    """An embedding as `encoding_format: "base64"` sends it: the vector's float32 values,
    little-endian, base64-encoded (PROTOCOLS-2026.md 7.1), held to `vector`'s rules."""
    if not value or len(value) > _MAX_BASE64_CHARS:
        raise protocol_error(provider, model, f"{field} is {_show(value)}, not an embedding vector")
    try:
        raw = binascii.a2b_base64(value, strict_mode=True)
    except ValueError:  # binascii.Error; or a str that is not ASCII
        raise protocol_error(provider, model, f"{field} is {_show(value)}, not base64") from None
    if not raw or len(raw) % 4:
        raise protocol_error(
            provider, model, f"{field} is {len(raw)} bytes of base64, not a whole number of float32 values"
        )
    out: tuple[float, ...] = struct.unpack(f"<{len(raw) // 4}f", raw)
    # float32 values sum to at most 2**128 * MAX_DIMENSIONS, far inside a double: only NaN or
    # an infinity makes the sum not finite.
    if not math.isfinite(sum(out)):
        bad = next(x for x in out if not math.isfinite(x))
        raise protocol_error(provider, model, f"{field} holds {_show(bad)}, not a finite number")
    return out


def text(value: Any, *, field: str, limit: int, provider: str, model: str) -> str:
    """A short string the broker relays (an id, a name): at most `limit` characters, and
    encodable as UTF-8 (no lone surrogates, which a JSON `\\ud800` escape can produce)."""
    if value is None:
        return ""
    s = value if isinstance(value, str) else str(value)
    if len(s) > limit:
        raise protocol_error(provider, model, f"{field} is {len(s)} characters long, over {limit}")
    if not encodable(s):
        raise protocol_error(provider, model, f"{field} is not valid Unicode text")
    return s


def encodable(s: str) -> bool:
    """Whether `s` can go into a proto string (UTF-8): false for lone surrogates."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def listed_model_id(value: Any) -> str | None:
    """A model id from a listing, or None when it is not one the broker could serve."""
    if isinstance(value, str) and value and len(value) <= MAX_MODEL_ID_CHARS and encodable(value):
        return value
    return None


def listed_tokens(value: Any) -> int | None:
    """A context window or output limit from a listing: a positive int in range, else unknown."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_LISTED_TOKENS:
        return value
    return None


def decode_json(data: bytes | str, *, provider: str, model: str, what: str) -> Any:
    """One stream frame's JSON, strictly: orjson refuses NaN, Infinity, numbers that overflow
    a double (1e999), lone surrogates and nesting past 1024 levels, so none of them reaches
    a parser; each is an UpstreamProtocolError naming the frame."""
    try:
        return orjson.loads(data)
    except (orjson.JSONDecodeError, RecursionError):
        raw = data if isinstance(data, str) else data[:200].decode("utf-8", "replace")
        snippet = redact(raw[:200])
        raise errors.UpstreamProtocolError(
            f"{provider}: {what} answered with something that is not JSON: {snippet!r}",
            provider=provider,
            model=model,
        ) from None


def _show(value: Any) -> str:
    """A bounded rendering of an upstream value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, bool | int | float | str):
        shown = repr(value)
        return shown if len(shown) <= 40 else shown[:40] + "..."
    return "null" if value is None else f"a JSON {type(value).__name__}"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:20]} overflows a double")
    return value


def tool_arguments(arguments: str, i: int, j: int, *, vendor_says: str) -> dict[str, Any]:
    """`messages[i].tool_calls[j].arguments` (JSON text from history) as the object every
    wire but OpenAI's sends (empty text: no arguments); InvalidRequest at that path when it
    is not strict JSON or not an object. `vendor_says` completes "must be a JSON object (...)"."""
    where = f"messages[{i}].tool_calls[{j}].arguments"
    try:
        value = strict_json(arguments) if arguments.strip() else {}
    except ValueError as exc:
        raise errors.InvalidRequest([(where, f"not valid JSON ({exc})")]) from None
    if not isinstance(value, dict):
        raise errors.InvalidRequest([(where, f"must be a JSON object ({vendor_says})")])
    return value


def strict_json(text: str) -> Any:
    """JSON text a caller gave (tool-call arguments in history), parsed for a wire body:
    NaN, Infinity and numbers that overflow a double are refused (ValueError), and so is
    nesting too deep to parse (RecursionError becomes ValueError), with exact integers kept."""
    import json

    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deeply") from None
