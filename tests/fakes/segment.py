"""Segmentation: deliver a fake upstream's response in pieces, the way a real network does.

A real network hands the client whatever bytes have arrived, cut anywhere: inside a chunk-size
line, between `\\r` and `\\n`, inside the terminating `0\\r\\n\\r\\n`. A fake that writes each
HTTP chunk in one `write()` never shows a client that, so every fake upstream sends its bytes
through `write_segmented`, which writes each piece a `Segmenter` cuts on its own and lets the
peer read it before the next one.

    MB_TEST_SEGMENT unset        random pieces, seed 1 (what `make test` runs)
    MB_TEST_SEGMENT=off          one write per call (the old behaviour)
    MB_TEST_SEGMENT=random:SEED  random pieces from another seed (optionally random:SEED:MAX_PIECE)

Cut points are drawn over the whole byte stream a segmenter sees, not per call: a write
shorter than the current piece goes out whole and the next write continues the same piece
budget, so cuts land uniformly relative to the HTTP framing, as TCP segment boundaries do.
Successive writes are always separate pieces on top of that.

`Segmenter.at([offsets])` cuts at exact byte offsets of the stream (counted from the first
byte the segmenter sees, normally the status line): deliver one raw response with
`Response.write_raw` and a split lands exactly where a test wants it.

How separate a piece stays: the server socket has TCP_NODELAY (each write is its own segment
on loopback), and after each piece the writer drains and then yields the event loop twice.
One yield is not enough when client and fake share a loop (the in-process daemon): the loop
runs the writer's next step before the client's read callback from the same select(); after
the second yield the client has read the piece alone. A client in another process is not
synchronised with us at all; `pause` (seconds, default 0) adds a real sleep after each piece
for such tests. Measured on loopback with 410 pieces of 1-50 bytes: an in-process client read
410 separate pieces (tests/test_segment.py asserts exactly that); a client in another process
read 126 with pause 0 and 410 with pause 0.001.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import socket

ENV = "MB_TEST_SEGMENT"


class Segmenter:
    """Decides how one response's bytes are cut into separate socket writes."""

    def __init__(self, mode: str = "random", seed: int = 1, max_piece: int = 1500) -> None:
        if mode not in ("off", "random", "at"):
            raise ValueError(f"segment mode must be off, random or at, not {mode!r}")
        if max_piece < 1:
            raise ValueError("max_piece must be at least 1")
        self.mode = mode
        self.seed = seed
        self.max_piece = max_piece
        # Seconds to sleep after each piece (0: only yield the loop); for out-of-process peers.
        self.pause = 0.0
        self._rng = random.Random(seed)
        self._left = 0  # bytes of the current random piece not yet sent
        self._offsets: list[int] = []
        # Bytes this segmenter has cut so far (the stream offset of the next byte).
        self.position = 0

    @classmethod
    def at(cls, offsets: list[int]) -> Segmenter:
        """Cut exactly at these stream offsets (a cut at k: bytes [0, k) then [k, ...))."""
        seg = cls("at")
        seg._offsets = sorted({o for o in offsets if o > 0})
        return seg

    def pieces(self, data: bytes) -> list[bytes]:
        if not data:
            return []
        start, end = self.position, self.position + len(data)
        self.position = end
        if self.mode == "off":
            return [data]
        if self.mode == "at":
            cuts = [o - start for o in self._offsets if start < o < end]
            bounds = [0, *cuts, len(data)]
            return [data[a:b] for a, b in itertools.pairwise(bounds)]
        out: list[bytes] = []
        pos = 0
        while pos < len(data):
            if self._left == 0:
                self._left = self._rng.randint(1, self.max_piece)
            take = min(self._left, len(data) - pos)
            out.append(data[pos : pos + take])
            pos += take
            self._left -= take
        return out

    def __repr__(self) -> str:
        if self.mode == "at":
            return f"Segmenter.at({self._offsets})"
        return f"Segmenter({self.mode!r}, seed={self.seed}, max_piece={self.max_piece})"


def from_env() -> Segmenter | None:
    """The segmenter MB_TEST_SEGMENT asks for: unset -> random seed 1; "off" -> None."""
    raw = os.environ.get(ENV, "").strip().lower()
    if not raw:
        return Segmenter("random", 1)
    if raw == "off":
        return None
    mode, _, rest = raw.partition(":")
    if mode != "random":
        raise ValueError(f"{ENV} must be off, random, random:SEED or random:SEED:MAX_PIECE, not {raw!r}")
    seed_s, _, max_s = rest.partition(":")
    try:
        return Segmenter("random", int(seed_s) if seed_s else 1, int(max_s) if max_s else 1500)
    except ValueError:
        raise ValueError(f"{ENV}: seed and max piece must be integers, got {raw!r}") from None


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY on the writer's socket (asyncio sets it too; a fake must not rely on that)."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def write_segmented(writer: asyncio.StreamWriter, data: bytes, seg: Segmenter | None) -> None:
    """Write data as the segmenter cuts it: each piece written, drained, then the loop yielded to (so the peer can read it alone)."""
    if seg is None:
        if data:
            writer.write(data)
            await writer.drain()
        return
    for piece in seg.pieces(data):
        writer.write(piece)
        await writer.drain()
        if seg.pause > 0:
            await asyncio.sleep(seg.pause)
        else:
            # Two turns of the loop: see the module docstring.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
