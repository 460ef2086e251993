"""The SSE decoder: events from raw bytes, whatever the network reads cut them into."""

from __future__ import annotations

import random
import time

import pytest

from broker.providers.sse import MAX_LINE_BYTES, LineDecoder, LineTooLong, SSEDecoder, SSEError

STREAM = (
    b": keep-alive comment\n"
    b'data: {"a":1}\n\n'
    b"event: error\r\n"
    b'data: {"error":{"message":"boom"}}\r\n\r\n'
    b"id: 7\rretry: 10\rdata: line one\rdata: line two\r\r"
    b"data: [DONE]\n\n"
)
EVENTS = [
    ("message", b'{"a":1}'),
    ("error", b'{"error":{"message":"boom"}}'),
    ("message", b"line one\nline two"),
    ("message", b"[DONE]"),
]


def feed_in_pieces(data: bytes, size: int) -> list[tuple[str, bytes]]:
    d = SSEDecoder()
    out: list[tuple[str, bytes]] = []
    for i in range(0, len(data), size):
        out += d.feed(data[i : i + size])
    return out


def test_events_in_one_read() -> None:
    assert SSEDecoder().feed(STREAM) == EVENTS


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_events_whatever_the_reads_cut(size: int) -> None:
    # Every cut, including a CR at the end of one read and its LF at the start of the next.
    assert feed_in_pieces(STREAM, size) == EVENTS


def test_unicode_line_separators_inside_json_do_not_split_a_line() -> None:
    payload = '{"content":"a\u2028b\u2029c\u0085d"}'.encode()
    assert SSEDecoder().feed(b"data: " + payload + b"\n\n") == [("message", payload)]


def test_an_event_without_its_blank_line_is_not_dispatched() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: partial\n") == []


def test_an_event_with_no_data_is_not_dispatched() -> None:
    assert SSEDecoder().feed(b"event: ping\n\n: comment\n\n") == []


def test_the_field_value_keeps_everything_after_one_space() -> None:
    assert SSEDecoder().feed(b"data:x\n\ndata:  y\n\n") == [("message", b"x"), ("message", b" y")]


def test_a_line_that_never_ends_is_an_error() -> None:
    d = SSEDecoder()
    with pytest.raises(SSEError, match="without a line end"):
        d.feed(b"data: " + b"x" * (MAX_LINE_BYTES + 1))


def test_the_line_cap_is_configurable_and_counts_across_reads() -> None:
    d = SSEDecoder(max_line=1024)
    d.feed(b"data: " + b"x" * 500)
    with pytest.raises(LineTooLong, match="over 1024 bytes"):
        d.feed(b"x" * 600)
    ok = SSEDecoder(max_line=1024)
    assert ok.feed(b"data: " + b"y" * 1000 + b"\n\n") == [("message", b"y" * 1000)]


def test_a_line_trickling_in_a_byte_at_a_time_is_scanned_once() -> None:
    # 2 MiB one byte per read: re-joining the pending bytes on every read would be O(n^2)
    # (about 2 TB of copying); scanning each byte once takes well under a second.
    d = LineDecoder()
    body = b"z" * (2 * 1024 * 1024)
    t0 = time.process_time()
    for i in range(len(body)):
        assert d.feed(body[i : i + 1]) == []
    assert d.feed(b"\n") == [body]
    assert time.process_time() - t0 < 30  # a bound on runaway work, not a speed test


@pytest.mark.parametrize("seed", range(20))
def test_random_cuts_give_the_same_events_and_lines(seed: int) -> None:
    rng = random.Random(seed)
    pos, sse_out, lines_out = 0, [], []
    sse, lines = SSEDecoder(), LineDecoder()
    while pos < len(STREAM):
        n = rng.randint(1, 9)
        sse_out += sse.feed(STREAM[pos : pos + n])
        lines_out += lines.feed(STREAM[pos : pos + n])
        pos += n
    assert sse_out == EVENTS
    whole = LineDecoder().feed(STREAM)
    assert lines_out == whole and LineDecoder().feed(b"a\r\nb\n") == [b"a", b"b"]


def test_ndjson_lines_and_their_cap() -> None:
    d = LineDecoder(max_line=16)
    assert d.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert d.feed(b":2}\n") == [b'{"b":2}']
    with pytest.raises(LineTooLong):
        d.feed(b"x" * 17)
    tail = LineDecoder()
    tail.feed(b"abc\ndef")
    assert tail.tail() == b"def"
