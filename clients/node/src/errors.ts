// Typed errors: every failed call surfaces as a BrokerError subclass chosen by status code,
// carrying the google.rpc details the daemon packs into the `grpc-status-details-bin`
// trailer (ErrorInfo reason + metadata, RetryInfo delay, BadRequest field violations).
import { Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";

import { BadRequest, ErrorInfo, RetryInfo } from "../gen/google/rpc/error_details";
import { Status as RpcStatus } from "../gen/google/rpc/status";

const TYPE_PREFIX = "type.googleapis.com/";
const DETAILS_TRAILER = "grpc-status-details-bin";

export interface FieldViolation {
  field: string;
  description: string;
}

export interface BrokerErrorInit {
  /** google.rpc.Status.message from the details trailer (same text as grpc-message). */
  message?: string;
  reason?: string;
  domain?: string;
  metadata?: Record<string, string>;
  retryDelay?: number;
  fieldViolations?: FieldViolation[];
  cause?: unknown;
}

/** A failed RPC: status code and message plus the daemon's google.rpc details. */
export class BrokerError extends Error {
  /** gRPC status code (`status.NOT_FOUND` from @grpc/grpc-js, i.e. 5). */
  readonly code: Status;
  /** The status name, e.g. "NOT_FOUND". */
  readonly codeName: string;
  /** The stable ErrorInfo reason ("MODEL_NOT_FOUND", "STREAM_INTERRUPTED"...); "" if none was sent. */
  readonly reason: string;
  /** ErrorInfo domain: "modelbroker" for the daemon's own errors. */
  readonly domain: string;
  /** ErrorInfo metadata: `provider` and `model` when known. */
  readonly metadata: Readonly<Record<string, string>>;
  /** Seconds to wait before retrying (RetryInfo), when the upstream said so. */
  readonly retryDelay: number | undefined;
  /** BadRequest field violations for INVALID_ARGUMENT, each naming the field. */
  readonly fieldViolations: readonly FieldViolation[];
  /** The status message as the daemon sent it (without the code and reason prefix). */
  readonly details: string;

  constructor(code: Status, details: string, init: BrokerErrorInit = {}) {
    const name = Status[code] ?? `CODE_${code}`;
    super(`${name}: ${details}${init.reason ? ` [${init.reason}]` : ""}`, { cause: init.cause });
    this.name = new.target.name;
    this.code = code;
    this.codeName = name;
    this.details = details;
    this.reason = init.reason ?? "";
    this.domain = init.domain ?? "";
    this.metadata = { ...(init.metadata ?? {}) };
    this.retryDelay = init.retryDelay;
    this.fieldViolations = [...(init.fieldViolations ?? [])];
  }
}

export class InvalidRequestError extends BrokerError {}
export class ModelNotFoundError extends BrokerError {}
export class FailedPreconditionError extends BrokerError {}
export class AuthenticationError extends BrokerError {}
export class PermissionDeniedError extends BrokerError {}
export class RateLimitedError extends BrokerError {}
export class DeadlineExceededError extends BrokerError {}
export class UnavailableError extends BrokerError {}
/** The stream failed after output arrived: what was received is all there is (never spliced). */
export class StreamInterruptedError extends UnavailableError {}
/** The caller cancelled (AbortSignal); `cause` is the signal's reason. */
export class CancelledError extends BrokerError {}

const BY_CODE: Partial<Record<Status, typeof BrokerError>> = {
  [Status.INVALID_ARGUMENT]: InvalidRequestError,
  [Status.NOT_FOUND]: ModelNotFoundError,
  [Status.FAILED_PRECONDITION]: FailedPreconditionError,
  [Status.UNAUTHENTICATED]: AuthenticationError,
  [Status.PERMISSION_DENIED]: PermissionDeniedError,
  [Status.RESOURCE_EXHAUSTED]: RateLimitedError,
  [Status.DEADLINE_EXCEEDED]: DeadlineExceededError,
  [Status.UNAVAILABLE]: UnavailableError,
  [Status.CANCELLED]: CancelledError,
};

function isServiceError(err: unknown): err is ServiceError {
  return (
    err instanceof Error &&
    typeof (err as Partial<ServiceError>).code === "number" &&
    (err as Partial<ServiceError>).metadata instanceof Metadata
  );
}

/** Decode the details trailer into the init fields; unknown detail types are skipped. */
export function decodeStatusDetails(trailers: Metadata): BrokerErrorInit {
  const init: BrokerErrorInit = {};
  const raw = trailers.get(DETAILS_TRAILER)[0];
  if (!(raw instanceof Buffer)) {
    return init;
  }
  const status = RpcStatus.decode(raw);
  init.message = status.message;
  for (const detail of status.details) {
    const type = detail.typeUrl.startsWith(TYPE_PREFIX) ? detail.typeUrl.slice(TYPE_PREFIX.length) : "";
    if (type === "google.rpc.ErrorInfo") {
      const info = ErrorInfo.decode(detail.value);
      init.reason = info.reason;
      init.domain = info.domain;
      init.metadata = info.metadata;
    } else if (type === "google.rpc.RetryInfo") {
      const delay = RetryInfo.decode(detail.value).retryDelay;
      if (delay !== undefined) {
        init.retryDelay = delay.seconds + delay.nanos / 1e9;
      }
    } else if (type === "google.rpc.BadRequest") {
      init.fieldViolations = BadRequest.decode(detail.value).fieldViolations.map((v) => ({
        field: v.field,
        description: v.description,
      }));
    }
  }
  return init;
}

/**
 * Turn whatever a call failed with into a BrokerError. A call the caller's AbortSignal
 * cancelled becomes CancelledError with the signal's reason as `cause`; anything that is
 * not a gRPC status (a bug, a bad argument) is rethrown unchanged by the caller.
 */
export function toBrokerError(err: unknown, signal?: AbortSignal): unknown {
  if (!isServiceError(err)) {
    return err;
  }
  if (signal?.aborted && err.code === Status.CANCELLED) {
    return new CancelledError(Status.CANCELLED, "cancelled by the caller", { cause: signal.reason });
  }
  const init = { ...decodeStatusDetails(err.metadata), cause: err };
  const cls = init.reason === "STREAM_INTERRUPTED" ? StreamInterruptedError : (BY_CODE[err.code] ?? BrokerError);
  // Node's HTTP/2 drops a grpc-message it finds malformed (e.g. trailing whitespace); the
  // details trailer carries the same text, so it stands in when grpc-message is missing.
  return new cls(err.code, err.details || (init.message ?? "").trim(), init);
}
