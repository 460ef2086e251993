"""The SSE decoder: events from raw bytes, whatever the network reads cut them into."""

from __future__ import annotations

import pytest

from broker.providers.sse import MAX_PENDING_BYTES, SSEDecoder, SSEError

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
    assert d.close() == []


def test_an_event_with_no_data_is_not_dispatched() -> None:
    assert SSEDecoder().feed(b"event: ping\n\n: comment\n\n") == []


def test_the_field_value_keeps_everything_after_one_space() -> None:
    assert SSEDecoder().feed(b"data:x\n\ndata:  y\n\n") == [("message", b"x"), ("message", b" y")]


def test_a_line_that_never_ends_is_an_error() -> None:
    d = SSEDecoder()
    with pytest.raises(SSEError, match="without a line end"):
        d.feed(b"data: " + b"x" * (MAX_PENDING_BYTES + 1))
