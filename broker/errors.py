"""The broker's exception hierarchy and its one mapping to gRPC status.

Providers raise these with the upstream's message kept (and keys redacted); routing reads
`retryable` to decide whether another attempt or a fallback may follow; the servicer calls
`to_grpc_status` and nothing else decides a status code. Reasons are stable strings that
callers may switch on (ErrorInfo.reason, domain "modelbroker").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.redact import redact

DOMAIN = "modelbroker"


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
        text = "; ".join(f"{f}: {d}" for f, d in self.violations)
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


class NotImplementedYet(BrokerError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


_CODE_VALUES = {sc: sc.value[0] for sc in grpc.StatusCode}


def to_grpc_status(err: BrokerError) -> grpc.Status:
    """The one place a BrokerError becomes a gRPC status with google.rpc details."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN)
    if err.provider:
        info.metadata["provider"] = err.provider
    if err.model:
        info.metadata["model"] = err.model
    if err.upstream_status is not None:
        info.metadata["upstream_status"] = str(err.upstream_status)
    for key, value in err.metadata.items():
        info.metadata[key] = redact(value)
    # Stripped: HTTP/2 stacks that enforce RFC 9113 (Node's, so @grpc/grpc-js) drop a
    # grpc-message with leading/trailing whitespace, and the caller then sees no message.
    st = status_pb2.Status(code=_CODE_VALUES[err.code], message=err.message.strip())
    st.details.add().Pack(info)
    if isinstance(err, InvalidRequest):
        bad = error_details_pb2.BadRequest()
        for fld, desc in err.violations:
            bad.field_violations.add(field=fld, description=desc)
        st.details.add().Pack(bad)
    if err.retry_after is not None and err.retry_after >= 0:
        seconds = math.floor(err.retry_after)
        nanos = round((err.retry_after - seconds) * 1e9)
        st.details.add().Pack(
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos))
        )
    return rpc_status.to_status(st)


def internal_status(message: str) -> grpc.Status:
    """For bugs: a status that tells the caller something broke without leaking internals."""
    st = status_pb2.Status(code=code_pb2.INTERNAL, message=redact(message))
    st.details.add().Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))
    return rpc_status.to_status(st)
