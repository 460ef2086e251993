"""The broker's exception hierarchy and its one mapping to gRPC status.

Providers raise these with the upstream's message kept (and keys redacted); routing reads
`retryable` to decide whether another attempt or a fallback may follow; the servicer calls
`to_grpc_status` and nothing else decides a status code. Reasons are stable strings that
callers may switch on (ErrorInfo.reason, domain "modelbroker"). A wording two raisers share
is written once here (`stream_stalled`). Raised for a lower exception, one keeps it as its
cause (`raise ... from exc`) where that says more than the message: the cause goes to the
log (completion's `attempt_failed`, at debug), never into a status.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.redact import redact

DOMAIN = "modelbroker"

# --- bounds: a status always fits in the trailers, a log line stays a line -----------------
#
# grpc-message carries the message percent-encoded (a non-ASCII byte takes 3) and
# grpc-status-details-bin the whole google.rpc.Status in base64 (4 bytes per 3): with these
# caps the trailers of any error stay under ~6 KiB, well inside the 8 KiB every gRPC stack
# accepts (grpc's own soft limit; over it a caller gets RESOURCE_EXHAUSTED at random).
# A caller's string quoted in a message or a detail: its first MAX_ECHO_CHARS, then a marker.
MAX_ECHO_CHARS = 256
# The status message, in UTF-8 bytes (before percent-encoding).
MAX_MESSAGE_BYTES = 512
# The serialized google.rpc.Status (message + ErrorInfo + BadRequest + RetryInfo).
MAX_STATUS_BYTES = 3072
# BadRequest carries at most this many field violations; ErrorInfo counts the rest.
MAX_FIELD_VIOLATIONS = 20
# UTF-8 bytes of one violation's field path and description, and of one ErrorInfo value.
MAX_VIOLATION_FIELD_CHARS = 200
MAX_VIOLATION_DESCRIPTION_CHARS = 300
MAX_METADATA_VALUE_CHARS = 256
# Violations quoted in the message itself (all of them, bounded, are in BadRequest).
_VIOLATIONS_IN_MESSAGE = 3
# The ErrorInfo metadata key that counts the field violations left out of BadRequest.
OMITTED_VIOLATIONS_KEY = "field_violations_omitted"


def bound(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to its first `limit` characters, with a marker saying how many were cut:
    "abc…(1234 more)". Redact before bounding, never after: a cut key may be unrecognisable."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text) - limit} more)"


# Longer than any secret the redactor knows: a secret that starts before a cut lies wholly
# inside a window this much longer than what is kept, and is redacted before the cut.
_REDACT_MARGIN = 8192


def bound_redacted(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`bound(redact(text), limit)` in O(limit) time: only a window of `text` around the cut
    is redacted, wide enough that no secret can straddle the cut unredacted."""
    if len(text) <= limit:
        return redact(text)
    window = redact(text[: limit + _REDACT_MARGIN])
    return f"{window[:limit]}…({len(text) - limit} more)"


