"""A hostile upstream: speaks enough of one protocol (OpenAI, Anthropic or Ollama) for
discovery and health to pass, and answers every completion with whatever bytes a test
scripts, or with an endless stream of content.

    async with Hostile("openai") as up:
        up.body = openai_sse([...])        # the next completions' whole body
        up.endless = True                  # or: content until the client hangs up

`served` counts completion bodies started, `hangups` those whose client went away before
the body ended (the broker closing the upstream).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.fakes.http import FakeHTTPServer, Request, Response

MODEL = "m1"
ANTHROPIC_MODEL = "claude-sonnet-4-5"


def raw_json(obj: Any) -> str:
    """JSON text that may hold what json.dumps cannot write as given (2**63 is fine; for
    1e999 or a lone surrogate escape, pass the raw text through `RawNumber`/`RawText`)."""
    if isinstance(obj, Raw):
        return obj.text
    if isinstance(obj, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{raw_json(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(raw_json(v) for v in obj) + "]"
    return json.dumps(obj)


class Raw:
    """A JSON value written as this exact text (`Raw("1e999")`, `Raw('"\\\\ud800"')`)."""

    def __init__(self, text: str) -> None:
        self.text = text


def sse_event(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {raw_json(obj)}\n\n".encode()


def openai_chunk(
    delta: dict[str, Any] | None = None, *, finish: str | None = None, usage: Any = None
) -> bytes:
    obj: dict[str, Any] = {"id": "chatcmpl-h", "object": "chat.completion.chunk", "model": MODEL}
    obj["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage is not None:
        obj["usage"] = usage
    return sse_event(obj)


def openai_body(*chunks: bytes) -> bytes:
    return b"".join(chunks) + b"data: [DONE]\n\n"


def anthropic_event(obj: dict[str, Any]) -> bytes:
    return sse_event(obj, event=str(obj["type"]))


def anthropic_start(usage: Any = None) -> bytes:
    message: dict[str, Any] = {
        "id": "msg_h",
        "type": "message",
        "role": "assistant",
        "model": ANTHROPIC_MODEL,
        "content": [],
    }
    message["usage"] = usage if usage is not None else {"input_tokens": 5, "output_tokens": 1}
    return anthropic_event({"type": "message_start", "message": message})


def anthropic_text(index: Any, text: Any) -> bytes:
    return anthropic_event(
        {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
    ) + (
        anthropic_event(
            {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}
        )
    )


def anthropic_end(usage: Any = None) -> bytes:
    return anthropic_event(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": usage if usage is not None else {"output_tokens": 3},
        }
    ) + anthropic_event({"type": "message_stop"})


def ollama_line(obj: dict[str, Any]) -> bytes:
    return (raw_json(obj) + "\n").encode()


def ollama_text(text: Any) -> bytes:
    return ollama_line({"model": MODEL, "message": {"role": "assistant", "content": text}, "done": False})


def ollama_done(**counts: Any) -> bytes:
    doc: dict[str, Any] = {"model": MODEL, "message": {"role": "assistant", "content": ""}, "done": True}
    doc["done_reason"] = "stop"
    doc.update(counts or {"prompt_eval_count": 5, "eval_count": 3})
    return ollama_line(doc)


class Hostile:
    def __init__(self, kind: str) -> None:
        assert kind in ("openai", "anthropic", "ollama")
        self.kind = kind
        self.body = b""
        self.endless = False
        # The text of each endless chunk (one chunk per write).
        self.chunk_text = "x" * 16384
        self.served = 0
        self.hangups = 0
        self.server = FakeHTTPServer(self._handle, segmenter=None)

    @property
    def url(self) -> str:
        return f"{self.server.url}/v1" if self.kind == "openai" else self.server.url

    @property
    def model(self) -> str:
        return ANTHROPIC_MODEL if self.kind == "anthropic" else MODEL

    async def __aenter__(self) -> Hostile:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()

    async def _handle(self, req: Request, resp: Response) -> None:
        if req.method == "GET":
            await resp.send(200, self._listing(req.path))
        elif req.path == "/api/show":
            await resp.send(200, {"capabilities": ["completion", "tools", "vision"], "model_info": {}})
        else:
            await self._complete(resp)

    def _listing(self, path: str) -> Any:
        if path == "/api/version":
            return {"version": "0.12.6"}
        if path == "/api/tags":
            return {"models": [{"name": MODEL, "model": MODEL, "details": {}}]}
        if self.kind == "anthropic":
            return {"data": [{"id": ANTHROPIC_MODEL, "type": "model"}], "has_more": False, "last_id": None}
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def _complete(self, resp: Response) -> None:
        ctype = "application/x-ndjson" if self.kind == "ollama" else "text/event-stream"
        await resp.start_stream(200, content_type=ctype)
        self.served += 1
        try:
            if not self.endless:
                await resp.write(self.body)
                await resp.end()
                return
            if self.kind == "anthropic":
                await resp.write(anthropic_start())
                await resp.write(
                    anthropic_event(
                        {
                            "type": "content_block_start",
                            "index": 0,
                            "content_block": {"type": "text", "text": ""},
                        }
                    )
                )
            chunk = self._endless_chunk()
            while True:
                await resp.write(chunk)
                await asyncio.sleep(0)
        except (ConnectionError, asyncio.CancelledError):
            self.hangups += 1
            raise

    def _endless_chunk(self) -> bytes:
        if self.kind == "openai":
            return openai_chunk({"content": self.chunk_text})
        if self.kind == "anthropic":
            return anthropic_event(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": self.chunk_text},
                }
            )
        return ollama_text(self.chunk_text)


def provider_config(up: Hostile, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"name": up.kind, "type": up.kind, "base_url": up.url, **extra}
    if up.kind != "ollama":
        cfg["api_key"] = f"sk-hostile-{up.kind}-5e6f7a8b"
    return cfg
