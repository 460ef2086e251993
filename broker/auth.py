"""Caller auth: API keys in `authorization: Bearer <key>` metadata, checked against SHA-256s.
The same gate gives every ModelBroker RPC its request id (see `request_id_for`).

The config holds only hashes (`model-broker keys create` / `keys hash`), so a leaked config
file grants nothing. Every `modelbroker.v1.ModelBroker` handler (mounted once by
broker/guard.py) starts with `Gatekeeper.enter`: it authenticates the key, admits completions
(the daemon's cap, then the key's limits and budgets in the state store, broker/state/: one
call), and puts the caller and its admission `Ticket` in contextvars for the servicer; the
handler's `finally` calls `Gatekeeper.leave`, which gives the ticket back to the store. Not
a grpc interceptor: that is an extra await chain per call (a do-nothing one adds ~17% to a
bare grpc.aio server's CPU) plus, here, a new method handler and two closures per RPC.
Health and reflection are not mounted by the guard, so they stay open: Kubernetes probes
and grpcurl carry no key; a method without a handler is grpc's UNIMPLEMENTED.

Which models a caller may use is decided once: the gate resolves the caller, whose
`Permissions` (`permissions()`) the servicer hands to the completion service, which judges
the RESOLVED provider/model (an alias or a bare id can point anywhere) in one place,
`CompletionService.candidates`. Listings and SelectModel skip what `permitted` refuses.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from broker import errors, limits
from broker.config import AuthConfig, Settings, parse_listen
from broker.redact import redact, register_secret
from broker.types import ALLOW_ALL, Permissions

if TYPE_CHECKING:
    from broker.state import StateStore, Ticket
    from broker.tracing import RequestTrace, Tracing

log = structlog.get_logger("broker.auth")

SERVICE_PREFIX = "/modelbroker.v1.ModelBroker/"
# Only completions count against rates and stream limits: listings are cheap and callers
# often list before they complete, which would otherwise halve their request rate.
# Embed spends upstream tokens like a completion, so it counts the same way.
COMPLETION_METHODS = frozenset(
    {SERVICE_PREFIX + "Complete", SERVICE_PREFIX + "StreamComplete", SERVICE_PREFIX + "Embed"}
)
KEY_PREFIX = "mb_"  # broker/redact.py masks mb_ keys of 16+ characters wherever they appear
REQUEST_ID_HEADER = "x-request-id"
# A caller's x-request-id is used when it is 1-128 of these characters (fullmatch: no
# trailing newline); anything else is ignored and a fresh id generated, never refused.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

# The current RPC's request id, set by the gate before the servicer runs (and copied
# into any task the handler starts), read for log lines and error trailers.
current_request_id: ContextVar[str] = ContextVar("modelbroker_request_id", default="")


def request_id_for(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The caller's x-request-id when it is sane (and no secret: it is echoed and logged), else a fresh one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            if redact(value) == value:
                return value
            break
    return fresh_request_id()


def fresh_request_id() -> str:
    """32 hex digits of a random (version 4) UUID, what `uuid.uuid4().hex` gives, without a UUID
    object per request (measured: ~4.7k instructions instead of ~16k)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return b.hex()


@dataclass(frozen=True, slots=True)
class _Status(grpc.Status):  # type: ignore[misc]
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def status_for(exc: errors.BrokerError) -> Any:
    """`errors.to_grpc_status`, with the ErrorInfo `model` and `provider` redacted too: a caller
    may have sent a key as the model name, and its message is redacted already."""
    exc.model, exc.provider = redact(exc.model), redact(exc.provider)
    return errors.to_grpc_status(exc)


def with_request_id(status: Any, request_id: str | None = None) -> Any:
    """abort_with_status replaces the trailers, so the request id rides with the status."""
    request_id = request_id or current_request_id.get()
    if not request_id:
        return status
    md = tuple(kv for kv in status.trailing_metadata or () if kv[0] != REQUEST_ID_HEADER)
    return _Status(status.code, status.details, (*md, (REQUEST_ID_HEADER, request_id)))


def new_key() -> str:
    """A fresh caller key: `mb_` and 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 that goes in the config for `key` (surrounding whitespace ignored)."""
    return hashlib.sha256(key.strip().encode()).hexdigest()


