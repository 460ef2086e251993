"""The ModelBroker service mounted behind a guard: no request bytes and no bug reach a caller
as UNKNOWN or a Python class name.

grpc's generated `add_ModelBrokerServicer_to_server` deserializes with `FromString`, and a
request that is not valid protobuf (bad UTF-8 in a string, a truncated field, a tool schema
nested past protobuf's depth limit) makes grpc answer UNKNOWN "Unexpected <class
'google.protobuf.message.DecodeError'>" before the servicer ever runs. `add_servicer` mounts
the same servicer with deserializers that never raise: bytes that do not decode become an
INVALID_ARGUMENT with a BadRequest violation naming the field where decoding failed
(`messages[3].content[0].text`: "not valid UTF-8"), found by walking the wire format against
the descriptor (`diagnose`). Each handler also maps anything the servicer lets escape (a
bug) to INTERNAL with a stable reason through the servicer's own abort, and a unary answer
over the send limit to RESOURCE_EXHAUSTED RESPONSE_TOO_LARGE with ErrorInfo (grpc's own
refusal has none).

The same handlers are the auth gate's (broker/auth.py): each starts with `Gatekeeper.enter`
(key, request id, admission, the server span) and ends with `Gatekeeper.leave`, mounted once
here instead of a grpc interceptor wrapping every call. Streaming handlers write their
messages themselves (`context.write`), so no generator of ours sits between the servicer's
and grpc.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from broker import auth, convert, errors
from modelbroker.v1 import broker_pb2 as pb

log = structlog.get_logger("broker.guard")

SERVICE = "modelbroker.v1.ModelBroker"
Abort = Callable[[Any, BaseException], Awaitable[None]]
# Protobuf's own nesting limit is about 100 messages; the walk stops well before recursion does.
_MAX_MESSAGE_DEPTH = 100


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What the guarded deserializer returns for bytes that are not a valid request."""

    error: errors.InvalidRequest


def deserializer(cls: Any) -> Callable[[bytes], Any]:
    """`cls.FromString`, except that undecodable bytes give an Undecodable, never an exception."""
    from_string = cls.FromString
    descriptor: Descriptor = cls.DESCRIPTOR

    def decode(data: bytes) -> Any:
        try:
            return from_string(data)
        except Exception:
            path, problem = diagnose(descriptor, data)
            return Undecodable(errors.InvalidRequest([(path, problem)]))

    return decode


# --- the wire walk ---------------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, path: str, what: str) -> None:
        super().__init__(what)
        self.path = path
        self.what = what


def diagnose(descriptor: Descriptor, data: bytes) -> tuple[str, str]:
    """(field path, problem) for bytes protobuf refused to decode as `descriptor`.

    The path is the field being read where the bytes stop being valid, in the notation of
    convert.py (`tools[0].parameters.properties.city`); "request" when the fault is in the
    framing of the message itself (a truncated tag between fields).
    """
    try:
        _Walk(bytes(data)).message(descriptor, 0, len(data), "", 0, 0)
    except _Bad as bad:
        return bad.path or "request", bad.what
    except RecursionError:
        return "request", "nested too deeply"
    return "request", f"could not be decoded as a {descriptor.name}"


