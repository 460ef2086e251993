"""`application/vnd.amazon.eventstream` decoded from raw bytes, a network read at a time.

AWS's binary framing (ConverseStream, InvokeModelWithResponseStream; PROTOCOLS-CLOUD.md C5).
Each message, all integers big-endian:

    total_length u32 | headers_length u32 | prelude_crc u32 | headers | payload | message_crc u32

prelude_crc is the CRC-32 (zlib's) of the first 8 bytes; message_crc covers everything before
it, prelude CRC included. A header is name_len u8, name, type u8, value (types 0-9: bool true,
bool false, int8, int16, int32, int64, byte array and string with a u16 length, timestamp
int64 ms, UUID 16 bytes, kept as bytes).

Why not botocore's `EventStreamBuffer`: it fits incremental chunks, but it grows its buffer by
`bytes +=` (a large frame trickling in byte by byte costs O(n^2)), and it takes a prelude whose
lengths contradict each other (a total_length below 16 makes it slice backwards and fail with a
struct.error, or never advance). This decoder keeps the same limits (headers <= 128 KiB,
payload <= 24 MiB), checks both CRCs and every length before it buffers a frame's bytes, and
raises EventStreamError (a SSEError, so `Provider.relay` reports it as UPSTREAM_PROTOCOL_ERROR)
for anything that is not the framing. tests/test_eventstream.py holds it to botocore's parser
on the same bytes, split anywhere.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from broker.providers.sse import SSEError

PRELUDE_LENGTH = 12
_CRC_LENGTH = 4
MIN_MESSAGE_LENGTH = PRELUDE_LENGTH + _CRC_LENGTH
# botocore's limits (botocore/eventstream.py): what AWS services send stays far below them.
MAX_HEADERS_LENGTH = 128 * 1024
MAX_PAYLOAD_LENGTH = 24 * 1024 * 1024

HeaderValue = bool | int | bytes | str


class EventStreamError(SSEError):
    """The bytes are not the event-stream framing (a CRC, a length, a header)."""


@dataclass(slots=True)
class Message:
    """One decoded message: its headers by name and its raw payload."""

    headers: dict[str, HeaderValue] = field(default_factory=dict)
    payload: bytes = b""

    def header(self, name: str) -> str:
        """A string header's value ("" when absent or not a string)."""
        value = self.headers.get(name)
        return value if isinstance(value, str) else ""


def crc32(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    return zlib.crc32(data, start) & 0xFFFFFFFF


class EventStreamDecoder:
    """Feed network reads in order; get back every message they complete."""

    __slots__ = ("_buf", "_total")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._total = 0  # the current message's total_length once its prelude checked out

    @property
    def pending(self) -> int:
        """Bytes of an unfinished message held (a body that ends here was cut short)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while True:
            if not self._total:
                if len(self._buf) < PRELUDE_LENGTH:
                    return out
                self._total = _check_prelude(self._buf)
            if len(self._buf) < self._total:
                return out
            total, self._total = self._total, 0
            frame = memoryview(self._buf)[:total]
            try:
                out.append(_message(frame))
            finally:
                frame.release()
            del self._buf[:total]


def _check_prelude(buf: bytearray) -> int:
    """The message's total length, once the prelude's CRC and lengths are consistent."""
    total, headers_length, prelude_crc = struct.unpack_from(">III", buf, 0)
    if crc32(memoryview(buf)[:8]) != prelude_crc:
        raise EventStreamError(
            f"event stream: prelude CRC mismatch (sent {prelude_crc:08x}, computed "
            f"{crc32(bytes(buf[:8])):08x}): the stream is corrupt"
        )
    if total < MIN_MESSAGE_LENGTH:
        raise EventStreamError(f"event stream: a message of {total} bytes (at least {MIN_MESSAGE_LENGTH})")
    if headers_length > MAX_HEADERS_LENGTH:
        raise EventStreamError(
            f"event stream: {headers_length} bytes of headers (at most {MAX_HEADERS_LENGTH})"
        )
    payload_length = total - headers_length - MIN_MESSAGE_LENGTH
    if payload_length < 0:
        raise EventStreamError(
            f"event stream: {headers_length} bytes of headers in a message of {total} bytes"
        )
    if payload_length > MAX_PAYLOAD_LENGTH:
        raise EventStreamError(
            f"event stream: a payload of {payload_length} bytes (at most {MAX_PAYLOAD_LENGTH})"
        )
    return int(total)


def _message(frame: memoryview) -> Message:
    total = len(frame)
    (sent,) = struct.unpack_from(">I", frame, total - _CRC_LENGTH)
    computed = crc32(frame[: total - _CRC_LENGTH])
    if computed != sent:
        raise EventStreamError(
            f"event stream: message CRC mismatch (sent {sent:08x}, computed {computed:08x}): "
            "the stream is corrupt"
        )
    (headers_length,) = struct.unpack_from(">I", frame, 4)
    headers_end = PRELUDE_LENGTH + headers_length
    return Message(
        headers=parse_headers(bytes(frame[PRELUDE_LENGTH:headers_end])),
        payload=bytes(frame[headers_end : total - _CRC_LENGTH]),
    )


# Fixed-size values by type: (struct format, size).
_FIXED = {2: (">b", 1), 3: (">h", 2), 4: (">i", 4), 5: (">q", 8), 8: (">q", 8)}


def parse_headers(data: bytes) -> dict[str, HeaderValue]:
    """The headers section, every value bounded by what is left of it."""
    headers: dict[str, HeaderValue] = {}
    pos, end = 0, len(data)

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > end:
            raise EventStreamError(f"event stream: a header's {what} runs past the headers section")
        piece = data[pos : pos + n]
        pos += n
        return piece

    while pos < end:
        name_length = take(1, "name length")[0]
        try:
            name = take(name_length, "name").decode("utf-8")
        except UnicodeDecodeError:
            raise EventStreamError("event stream: a header name is not UTF-8") from None
        kind = take(1, "type")[0]
        value: HeaderValue
        if kind == 0:
            value = True
        elif kind == 1:
            value = False
        elif kind in _FIXED:
            fmt, size = _FIXED[kind]
            value = int(struct.unpack(fmt, take(size, "value"))[0])
        elif kind in (6, 7):
            (length,) = struct.unpack(">H", take(2, "value length"))
            raw = take(length, "value")
            if kind == 6:
                value = raw
            else:
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise EventStreamError(f"event stream: header {name!r} is not UTF-8") from None
        elif kind == 9:
            value = take(16, "value")  # a UUID's 16 bytes, as botocore gives them
        else:
            raise EventStreamError(f"event stream: header {name!r} has unknown type {kind}")
        if name in headers:
            raise EventStreamError(f"event stream: header {name!r} appears twice")
        headers[name] = value
    return headers


# --- encoding (the fakes and tests write frames with real CRCs) ---------------------------------


def encode_headers(headers: dict[str, str]) -> bytes:
    """String headers (type 7), the only kind Bedrock sends."""
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode("utf-8"), value.encode("utf-8")
        out += bytes([len(raw_name)]) + raw_name + b"\x07" + struct.pack(">H", len(raw_value)) + raw_value
    return bytes(out)


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One message with both CRCs computed."""
    head = encode_headers(headers)
    total = MIN_MESSAGE_LENGTH + len(head) + len(payload)
    prelude = struct.pack(">II", total, len(head))
    prelude += struct.pack(">I", crc32(prelude))
    body = prelude + head + payload
    return body + struct.pack(">I", crc32(body))