@dataclass(eq=False)
class Caller:
    name: str
    allow_models: tuple[str, ...] | None  # None: every model
    policy: limits.KeyPolicy
    admin: bool = False
    # Set for a key with a budget under state.unpriced: deny: whether provider/model has a
    # known cost (a model whose spend cannot be charged is refused like a forbidden one).
    priced: Callable[[str, str], bool] | None = None
    # Its plaintext key has been registered for redaction (on its first successful call).
    key_registered: bool = field(default=False, compare=False)

    def _allowed(self, provider: str, model: str) -> bool:
        if self.allow_models is None:
            return True
        ref = f"{provider}/{model}"
        return any(fnmatchcase(ref, glob) for glob in self.allow_models)

    def may_use(self, provider: str, model: str) -> bool:
        return self._allowed(provider, model) and (self.priced is None or self.priced(provider, model))

    def require(self, provider: str, model: str, *, requested: str = "", hint: str = "") -> None:
        """ModelNotAllowed, naming this key and what it may use, unless it may use provider/model;
        ModelUnpriced when its budget could not be charged for it."""
        via = f" (requested as {requested!r})" if requested and requested != f"{provider}/{model}" else ""
        if not self._allowed(provider, model):
            allowed = ", ".join(self.allow_models or ()) or "no models"
            raise errors.ModelNotAllowed(
                f"key {self.name!r} may not use {provider}/{model}{via}; it may use: {allowed}{hint}",
                provider=provider,
                model=model,
                metadata={"caller": self.name},
            )
        if self.priced is not None and not self.priced(provider, model):
            raise errors.ModelUnpriced(
                f"key {self.name!r} has a budget and {provider}/{model}{via} has no known price, so its "
                "cost could not be charged (state.unpriced: deny): add its prices under models[] "
                "(input_usd_per_mtok, output_usd_per_mtok), or set state.unpriced: allow",
                provider=provider,
                model=model,
                metadata={"caller": self.name},
            )


# Set by the gate for the RPC it admits; None when auth is off.
current_caller: ContextVar[Caller | None] = ContextVar("modelbroker_caller", default=None)
# The admitted completion's ticket (what the request scope charges its usage to); None for
# other RPCs and with auth off.
current_ticket: ContextVar[Ticket | None] = ContextVar("modelbroker_ticket", default=None)


def caller_name() -> str:
    caller = current_caller.get()
    return caller.name if caller is not None else ""


def permissions() -> Permissions:
    """What the caller of this RPC may use: the gate resolved it (ALLOW_ALL with auth off)."""
    caller = current_caller.get()
    return caller if caller is not None else ALLOW_ALL


def permitted(provider: str, model: str) -> bool:
    return permissions().may_use(provider, model)


def require_permitted(provider: str, model: str, *, requested: str = "", hint: str = "") -> None:
    permissions().require(provider, model, requested=requested, hint=hint)


def open_listen_warning(settings: Settings, listen: str) -> str | None:
    """The warning `serve` prints when it listens beyond loopback with auth off, else None."""
    if settings.auth.enabled or settings.tls.client_ca_file is not None:
        return None  # API keys, or mTLS: only holders of a certificate from the client CA get in
    try:
        host, _ = parse_listen(listen)
    except ValueError:
        return None  # binding reports the bad address
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to anything
    return (
        f"caller auth is off and the broker listens on {listen}: anyone who can reach that port "
        "can spend the configured provider keys. Add auth.keys to the config "
        "(`model-broker keys create` makes one) or listen on 127.0.0.1."
    )


