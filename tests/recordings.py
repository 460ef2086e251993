"""Read the recorded vendor traffic in ../shared/recordings (never copied into the repo) and
serve one recording from a loopback HTTP server, so wire parsers and the daemon meet the
vendors' real bytes.

`SOURCES.md` there says where each file comes from and how faithful its bytes are.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.http import FakeHTTPServer, Request, Response

RECORDINGS = Path(__file__).resolve().parent.parent.parent / "shared" / "recordings"
# Framing is the replaying server's own; the rest of the recorded headers go out as recorded.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


def recording(name: str) -> dict[str, Any]:
    path = RECORDINGS / f"{name}.json"
    if not path.exists():
        # Not a skip: CI lays shared/ beside the clone, and a suite that silently skips the
        # vendors' real bytes proves nothing.
        pytest.fail(f"recording {name!r} is not at {path}: shared/recordings must sit beside the repo")
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


def body(name: str) -> str:
    text = recording(name)["response"]["body"]
    assert isinstance(text, str)
    return text


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event, data) of an SSE body, comments skipped: for feeding a wire parser directly."""
    out: list[tuple[str, str]] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event, data = "", []
        for line in block.split("\n"):
            if line.startswith(":") or not line:
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        if data:
            out.append((event, "\n".join(data)))
    return out


def sse_blocks(text: str) -> list[str]:
    """The body cut after each blank line (each SSE event or comment with its terminator)."""
    parts = text.split("\n\n")
    blocks = [p + "\n\n" for p in parts[:-1]]
    if parts[-1]:
        blocks.append(parts[-1])
    return blocks


class RecordedUpstream:
    """Answers every request with one recording's response (GETs of a listing with its
    `listing` document, when the recording has one). `pace` > 0 writes an SSE body one event
    at a time, `pace` seconds apart, as a model generating at that speed would."""

    def __init__(self, name: str, *, pace: float = 0.0) -> None:
        self.doc = recording(name)
        self.pace = pace
        self.server = FakeHTTPServer(self._handle)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    def posts(self) -> list[Request]:
        return [r for r in self.requests if r.method == "POST"]

    async def __aenter__(self) -> RecordedUpstream:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()

    async def _handle(self, req: Request, resp: Response) -> None:
        listing = self.doc.get("listing")
        if req.method == "GET" and isinstance(listing, dict):
            for path, page in listing.items():
                if req.path.endswith(path.removeprefix("/v1")):
                    await resp.send(200, page)
                    return
        recorded = self.doc["response"]
        if req.method == "GET":
            # Discovery and health: an empty listing both OpenAI's and Anthropic's readers take.
            await resp.send(200, {"object": "list", "data": [], "has_more": False})
            return
        if recorded is None:
            await resp.send(404, {"error": {"message": "not recorded"}})
            return
        headers = {k.lower(): v for k, v in recorded["headers"] if k.lower() not in _HOP_BY_HOP}
        content_type = headers.pop("content-type", "application/json")
        text = recorded["body"]
        if "event-stream" not in content_type and "ndjson" not in content_type:
            await resp.send(recorded["status"], text, headers=headers, content_type=content_type)
            return
        await resp.start_stream(recorded["status"], content_type=content_type, headers=headers)
        if self.pace <= 0:
            await resp.write(text)
        else:
            for block in sse_blocks(text):
                await resp.write(block)
                await asyncio.sleep(self.pace)
        await resp.end()
