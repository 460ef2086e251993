"""Server-sent events and newline-delimited lines decoded from raw bytes, a network read at a time.

Why hand-written: the framing libraries decode text and split lines one at a time through
several layers of async generators, which costs more per event than everything else the
daemon does with it. These decoders take whatever bytes one read returned and hand back
everything completed in them at once, as bytes (orjson reads bytes).

Both keep two promises a network demands (tested against adversarial splits in
tests/test_sse.py): bytes are scanned once (a partial line is kept as pieces and joined
only when its end arrives, so a line trickling in byte by byte costs O(n), not O(n^2)),
and a line longer than `max_line` bytes is refused (LineTooLong) before it is buffered.

SSE follows the WHATWG rules that matter for model APIs: lines end at CRLF, LF or CR (a
CR at the end of one read and the LF at the start of the next are one line end); a blank
line dispatches the event; `data` lines are joined with LF; `event` names it; comments
(`:` keep-alives), `id`, `retry` and unknown fields are ignored; an event with no `data`
is not dispatched. Splitting on bytes means U+2028/U+2029/U+0085 inside a JSON string
(multi-byte in UTF-8) never break a line.
"""

from __future__ import annotations

# Default cap on one line (config: provider max_line_bytes).
MAX_LINE_BYTES = 16 * 1024 * 1024

_COLON = 58  # ord(":")
_LF = 10  # ord("\n")


class SSEError(ValueError):
    pass


class LineTooLong(SSEError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"a line of over {limit} bytes without a line end (max_line_bytes)")


class _Pending:
    """The start of a line whose end has not arrived, kept as pieces."""

    __slots__ = ("limit", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, piece: bytes) -> None:
        if piece:
            self.size += len(piece)
            if self.size > self.limit:
                raise LineTooLong(self.limit)
            self.parts.append(piece)

    def take(self, head: bytes) -> bytes:
        """The pending start joined with `head` (the completing bytes); resets."""
        if not self.parts:
            line = head
        else:
            self.parts.append(head)
            line = b"".join(self.parts)
            self.parts = []
        self.size = 0
        if len(line) > self.limit:
            raise LineTooLong(self.limit)
        return line

    def split(self, chunk: bytes) -> list[bytes]:
        """The LF-terminated lines `chunk` completes (the first joined with what was pending);
        what follows the last LF is kept for the next chunk."""
        last = chunk.rfind(b"\n")
        if last < 0:
            self.add(chunk)
            return []
        first = chunk.find(b"\n")
        lines = [self.take(chunk[:first])]
        if first != last:
            lines += chunk[first + 1 : last].split(b"\n")
        self.add(chunk[last + 1 :])
        return lines


class LineDecoder:
    """NDJSON and other LF-terminated lines (a trailing CR is dropped); bytes out."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._pending = _Pending(max_line)

    def feed(self, chunk: bytes) -> list[bytes]:
        return [line[:-1] if line.endswith(b"\r") else line for line in self._pending.split(chunk)]

    def tail(self) -> bytes:
        """What is left after the last line end (at the end of the body)."""
        return self._pending.take(b"")


class SSEDecoder:
    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._pending = _Pending(max_line)
        self._event = ""
        self._data: list[bytes] = []
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """Every event completed by `chunk`, as (event name, data); "message" when unnamed."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            # Only the new bytes are normalised; a CR ending this read may pair with an LF
            # starting the next, which is then skipped.
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out: list[tuple[str, bytes]] = []
        pending = self._pending
        if not pending.parts and not self._data and not self._event:
            # Nothing carried over from the last read: take the one-`data:`-line events at the
            # start whole (most events, and most reads are nothing else), then the rest below.
            pos = self._whole_events(chunk, out)
            if pos:
                if pos == len(chunk):
                    return out
                # What _Pending.split would do with the rest of the read: its first line is a
                # middle line of this read (in hand already, so not held to the cap).
                rest = chunk[pos:]
                last = rest.rfind(b"\n")
                if last < 0:
                    pending.add(rest)
                    return out
                pending.add(rest[last + 1 :])
                self._lines(rest[:last].split(b"\n"), out)
                return out
        self._lines(pending.split(chunk), out)
        return out

    def _whole_events(self, chunk: bytes, out: list[tuple[str, bytes]]) -> int:
        """The events at the start of `chunk` that are one `data: ` line and a blank line,
        appended to `out`; returns where the first other line starts. The same events (and
        the same LineTooLong for the read's first line) as the line rules give them, with
        one find per event instead of a split, a partition and a join."""
        limit = self._pending.limit
        find, startswith = chunk.find, chunk.startswith
        pos, size = 0, len(chunk)
        while pos < size:
            end = find(b"\n", pos)
            if end < 0 or end + 1 == size or chunk[end + 1] != _LF or not startswith(b"data: ", pos):
                break
            if not pos and end > limit:
                raise LineTooLong(limit)
            out.append(("message", chunk[pos + 6 : end]))
            pos = end + 2
        return pos

    def _lines(self, lines: list[bytes], out: list[tuple[str, bytes]]) -> None:
        """The SSE line rules: a blank line dispatches, `:` is a comment, `data`/`event` kept."""
        for line in lines:
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