_VARINT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
    }
)
_FIXED64_TYPES = frozenset(
    {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
)
_FIXED32_TYPES = frozenset(
    {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32}
)


class _Walk:
    __slots__ = ("buf",)

    def __init__(self, buf: bytes) -> None:
        self.buf = buf

    def varint(self, pos: int, end: int, path: str, what: str) -> tuple[int, int]:
        value = shift = 0
        for i in range(10):
            if pos + i >= end:
                raise _Bad(path, f"truncated: {what} runs past the end of its message")
            byte = self.buf[pos + i]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos + i + 1
        raise _Bad(path, f"{what} is longer than 10 bytes")

    def message(self, desc: Descriptor, pos: int, end: int, path: str, depth: int, schema_depth: int) -> None:
        if depth > _MAX_MESSAGE_DEPTH:
            raise _Bad(path, "nested too deeply")
        full_name = desc.full_name
        struct_like = full_name in ("google.protobuf.Struct", "google.protobuf.ListValue")
        if struct_like:
            schema_depth += 1
            if schema_depth > convert.MAX_SCHEMA_DEPTH:
                raise _Bad(path, f"nested deeper than {convert.MAX_SCHEMA_DEPTH} levels")
        seen: dict[int, int] = {}
        while pos < end:
            tag, pos = self.varint(pos, end, path, "a field tag")
            number, wire = tag >> 3, tag & 7
            fd = desc.fields_by_number.get(number)
            fpath = self.field_path(desc, fd, path, seen, pos, end, wire)
            if number == 0:
                raise _Bad(fpath or path, "a field tag with field number 0")
            if wire == 0:
                _, pos = self.varint(pos, end, fpath or path, "a varint")
            elif wire == 1 or wire == 5:
                size = 8 if wire == 1 else 4
                if pos + size > end:
                    raise _Bad(
                        fpath or path, "truncated: a fixed-size value runs past the end of its message"
                    )
                pos += size
            elif wire == 2:
                length, pos = self.varint(pos, end, fpath or path, "a length")
                if length > end - pos:
                    raise _Bad(fpath or path, f"truncated: {length} bytes announced, {end - pos} left")
                if fd is not None:
                    self.payload(fd, pos, pos + length, fpath, depth, schema_depth)
                pos += length
            elif wire == 3:
                pos = self.group(number, pos, end, fpath or path, depth)
            elif wire == 4:
                raise _Bad(path, "an end-group tag without its start")
            else:
                raise _Bad(fpath or path, f"invalid wire type {wire}")

    def field_path(
        self,
        desc: Descriptor,
        fd: FieldDescriptor | None,
        path: str,
        seen: dict[int, int],
        pos: int,
        end: int,
        wire: int,
    ) -> str:
        if fd is None:
            return path
        full_name = desc.full_name
        if desc.GetOptions().map_entry:
            return path  # a map entry's key and value: the entry's path says which key
        if full_name in ("google.protobuf.Value", "google.protobuf.Struct"):
            if full_name == "google.protobuf.Struct" and wire == 2:
                key = self.entry_key(pos, end, path)
                return convert.key_path(path, key)
            return path  # a Value's kinds are the value itself
        if full_name == "google.protobuf.ListValue":
            i = seen.get(fd.number, 0)
            seen[fd.number] = i + 1
            return f"{path}[{i}]"
        name = f"{path}.{fd.name}" if path else fd.name
        if fd.is_repeated and wire == 2 and fd.type == FieldDescriptor.TYPE_MESSAGE:
            i = seen.get(fd.number, 0)
            seen[fd.number] = i + 1
            return f"{name}[{i}]"
        return name

    def entry_key(self, pos: int, end: int, path: str) -> str:
        """The key of a Struct's map entry whose length prefix starts at `pos` (best effort)."""
        try:
            length, start = self.varint(pos, end, path, "a length")
        except _Bad:
            return "?"
        stop = min(start + length, end)
        at = start
        while at < stop:
            try:
                tag, at = self.varint(at, stop, path, "a field tag")
                wire = tag & 7
                if wire == 2:
                    n, at = self.varint(at, stop, path, "a length")
                    if tag >> 3 == 1:
                        raw = self.buf[at : min(at + n, stop)]
                        try:
                            return raw.decode("utf-8")
                        except UnicodeDecodeError:
                            raise _Bad(path, "a key that is not valid UTF-8") from None
                    at += n
                elif wire == 0:
                    _, at = self.varint(at, stop, path, "a varint")
                elif wire in (1, 5):
                    at += 8 if wire == 1 else 4
                else:
                    break
            except _Bad as bad:
                if bad.what.startswith("a key"):
                    raise
                break
        return ""

    def payload(
        self, fd: FieldDescriptor, pos: int, end: int, path: str, depth: int, schema_depth: int
    ) -> None:
        if fd.type == FieldDescriptor.TYPE_STRING:
            try:
                self.buf[pos:end].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _Bad(path, f"not valid UTF-8 (byte {exc.start} of the string)") from None
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type is not None:
                self.message(fd.message_type, pos, end, path, depth + 1, schema_depth)
        elif fd.is_repeated and fd.type in _VARINT_TYPES:
            while pos < end:  # packed
                _, pos = self.varint(pos, end, path, "a packed varint")
        elif fd.is_repeated and fd.type in _FIXED64_TYPES | _FIXED32_TYPES:
            size = 8 if fd.type in _FIXED64_TYPES else 4
            if (end - pos) % size:
                raise _Bad(path, "truncated: a packed list of fixed-size values")

    def group(self, number: int, pos: int, end: int, path: str, depth: int) -> int:
        if depth > _MAX_MESSAGE_DEPTH:
            raise _Bad(path, "nested too deeply")
        while pos < end:
            tag, pos = self.varint(pos, end, path, "a field tag")
            wire = tag & 7
            if wire == 4:
                if tag >> 3 != number:
                    raise _Bad(path, "an end-group tag that does not match its start")
                return pos
            if wire == 0:
                _, pos = self.varint(pos, end, path, "a varint")
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                length, pos = self.varint(pos, end, path, "a length")
                pos += length
            elif wire == 3:
                pos = self.group(tag >> 3, pos, end, path, depth + 1)
            else:
                raise _Bad(path, f"invalid wire type {wire}")
            if pos > end:
                break
        raise _Bad(path, "truncated: a group without its end tag")


# --- mounting the servicer -------------------------------------------------------------------


async def _default_abort(context: Any, exc: BaseException) -> None:
    if isinstance(exc, errors.BrokerError):
        await context.abort_with_status(errors.to_grpc_status(exc))
    log.error("internal_error", error=type(exc).__name__, exc_info=exc)
    await context.abort_with_status(errors.internal_status("internal error in the broker; see its logs"))


def _unary(
    name: str,
    method: Callable[[Any, Any], Awaitable[Any]],
    abort: Abort,
    max_response_bytes: int,
    gate: auth.Gatekeeper,
) -> Callable[[Any, Any], Awaitable[Any]]:
    full_name = auth.SERVICE_PREFIX + name
    enter, leave = gate.enter, gate.leave

    async def behavior(request: Any, context: Any) -> Any:
        # The gate first (an unauthenticated caller learns nothing about its bytes), and its
        # `leave` in the finally, whatever ends the RPC.
        admission = await enter(full_name, context)
        try:
            if isinstance(request, Undecodable):
                _log_undecodable(name, request)
                await abort(context, request.error)
                raise AssertionError("abort returned")
            try:
                response = await method(request, context)
                size = response.ByteSize()
                if size > max_response_bytes:
                    raise errors.ResponseTooLarge(
                        f"the {name} answer is {size} bytes, over the {max_response_bytes}-byte message limit",
                        metadata={"limit_bytes": str(max_response_bytes)},
                    )
                return response
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await abort(context, exc)
                raise AssertionError("abort returned") from exc
        finally:
            storing = leave(admission, context)
            if storing is not None:
                await asyncio.shield(storing)

    return behavior


def _streaming(
    name: str, method: Callable[[Any, Any], Any], abort: Abort, gate: auth.Gatekeeper
) -> Callable[[Any, Any], Awaitable[None]]:
    full_name = auth.SERVICE_PREFIX + name
    enter, leave = gate.enter, gate.leave

    # A coroutine that writes each response itself (grpc's reader/writer form), not an async
    # generator grpc iterates: grpc's loop does the same `context.write` per message, and one
    # generator hop less per message is what a stream's chunks save.
    async def behavior(request: Any, context: Any) -> None:
        admission = await enter(full_name, context)
        try:
            if isinstance(request, Undecodable):
                _log_undecodable(name, request)
                await abort(context, request.error)
                return
            write = context.write
            responses = method(request, context)
            writing = False
            try:
                async for response in responses:
                    writing = True
                    await write(response)
                    writing = False
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                if writing:
                    raise  # grpc's own write failing (the caller gone, the server stopped): grpc's to handle
                await abort(context, exc)
            finally:
                await responses.aclose()
        finally:
            storing = leave(admission, context)
            if storing is not None:
                await asyncio.shield(storing)

    return behavior


def _log_undecodable(name: str, request: Undecodable) -> None:
    field, problem = request.error.violations[0]
    log.info("request_undecodable", rpc=name, field=errors.bound(field, 200), problem=problem)


def handlers(
    servicer: Any, gate: auth.Gatekeeper, *, abort: Abort | None = None, max_response_bytes: int
) -> dict[str, grpc.RpcMethodHandler]:
    """The ModelBroker method handlers, guarded (see the module doc) and gated (`gate`:
    authentication, request id, admission; broker/auth.py). `abort(context, exc)` turns an
    exception into the RPC's status and must raise (the servicer's own `_abort`, which adds
    the request id); `max_response_bytes`: the server's send limit."""
    abort = abort or _default_abort
    service = pb.DESCRIPTOR.services_by_name["ModelBroker"]
    out: dict[str, grpc.RpcMethodHandler] = {}
    for m in service.methods:
        if m.client_streaming:
            # None today; a new shape needs its own gated handler, never an ungated one.
            raise TypeError(f"{m.full_name}: client-streaming RPCs have no gated handler")
        request_cls = getattr(pb, m.input_type.name)
        response_cls = getattr(pb, m.output_type.name)
        method = getattr(servicer, m.name)
        if m.server_streaming:
            out[m.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(m.name, method, abort, gate),
                request_deserializer=deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
        else:
            out[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary(m.name, method, abort, max_response_bytes, gate),
                request_deserializer=deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
    return out


def add_servicer(
    server: Any, servicer: Any, gate: auth.Gatekeeper, *, abort: Abort | None = None, max_response_bytes: int
) -> None:
    """What `add_ModelBrokerServicer_to_server(servicer, server)` does, guarded and gated."""
    rpc_handlers = handlers(servicer, gate, abort=abort, max_response_bytes=max_response_bytes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, rpc_handlers),))
    server.add_registered_method_handlers(SERVICE, rpc_handlers)