def bound_utf8(text: str, max_bytes: int, *, total: int | None = None) -> str:
    """`text` cut (with the same marker) so that its UTF-8 form is at most `max_bytes`.
    `total`: the length of the whole text when `text` is already a prefix of it."""
    whole = len(text) if total is None else total
    if whole == len(text) and (
        len(text) <= max_bytes // 4
        or (len(text) <= max_bytes and len(text.encode("utf-8", "surrogatepass")) <= max_bytes)
    ):
        return text
    head = text[:max_bytes]
    keep = len(head)
    while keep > 0:
        out = f"{head[:keep]}…({whole - keep} more)"
        size = len(out.encode("utf-8", "surrogatepass"))
        if size <= max_bytes:
            return out
        # Shrink by the excess (at least one character; a character is at most 4 bytes).
        keep -= max(1, (size - max_bytes + 3) // 4)
    return f"…({whole} more)"


def bound_redacted_utf8(text: str, max_bytes: int) -> str:
    """`bound_utf8(redact(text), max_bytes)` in O(max_bytes) time (see bound_redacted)."""
    if len(text) <= max_bytes // 4:
        return redact(text)
    window = redact(text[: max_bytes + _REDACT_MARGIN])
    return bound_utf8(window, max_bytes, total=len(window) + max(len(text) - max_bytes - _REDACT_MARGIN, 0))


class BrokerError(Exception):
    """Base: carries everything the gRPC status and its details need."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        model: str = "",
        retry_after: float | None = None,
        upstream_status: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.message = redact(message)
        super().__init__(self.message)
        self.provider = provider
        self.model = model
        self.retry_after = retry_after
        self.upstream_status = upstream_status
        self.metadata = dict(metadata or {})

    def with_target(self, provider: str, model: str) -> BrokerError:
        """Fill in provider/model where the raiser did not know them."""
        self.provider = self.provider or provider
        self.model = self.model or model
        return self

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


# --- the caller's own mistakes ------------------------------------------------------------


class InvalidRequest(BrokerError):
    """The request itself is wrong; carries BadRequest field violations."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"

    def __init__(self, violations: Sequence[tuple[str, str]], **kw: object) -> None:
        self.violations = list(violations)
        shown = self.violations[:_VIOLATIONS_IN_MESSAGE]
        text = "; ".join(
            f"{bound(f, MAX_VIOLATION_FIELD_CHARS)}: {bound(d, MAX_VIOLATION_DESCRIPTION_CHARS)}"
            for f, d in shown
        )
        if len(self.violations) > len(shown):
            text += f"; and {len(self.violations) - len(shown)} more (see the BadRequest field violations)"
        super().__init__(f"invalid request: {text}", **kw)  # type: ignore[arg-type]


class ModelNotFound(BrokerError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


class CapabilityMissing(BrokerError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "CAPABILITY_MISSING"


class ContextLengthExceeded(BrokerError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "CONTEXT_LENGTH_EXCEEDED"


class UpstreamRejectedRequest(BrokerError):
    """Upstream 400/413/422 that is not a context-length error."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "UPSTREAM_INVALID_REQUEST"


class ResponseTooLarge(BrokerError):
    """A unary answer grew past what one response message may carry (server.max_message_bytes).

    The upstream is closed at that point; nothing is sent. Not retried (the same request
    would grow as large again) and not the provider's fault: StreamComplete has no such
    limit, or a lower params.max_tokens keeps the answer smaller.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESPONSE_TOO_LARGE"


class ContentFiltered(BrokerError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "CONTENT_FILTERED"


# --- the caller's credentials and limits (broker/auth.py, broker/limits.py) ----------------


class ApiKeyMissing(BrokerError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "API_KEY_MISSING"


class ApiKeyInvalid(BrokerError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "API_KEY_INVALID"


class ModelNotAllowed(BrokerError):
    """The caller's key does not list this provider/model in allow_models."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "MODEL_NOT_ALLOWED"


class CallerRateLimited(BrokerError):
    """Over the key's requests_per_minute; RetryInfo says when a request is allowed again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "CALLER_RATE_LIMITED"


class CallerTokenLimited(BrokerError):
    """Over the key's tokens_per_minute (counted after each request, from its usage)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "CALLER_TOKEN_LIMITED"


class CallerTooManyStreams(BrokerError):
    """The key already has max_concurrent_streams completions in flight."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "CALLER_TOO_MANY_STREAMS"


class BrokerOverloaded(BrokerError):
    """The daemon already has server.max_concurrent_streams completions in flight."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "BROKER_OVERLOADED"


# --- budgets, usage and the shared state (broker/state/) ---------------------------------------


class BudgetExceeded(BrokerError):
    """The key's spend this UTC day or month reached its budget; RetryInfo: the window's reset."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "BUDGET_EXCEEDED"


class ModelUnpriced(BrokerError):
    """A key with a budget asked for a model with no known price, and state.unpriced is deny."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MODEL_UNPRICED"


class UsageNotPermitted(BrokerError):
    """GetUsage for another key's usage by a key that is not admin."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "USAGE_NOT_PERMITTED"


class AuthDisabled(BrokerError):
    """An RPC about API keys (GetUsage) on a broker with caller auth off."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "AUTH_DISABLED"


class StateUnavailable(BrokerError):
    """Redis (state.redis_url) is unreachable or too slow and state.on_unavailable is fail_closed."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STATE_UNAVAILABLE"


# --- the broker's own configuration ---------------------------------------------------------


class UpstreamAuthFailed(BrokerError):
    """Upstream 401: the broker's provider key is wrong. An operator must fix config."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "UPSTREAM_AUTH_FAILED"


class UpstreamPermissionDenied(BrokerError):
    """Upstream 403: the broker's key lacks access (region, org, model)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "UPSTREAM_PERMISSION_DENIED"


class UpstreamQuotaExceeded(BrokerError):
    """Billing quota, not a rate limit: retrying will not help."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "UPSTREAM_QUOTA_EXCEEDED"


# --- transient: worth another attempt or a fallback ---------------------------------------


class UpstreamRateLimited(BrokerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "UPSTREAM_RATE_LIMITED"
    retryable = True


class UpstreamUnavailable(BrokerError):
    """5xx, 529 overloaded, connection refused or reset."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UPSTREAM_UNAVAILABLE"
    retryable = True


class UpstreamTimeout(BrokerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "UPSTREAM_TIMEOUT"
    retryable = True


def stream_stalled(provider: str, seconds: float, *, model: str = "") -> UpstreamTimeout:
    """The one wording of a stream that went silent after it started, whoever timed it (the
    completion service's stall timer; a provider used on its own, its HTTP read timeout)."""
    return UpstreamTimeout(
        f"{provider}: stream stalled (no data for {seconds:g}s)", provider=provider, model=model
    )


class BrokerPoolFull(BrokerError):
    """The broker's own connection pool to a provider stayed full: the upstream was never asked.

    Not the provider's fault (never counted against its health); another provider may serve.
    """

    code = grpc.StatusCode.UNAVAILABLE
    reason = "BROKER_POOL_FULL"
    retryable = True


class UpstreamConflict(BrokerError):
    code = grpc.StatusCode.ABORTED
    reason = "UPSTREAM_CONFLICT"
    retryable = True


class UpstreamProtocolError(BrokerError):
    """The upstream answered with something that is not its protocol (bad JSON, no terminator)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UPSTREAM_PROTOCOL_ERROR"
    retryable = True


class StreamInterrupted(BrokerError):
    """A failure after content reached the caller: never retried, never spliced."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STREAM_INTERRUPTED"


class NoHealthyProvider(BrokerError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "NO_HEALTHY_PROVIDER"
    retryable = True


class NoModelMatches(BrokerError):
    """Selection by requirements found no model that meets them (capabilities, context, price)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "NO_MODEL_MATCHES"


class ShuttingDown(BrokerError):
    """The daemon is draining: it finishes what it has and takes nothing new (try another replica)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"


_CODE_VALUES = {sc: sc.value[0] for sc in grpc.StatusCode}


def to_grpc_status(err: BrokerError) -> grpc.Status:
    """The one place a BrokerError becomes a gRPC status with google.rpc details.

    Bounded whatever the error holds: the message to MAX_MESSAGE_BYTES, each metadata value
    and field violation cut with a marker, at most MAX_FIELD_VIOLATIONS violations (ErrorInfo
    `field_violations_omitted` counts the rest), the whole Status within MAX_STATUS_BYTES.
    """
    # Stripped: HTTP/2 stacks that enforce RFC 9113 (Node's, so @grpc/grpc-js) drop a
    # grpc-message with leading/trailing whitespace, and the caller then sees no message.
    message = bound_utf8(_proto_text(err.message).strip(), MAX_MESSAGE_BYTES).strip()
    violations = err.violations if isinstance(err, InvalidRequest) else []
    shown = min(len(violations), MAX_FIELD_VIOLATIONS)
    # Too big (long fields, many metadata entries): fewer violations first, then shorter
    # metadata values, then a shorter message; the last step always fits.
    steps = [(shown, MAX_METADATA_VALUE_CHARS, message)]
    steps += [(n, MAX_METADATA_VALUE_CHARS, message) for n in (10, 5, 2, 1) if n < shown]
    short = bound_utf8(message, 128)
    steps += [(min(shown, 1), 64, message), (0, 32, short), (0, 0, short)]
    for n, value_chars, text in steps:
        st = _status(err, text, violations[:n], len(violations) - n, value_chars)
        if st.ByteSize() <= MAX_STATUS_BYTES:
            break
    return rpc_status.to_status(st)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _proto_text(text: str) -> str:
    """`text` as a proto string can carry it: a lone surrogate (from a JSON `\\ud800` escape
    an upstream sent) would make protobuf raise; it becomes U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _status(
    err: BrokerError,
    message: str,
    violations: Sequence[tuple[str, str]],
    omitted: int,
    value_chars: int,
) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN)
    if err.provider:
        info.metadata["provider"] = _proto_text(bound_utf8(err.provider, value_chars))
    if err.model:
        info.metadata["model"] = _proto_text(bound_utf8(err.model, value_chars))
    if err.upstream_status is not None:
        info.metadata["upstream_status"] = str(err.upstream_status)
    for key, value in list(err.metadata.items())[: 32 if value_chars else 0]:
        info.metadata[_proto_text(bound_utf8(key, 64))] = _proto_text(bound_redacted_utf8(value, value_chars))
    if omitted:
        info.metadata[OMITTED_VIOLATIONS_KEY] = str(omitted)
    st = status_pb2.Status(code=_CODE_VALUES[err.code], message=message)
    st.details.add().Pack(info)
    if isinstance(err, InvalidRequest):
        bad = error_details_pb2.BadRequest()
        for fld, desc in violations:
            bad.field_violations.add(
                field=_proto_text(bound_utf8(fld, MAX_VIOLATION_FIELD_CHARS)),
                description=_proto_text(bound_utf8(desc, MAX_VIOLATION_DESCRIPTION_CHARS)),
            )
        st.details.add().Pack(bad)
    if err.retry_after is not None and math.isfinite(err.retry_after) and err.retry_after >= 0:
        retry_after = min(err.retry_after, 315_576_000_000.0)  # Duration's own maximum
        seconds = math.floor(retry_after)
        nanos = min(round((retry_after - seconds) * 1e9), 999_999_999)
        st.details.add().Pack(
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos))
        )
    return st


def internal_status(message: str, *, request_id: str = "") -> grpc.Status:
    """For bugs: a status that tells the caller something broke without leaking internals.

    The reason is always INTERNAL; never pass an exception's class or text here (the log
    keeps the traceback). `request_id` goes into ErrorInfo metadata too, so a caller can
    quote it even when its stack hides trailers.
    """
    st = status_pb2.Status(code=code_pb2.INTERNAL, message=bound_utf8(redact(message), MAX_MESSAGE_BYTES))
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN)
    if request_id:
        info.metadata["request_id"] = bound(request_id, 128)
    st.details.add().Pack(info)
    return rpc_status.to_status(st)


# --- log lines -----------------------------------------------------------------------------

# One string value in a log line; tracebacks (`exception`) get more room.
MAX_LOG_VALUE_CHARS = 2048
MAX_LOG_EXCEPTION_CHARS = 16 * 1024
MAX_LOG_ITEMS = 32  # of one list or dict value
_LONG_LOG_KEYS = frozenset({"exception", "stack"})


def bound_log_value(value: Any, limit: int = MAX_LOG_VALUE_CHARS, _depth: int = 0) -> Any:
    """A log field's value with every string longer than `limit` redacted and cut
    (`bound_redacted`) and every list/dict to MAX_LOG_ITEMS entries (a marker entry counts
    the rest); nesting past 4 levels is cut."""
    if isinstance(value, str):
        return value if len(value) <= limit else bound_redacted(value, limit)
    if value is None or isinstance(value, bool | int | float):
        return value
    if _depth >= 4:
        return bound_redacted(repr(value), limit)
    if isinstance(value, Mapping):
        items = list(value.items())
        out = {bound(str(k), 128): bound_log_value(v, limit, _depth + 1) for k, v in items[:MAX_LOG_ITEMS]}
        if len(items) > MAX_LOG_ITEMS:
            out["…"] = f"({len(items) - MAX_LOG_ITEMS} more)"
        return out
    if isinstance(value, list | tuple | set | frozenset):
        seq = list(value)
        out_list = [bound_log_value(v, limit, _depth + 1) for v in seq[:MAX_LOG_ITEMS]]
        if len(seq) > MAX_LOG_ITEMS:
            out_list.append(f"…({len(seq) - MAX_LOG_ITEMS} more)")
        return out_list
    if isinstance(value, bytes | bytearray):
        return bound_redacted(bytes(value[: limit + _REDACT_MARGIN]).decode("utf-8", "replace"), limit)
    return value  # left to the renderer (and redact_processor before it)


def bound_log_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: every field bounded (see bound_log_value), so a line stays well
    under 64 KiB whatever a caller or upstream sent (a traceback gets MAX_LOG_EXCEPTION_CHARS).
    Safe before or after the redaction processor (what it cuts it redacts first); before it
    is cheaper, as redaction then only sees bounded strings. Put it after format_exc_info."""
    for key, value in list(event.items()):
        limit = MAX_LOG_EXCEPTION_CHARS if key in _LONG_LOG_KEYS else MAX_LOG_VALUE_CHARS
        event[key] = bound_log_value(value, limit)
    return event
