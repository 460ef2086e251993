"""The SSE decoder's whole-event fast path gives what the line-by-line rules give: the same
events and the same errors, for every way the network cuts the bytes."""

from __future__ import annotations

import random

import pytest

from broker.providers.sse import _COLON, LineTooLong, SSEDecoder


class LineByLine(SSEDecoder):
    """The decoder before the fast path: every read through the line rules."""

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out: list[tuple[str, bytes]] = []
        for line in self._pending.split(chunk):
            if not line:
                if self._data:
                    out.append((self._event or "message", b"\n".join(self._data)))
                    self._data = []
                self._event = ""
                continue
            if line[0] == _COLON:
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
        return out


PIECES = [
    b'data: {"a":1}\n\n',
    b"data: [DONE]\n\n",
    b"data:x\n\n",
    b"data:  two spaces\n\n",
    b"data: one\ndata: two\n\n",
    b"event: error\ndata: {}\n\n",
    b"event: ping\n\n",
    b": keep-alive\n\n",
    b": comment\ndata: after\n\n",
    b"id: 7\nretry: 10\ndata: z\n\n",
    b"data\n\n",
    b"data:\n\n",
    b"\n",
    b"\n\n\n",
    b"data: crlf\r\n\r\n",
    b"data: cr\r\r",
    b"event: e\r\ndata: mixed\n\r\n",
    b"data: \xe2\x80\xa8 sep\n\n",
    b"data: partial",
    b"data: " + b"L" * 40 + b"\n\n",
    b"x" * 50 + b"\n\n",
    b"data: " + b"M" * 70,
]


def run(decoder: SSEDecoder, reads: list[bytes]) -> list[object]:
    """Each read's events, or the error that ended the stream (as type and message)."""
    out: list[object] = []
    for r in reads:
        try:
            out.append(decoder.feed(r))
        except LineTooLong as exc:
            out.append((type(exc).__name__, str(exc)))
            break
    return out


def cuts(rng: random.Random, data: bytes) -> list[bytes]:
    reads, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 2, 3, 7, 16, 64, len(data)])
        reads.append(data[pos : pos + n])
        pos += n
    return reads


@pytest.mark.parametrize("seed", range(300))
def test_fast_path_matches_the_line_rules(seed: int) -> None:
    rng = random.Random(seed)
    data = b"".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))
    limit = rng.choice([16, 48, 1 << 20])
    for reads in ([data], cuts(rng, data), [p for p in data.split(b"\n\n") if p]):
        assert run(SSEDecoder(limit), reads) == run(LineByLine(limit), reads), (data, reads, limit)


@pytest.mark.parametrize("seed", range(50))
def test_whole_events_per_read_match_the_line_rules(seed: int) -> None:
    # The common case: every read ends on an event boundary (the fast path every time).
    rng = random.Random(seed)
    events = [rng.choice(PIECES[:12]) for _ in range(rng.randint(1, 30))]
    reads, i = [], 0
    while i < len(events):
        n = rng.randint(1, 5)
        reads.append(b"".join(events[i : i + n]))
        i += n
    assert run(SSEDecoder(), reads) == run(LineByLine(), reads)


def test_a_first_line_over_the_cap_is_refused_on_the_fast_path_too() -> None:
    line = b"data: " + b"x" * 20 + b"\n\n"
    with pytest.raises(LineTooLong, match="over 16 bytes"):
        SSEDecoder(16).feed(line)
    with pytest.raises(LineTooLong, match="over 16 bytes"):
        LineByLine(16).feed(line)


def test_one_data_line_events_are_taken_whole() -> None:
    d = SSEDecoder()
    assert d.feed(b'data: {"a":1}\n\ndata: [DONE]\n\n') == [("message", b'{"a":1}'), ("message", b"[DONE]")]
    # An event name that started in an earlier read still names the event.
    d.feed(b"event: error\n")
    assert d.feed(b"data: {}\n\n") == [("error", b"{}")]