class Gatekeeper:
    """Authentication and admission for the ModelBroker service: `enter` and `leave`, which
    every handler broker/guard.py mounts calls first and last."""

    def __init__(
        self,
        auth: AuthConfig,
        max_concurrent_streams: int,
        on_refused: Callable[[str, str, str], None] | None = None,
        *,
        state: StateStore | None = None,
        priced: Callable[[str, str], bool] | None = None,
    ) -> None:
        """`state`: where keys' limits and usage live (default: this process). `priced`:
        given under state.unpriced: deny, whether a model's cost is known (keys with a budget
        may use only those)."""
        self.enabled = auth.enabled
        # Called with (rpc, status, reason) for each refusal, so metrics see what never
        # reaches the servicer.
        self.on_refused = on_refused
        if state is None:
            from broker.state.local_state import LocalState

            state = LocalState()
        self.state = state
        self._keys: list[tuple[bytes, Caller]] = []
        for k in auth.keys:
            policy = limits.KeyPolicy.from_config(k)
            caller = Caller(
                k.name,
                None if k.allow_models is None else tuple(k.allow_models),
                policy,
                admin=k.admin,
                priced=priced if policy.has_budget else None,
            )
            self._keys.append((bytes.fromhex(k.sha256), caller))
        self.cap = limits.StreamCap(max_concurrent_streams)
        # Set by BrokerServer when tracing is on: each ModelBroker RPC gets a server span.
        self.tracing: Tracing | None = None

    def reconfigure(self, auth: AuthConfig, *, priced: Callable[[str, str], bool] | None = None) -> None:
        """A config reload's keys (broker/reload.py), built as at start: the key table is
        replaced in one assignment; usage (rates, streams, spend) stays in the state store,
        by key name, so an unchanged key carries on where it was."""
        fresh = Gatekeeper(auth, self.cap.maximum, self.on_refused, state=self.state, priced=priced)
        self._keys, self.enabled = fresh._keys, fresh.enabled

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Caller | None:
        if not self.enabled:
            return None
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            raise errors.ApiKeyMissing(
                "this broker needs an API key: send the metadata 'authorization: Bearer <key>'"
            )
        scheme, _, key = str(header).strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise errors.ApiKeyInvalid("the authorization metadata must be 'Bearer <key>'")
        digest = hashlib.sha256(key.strip().encode()).digest()
        found: Caller | None = None
        # Compare against every key, without stopping early, in constant time per key.
        for expected, caller in self._keys:
            if hmac.compare_digest(expected, digest):
                found = caller
        if found is None:
            raise errors.ApiKeyInvalid("the API key is not known to this broker")
        if not found.key_registered:
            # The config holds only the hash; now the daemon has the key, keep it out of
            # every log line and error (at most once per configured key: bounded).
            register_secret(key.strip())
            found.key_registered = True
        return found

    async def enter(self, method: str, context: Any) -> Admission | None:
        """One ModelBroker RPC's way in, called by its guarded handler (broker/guard.py) before
        anything else: the server span (tracing on), the key -> caller, the request id, and
        for completions admission (the daemon's cap, then the key's limits in the store).
        Refusals abort with their status and the request id. What it returns goes to `leave`
        when the RPC ends (None: nothing to give back)."""
        metadata = context.invocation_metadata()
        tracing = self.tracing
        # With tracing on, the server span goes around admission (refusals too) and the RPC.
        rt = None if tracing is None else tracing.start_rpc(method, metadata)
        try:
            # Every outcome carries the id in its trailers, refusals here included: set now,
            # and added to any status the RPC aborts with (`with_request_id`). In the trailers,
            # not initial metadata, which would cost a gRPC operation of its own per call.
            failure: errors.BrokerError | None = None
            caller: Caller | None = None
            if self.enabled:
                try:
                    caller = self.authenticate(metadata)
                except errors.BrokerError as exc:
                    failure = exc
            # After authenticate, which registers a caller's key for redaction on first use:
            # a key sent as x-request-id is then not echoed.
            request_id = request_id_for(metadata)
            current_request_id.set(request_id)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            try:
                if failure is not None:
                    raise failure
                admission = await self._admit(method, caller)
            except errors.BrokerError as exc:
                await self._refuse(method, context, request_id, exc)
                raise AssertionError("abort_with_status returned") from exc
        except BaseException as exc:
            if rt is not None:
                rt.tracing.end_rpc(rt, context, exc)
            raise
        if rt is None:
            return admission
        return Admission(admission is not None, None if admission is None else admission.ticket, rt)

    async def _admit(self, method: str, caller: Caller | None) -> Admission | None:
        """Admit an authenticated caller (None: auth is off) and set it and its ticket for
        the servicer; only completions take a slot and a ticket."""
        current_caller.set(caller)
        current_ticket.set(None)
        if method not in COMPLETION_METHODS:
            return None
        self.cap.check()
        # Taken before the store is asked (which may await): concurrent calls cannot both
        # squeeze into the daemon's last slot.
        self.cap.in_flight += 1
        try:
            ticket = await self.state.admit(caller.policy) if caller is not None else None
        except BaseException:
            self.cap.in_flight -= 1
            raise
        if ticket is None:
            return _SLOT  # auth off: nothing per request to allocate
        current_ticket.set(ticket)
        return Admission(True, ticket)

    async def _refuse(self, method: str, context: Any, request_id: str, exc: errors.BrokerError) -> None:
        """Count and log a refusal, and abort the RPC with its status (raises AbortError)."""
        rpc = method.removeprefix(SERVICE_PREFIX)
        if self.on_refused is not None:
            self.on_refused(rpc, exc.code.name, exc.reason)
        log.info(
            "request_refused",
            rpc=rpc,
            request_id=request_id,
            caller=caller_name(),
            peer=context.peer(),
            status=exc.code.name,
            reason=exc.reason,
            error=exc.message,
        )
        await context.abort_with_status(with_request_id(status_for(exc), request_id))

    def leave(self, admission: Admission | None, context: Any) -> asyncio.Future[None] | None:
        """The RPC `enter` admitted has ended: end its server span with the RPC's status (called
        from the handler's `finally`, so `sys.exc_info()` is what ends it, if anything), free
        its slot and hand its ticket to the store. Returns what the handler must await (shielded:
        a cancelled RPC still charges) before the status goes out, or None. Called once."""
        if admission is None:
            return None
        rt = admission.trace
        if rt is not None:
            rt.tracing.end_rpc(rt, context, sys.exc_info()[1])
        if admission.slot:
            self.cap.in_flight -= 1
        ticket = admission.ticket
        # Slot freed and usage charged before the status goes out, so the caller's next call
        # (any replica) sees it.
        return None if ticket is None else self.state.finish(ticket)


@dataclass(frozen=True, slots=True)
class Admission:
    """What `Gatekeeper.enter` let in, for `Gatekeeper.leave` to give back."""

    slot: bool  # a completion: it holds one of the daemon's max_concurrent_streams
    ticket: Ticket | None = None  # the state store's, for a completion by a key (auth on)
    trace: RequestTrace | None = None  # the RPC's server span (tracing on)


# A completion with auth and tracing off: the same immutable admission for each.
_SLOT = Admission(True)
