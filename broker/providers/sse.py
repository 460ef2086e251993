"""Server-sent events decoded from raw bytes, a network read at a time.

Why not httpx-sse: it decodes text and splits lines one at a time through several layers
of async generators, which costs more per event than everything else the daemon does
with it. This decoder takes whatever bytes one read returned and hands back every event
completed in them at once, with each `data` payload still as bytes (orjson reads bytes).

It follows the WHATWG rules that matter for model APIs: lines end at CRLF, LF or CR
(a CR at the end of one read and the LF at the start of the next are one line end); a
blank line dispatches the event; `data` lines are joined with LF; `event` names it;
comments (`:` keep-alives), `id`, `retry` and unknown fields are ignored; an event with
no `data` is not dispatched. It splits on bytes only, so U+2028/U+2029/U+0085 inside a
JSON string (multi-byte in UTF-8) never break a line.
"""

from __future__ import annotations

# A line this long without a line end is not an event stream we can use.
MAX_PENDING_BYTES = 16 * 1024 * 1024

_COLON = 58  # ord(":")


class SSEError(ValueError):
    pass


class SSEDecoder:
    def __init__(self) -> None:
        self._pending = b""
        self._event = ""
        self._data: list[bytes] = []
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """Every event completed by `chunk`, as (event name, data); "message" when unnamed."""
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        buf = self._pending + chunk if self._pending else chunk
        if b"\r" in buf:
            self._skip_lf = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > MAX_PENDING_BYTES:
            raise SSEError(f"a line of over {MAX_PENDING_BYTES} bytes without a line end")
        out: list[tuple[str, bytes]] = []
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
        return out

    def close(self) -> list[tuple[str, bytes]]:
        """At the end of the body: an event left without its blank line is dropped, as the spec says."""
        self._pending = b""
        self._data = []
        return []
