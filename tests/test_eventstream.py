"""The event-stream decoder against botocore's parser on the same bytes, split anywhere, and
against adversarial framing: bad prelude and message CRCs, lengths that contradict each other
or exceed the limits, truncation, malformed headers."""

from __future__ import annotations

import base64
import itertools
import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from botocore.eventstream import EventStreamBuffer

from broker.providers.eventstream import (
    MAX_HEADERS_LENGTH,
    MAX_PAYLOAD_LENGTH,
    EventStreamDecoder,
    EventStreamError,
    Message,
    crc32,
    encode_message,
)

RECORDINGS = Path(__file__).parents[1].parent / "shared" / "recordings"
STREAMS = [
    "bd-text-stream",
    "bd-tool-stream",
    "bd-tool-result-stream",
    "bd-thinking-stream",
    "bd-content-filtered-stream",
]
# PROTOCOLS-CLOUD.md C5: an exception frame built by hand and accepted by botocore.
THROTTLING_HEX = (
    "000000b2000000613590d5d30d3a6d6573736167652d74797065070009657863657074696f6e"
    "0f3a657863657074696f6e2d747970650700137468726f74746c696e67457863657074696f6e"
    "0d3a636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e"
    "7b226d657373616765223a22546f6f206d616e792072657175657374732c20706c656173652077616974206265666f726520747279696e6720616761696e2e227d"
    "1d4f6dc6"
)


def recorded(name: str) -> bytes:
    rec = json.loads((RECORDINGS / f"{name}.json").read_text())
    return base64.b64decode(rec["response"]["body"])


def botocore_messages(data: bytes) -> list[tuple[dict[str, object], bytes]]:
    buf = EventStreamBuffer()
    buf.add_data(data)
    out: list[tuple[dict[str, object], bytes]] = []
    for m in buf:
        headers: Any = m.headers  # botocore-stubs types it loosely; it is a dict of header values
        out.append((dict(headers), m.payload))
    return out


def decode_split(data: bytes, cuts: list[int]) -> list[Message]:
    decoder = EventStreamDecoder()
    out: list[Message] = []
    bounds = [0, *sorted(set(cuts)), len(data)]
    for a, b in itertools.pairwise(bounds):
        out += decoder.feed(data[a:b])
    assert decoder.pending == 0
    return out


@pytest.mark.parametrize("name", STREAMS)
def test_recordings_decode_as_botocore_decodes_them_split_anywhere(name: str) -> None:
    data = recorded(name)
    want = botocore_messages(data)
    rng = random.Random(name)
    for _ in range(20):
        cuts = rng.sample(range(1, len(data)), k=rng.randint(1, 60))
        got = decode_split(data, cuts)
        assert [(m.headers, m.payload) for m in got] == want
    # and one byte at a time
    assert [(m.headers, m.payload) for m in decode_split(data, list(range(1, len(data))))] == want


def test_the_documented_exception_frame_round_trips() -> None:
    frame = encode_message(
        {
            ":message-type": "exception",
            ":exception-type": "throttlingException",
            ":content-type": "application/json",
        },
        b'{"message":"Too many requests, please wait before trying again."}',
    )
    assert frame.hex() == THROTTLING_HEX
    (msg,) = EventStreamDecoder().feed(frame)
    assert msg.header(":exception-type") == "throttlingException"
    assert botocore_messages(frame)[0] == (msg.headers, msg.payload)


def test_every_header_type_is_read_as_botocore_reads_it() -> None:
    headers = (
        b"\x01a\x00" + b"\x01b\x01" + b"\x01c\x02\xff" + b"\x01d\x03\x01\x02" + b"\x01e\x04\x00\x00\x01\x00"
        + b"\x01f\x05" + struct.pack(">q", -5) + b"\x01g\x06\x00\x03xyz" + b"\x01h\x07\x00\x02hi"
        + b"\x01i\x08" + struct.pack(">q", 1700000000000) + b"\x01j\x09" + bytes(range(16))
    )  # fmt: skip
    total = 16 + len(headers) + 2
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", crc32(prelude))
    body = prelude + headers + b"{}"
    frame = body + struct.pack(">I", crc32(body))
    (msg,) = EventStreamDecoder().feed(frame)
    ((theirs, payload),) = botocore_messages(frame)
    assert payload == msg.payload == b"{}"
    assert msg.headers == theirs


def _with_prelude(total: int, headers_length: int, rest: bytes = b"") -> bytes:
    prelude = struct.pack(">II", total, headers_length)
    return prelude + struct.pack(">I", crc32(prelude)) + rest


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (_with_prelude(8, 0), "a message of 8 bytes"),
        (_with_prelude(0, 0), "a message of 0 bytes"),
        (_with_prelude(40, 30), "30 bytes of headers in a message of 40 bytes"),
        (_with_prelude(16 + MAX_HEADERS_LENGTH + 1, MAX_HEADERS_LENGTH + 1), f"at most {MAX_HEADERS_LENGTH}"),
        (_with_prelude(16 + MAX_PAYLOAD_LENGTH + 1, 0), f"at most {MAX_PAYLOAD_LENGTH}"),
        (_with_prelude(2**32 - 1, 0), "a payload of"),
    ],
)
def test_contradicting_or_oversize_lengths_are_refused_before_buffering(frame: bytes, message: str) -> None:
    decoder = EventStreamDecoder()
    with pytest.raises(EventStreamError, match=message):
        decoder.feed(frame)


def test_a_bad_prelude_crc() -> None:
    frame = bytearray(encode_message({":event-type": "x"}, b"{}"))
    frame[9] ^= 0x01
    with pytest.raises(EventStreamError, match="prelude CRC mismatch"):
        EventStreamDecoder().feed(bytes(frame))


@pytest.mark.parametrize("flip", [12, 20, -5, -1])
def test_a_bad_message_crc_anywhere_in_the_message(flip: int) -> None:
    frame = bytearray(encode_message({":event-type": "contentBlockDelta"}, b'{"delta":{"text":"hi"}}'))
    frame[flip] ^= 0x40
    decoder = EventStreamDecoder()
    with pytest.raises(EventStreamError, match="message CRC mismatch"):
        for i in range(len(frame)):  # the error comes only once the whole message is in
            decoder.feed(bytes(frame[i : i + 1]))


def test_truncated_messages_wait_and_say_how_much_is_held() -> None:
    frame = encode_message({":event-type": "messageStop"}, b'{"stopReason":"end_turn"}')
    decoder = EventStreamDecoder()
    assert decoder.feed(frame[:-3]) == [] and decoder.pending == len(frame) - 3
    assert decoder.feed(frame[-3:])[0].payload == b'{"stopReason":"end_turn"}' and decoder.pending == 0


@pytest.mark.parametrize(
    "headers",
    [
        b"\x05ab",  # a name longer than the section
        b"\x01a\x07\x00\x09hi",  # a string value longer than the section
        b"\x01a\x0b",  # an unknown type
        b"\x01a\x07\x00\x02hi\x01a\x07\x00\x02hi",  # the same header twice
        b"\x01\xff\x07\x00\x00",  # a name that is not UTF-8
        b"\x01a\x05\x00",  # an int64 cut short
    ],
)
def test_malformed_headers_are_errors_with_valid_crcs(headers: bytes) -> None:
    total = 16 + len(headers)
    body = _with_prelude(total, len(headers), headers)
    frame = body + struct.pack(">I", crc32(body))
    with pytest.raises(EventStreamError):
        EventStreamDecoder().feed(frame)


def test_many_messages_in_one_read() -> None:
    frames = [
        encode_message({":event-type": "contentBlockDelta"}, json.dumps({"i": i}).encode()) for i in range(50)
    ]
    got = EventStreamDecoder().feed(b"".join(frames))
    assert [json.loads(m.payload)["i"] for m in got] == list(range(50))
