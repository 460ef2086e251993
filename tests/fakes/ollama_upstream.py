"""A byte-faithful fake of Ollama's native API on loopback (PROTOCOLS.md section C).

`POST /api/chat` streams NDJSON (`application/x-ndjson`) the way Ollama does: `thinking`
lines first (`{"role":"assistant","content":"","thinking":...}`), one line per content
piece, tool calls whole in one line with arguments as an object, then a `done` line with
done_reason, durations in nanoseconds and the token counts; `stream: false` answers one
object (`thinking`, `content` and `tool_calls` in one message, as recording
ol-thinking-toolcall). `think` is checked as server/routes.go does: a value other than
true, false or a level is a 400, and thinking asked of a model without the "thinking"
capability is `"<model>" does not support thinking`. Also `GET /api/tags`, `POST /api/show`,
`GET /api/version` and `GET /`. Every request is kept (`requests`, `chat_bodies`).

Scripting follows the other fakes: `.reply` is what the next chats answer, `.faults` is a
FIFO of failures consumed one per `/api/chat` request (only chat, so a background health
loop cannot eat a fault meant for a completion). `broken_show` makes `/api/show` fail for
the named models and `version_fault` makes `/api/version` fail, for discovery and health.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tests.fakes.http import FakeHTTPServer, Handler, Request, Response
from tests.fakes.script import Fault, Reply


@dataclass
class FakeModel:
    name: str  # as pulled, without ":latest"
    capabilities: tuple[str, ...] = ("completion", "tools")
    context_length: int = 8192
    architecture: str = "llama"
    parameter_size: str = "3.2B"


DEFAULT_MODELS = (
    FakeModel("llama3.2", ("completion", "tools"), 131072, "llama", "3.2B"),
    FakeModel("llava", ("completion", "vision"), 32768, "llama", "7B"),
    FakeModel("nomic-embed-text", ("embedding",), 2048, "nomic-bert", "137M"),
)

# What `think` takes besides true and false (api/types.go ThinkValue).
_THINK_LEVELS = ("high", "medium", "low", "max")

_DEFAULT_ERRORS = {
    400: "invalid request",
    404: "model not found",
    429: "too many requests",
    500: "an error was encountered while running the model",
    502: "bad gateway",
    503: "server busy, please try again.  maximum pending requests exceeded",
}


async def _send_json(resp: Response, status: int, obj: Any, *, headers: dict[str, str] | None = None) -> None:
    # Go's encoder (gin's c.JSON): compact separators, UTF-8 charset in the content type.
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    await resp.send(status, body, headers=headers, content_type="application/json; charset=utf-8")


def _ndjson(obj: Any) -> bytes:
    # Ollama writes UTF-8 as is (Go does not \u-escape it), so clients must decode real UTF-8.
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


class _CrashableServer(FakeHTTPServer):
    """A FakeHTTPServer whose stop() also drops idle keep-alive connections, like a crash.

    FakeHTTPServer.stop() cancels connection tasks, but one cancelled while it awaits its
    EOF watcher swallows the cancel (`suppress(BaseException)`) and keeps serving the
    pooled connection, so a "stopped" upstream would still answer health checks.
    """

    def __init__(self, handler: Handler, *, port: int = 0) -> None:
        super().__init__(handler, port=port)
        self._writers: set[asyncio.StreamWriter] = set()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await super()._on_conn(reader, writer)
        finally:
            self._writers.discard(writer)

    async def stop(self) -> None:
        await super().stop()
        for writer in list(self._writers):
            writer.transport.abort()


class FakeOllama:
    """Ollama's native API on 127.0.0.1; `url` is the base_url a provider configures."""

    def __init__(self, *, models: Iterable[str | FakeModel] = DEFAULT_MODELS, port: int = 0) -> None:
        # A bare name is a chat model with tools, as most pulled models are today.
        self.models = [m if isinstance(m, FakeModel) else FakeModel(m) for m in models]
        self.reply = Reply()
        # The model's thinking, streamed before the content (no neutral Reply field).
        self.thinking_chunks: list[str] = []
        # Consumed one per /api/chat only, so a background health loop cannot eat a fault.
        self.faults: list[Fault] = []
        self.broken_show: set[str] = set()  # models whose /api/show answers 500
        self.version_fault: Fault | None = None  # how /api/version fails; None: it answers
        self.version = "0.12.6"
        # /api/embed: every call's input count in arrival order; native sizes by model.
        self.embed_sizes: list[int] = []
        self.embed_dimensions = {"nomic-embed-text": 768, "mxbai-embed-large": 1024, "all-minilm": 384}
        self.server: FakeHTTPServer = _CrashableServer(self._handle, port=port)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    @property
    def chat_bodies(self) -> list[Any]:
        """The JSON bodies of every /api/chat request so far."""
        return [r.json() for r in self.server.requests if r.path == "/api/chat"]

    async def start(self) -> FakeOllama:
        """Start, or restart after stop() on the same port (the server keeps its port)."""
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop()

    async def __aenter__(self) -> FakeOllama:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- routing -------------------------------------------------------------------------------

    def _model(self, name: str) -> FakeModel | None:
        short = name.removesuffix(":latest")
        return next((m for m in self.models if m.name == short), None)

    async def _handle(self, req: Request, resp: Response) -> None:
        route = (req.method, req.path)
        if route == ("POST", "/api/chat"):
            await self._chat(req, resp)
        elif route == ("POST", "/api/embed"):
            await self._embed(req, resp)
        elif route == ("GET", "/api/tags"):
            await _send_json(resp, 200, {"models": [self._tag(m) for m in self.models]})
        elif route == ("POST", "/api/show"):
            await self._show(req, resp)
        elif route == ("GET", "/api/version"):
            if self.version_fault is not None:
                await self._fail(self.version_fault, resp)
            else:
                await _send_json(resp, 200, {"version": self.version})
        elif route in (("GET", "/"), ("HEAD", "/")):
            await resp.send(200, "Ollama is running", content_type="text/plain; charset=utf-8")
        else:
            await resp.send(404, "404 page not found", content_type="text/plain")

    async def _embed(self, req: Request, resp: Response) -> None:
        """POST /api/embed as PROTOCOLS-2026.md 7.2 (a token is a whitespace-separated word here)."""
        from tests.fakes.openai_upstream import fake_vector

        body = req.json() or {}
        name = str(body.get("model") or "")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        self.embed_sizes.append(len(inputs) if isinstance(inputs, list) else 0)
        m = self._model(name)
        if m is None:
            await _send_json(resp, 404, {"error": f"model '{name}' not found"})
            return
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            await _send_json(resp, 400, {"error": "invalid input type"})
            return
        native = self.embed_dimensions.get(m.name, 768)
        dims = min(int(body.get("dimensions") or native), native)
        await _send_json(
            resp,
            200,
            {
                "model": name,
                "embeddings": [fake_vector(t, dims) for t in inputs],
                "total_duration": 14143917,
                "load_duration": 1019500,
                "prompt_eval_count": sum(len(t.split()) for t in inputs),
            },
        )

    def _tag(self, m: FakeModel) -> dict[str, Any]:
        return {
            "name": f"{m.name}:latest",
            "model": f"{m.name}:latest",
            "modified_at": "2025-07-01T10:00:00.000000000Z",
            "size": 2019393189,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": self._details(m),
        }

    def _details(self, m: FakeModel) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": m.architecture,
            "families": [m.architecture],
            "parameter_size": m.parameter_size,
            "quantization_level": "Q4_K_M",
        }

    async def _show(self, req: Request, resp: Response) -> None:
        body = req.json() or {}
        name = str(body.get("model") or body.get("name") or "")
        m = self._model(name)
        if m is None:
            await _send_json(resp, 404, {"error": f"model '{name}' not found"})
            return
        if m.name in self.broken_show:
            await _send_json(resp, 500, {"error": f"failed to read manifest for {m.name}: unexpected EOF"})
            return
        await _send_json(
            resp,
            200,
            {
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {m.name}:latest\n',
                "parameters": 'stop                           "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": self._details(m),
                "model_info": {
                    "general.architecture": m.architecture,
                    "general.parameter_count": 3212749888,
                    "general.file_type": 15,
                    f"{m.architecture}.context_length": m.context_length,
                    f"{m.architecture}.embedding_length": 3072,
                },
                "capabilities": list(m.capabilities),
                "modified_at": "2025-07-01T10:00:00.000000000Z",
            },
        )

    # --- chat ----------------------------------------------------------------------------------

    async def _chat(self, req: Request, resp: Response) -> None:
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None and fault.kind in ("status", "reset_before_headers", "stall_before_headers"):
            await self._fail(fault, resp)
            return
        try:
            body = req.json()
        except ValueError as exc:
            await _send_json(resp, 400, {"error": f"invalid character: {exc}"})
            return
        name = str(body.get("model") or "")
        if not name:
            await _send_json(resp, 400, {"error": "model is required"})
            return
        m = self._model(name)
        if m is None:
            await _send_json(resp, 404, {"error": f'model "{name}" not found, try pulling it first'})
            return
        if "completion" not in m.capabilities:
            await _send_json(resp, 400, {"error": f'"{name}" does not support chat'})
            return
        if body.get("tools") and "tools" not in m.capabilities:
            await _send_json(
                resp, 400, {"error": f"registry.ollama.ai/library/{m.name}:latest does not support tools"}
            )
            return
        think = body.get("think")
        if think is not None and not isinstance(think, bool) and think not in _THINK_LEVELS:
            shown = json.dumps(think, ensure_ascii=False)
            await _send_json(
                resp,
                400,
                {
                    "error": f'invalid think value: {shown} (must be "high", "medium", "low", "max", true, or false)'
                },
            )
            return
        if think not in (None, False) and "thinking" not in m.capabilities:
            await _send_json(resp, 400, {"error": f'"{name}" does not support thinking'})
            return
        reply = self.reply
        model = reply.model or name
        calls = [
            {
                **({"id": c.id} if c.id else {}),  # older builds send neither id nor index
                "function": {
                    **({"index": i} if c.id else {}),
                    "name": c.name,
                    "arguments": json.loads(c.arguments),
                },
            }
            for i, c in enumerate(reply.tool_calls)
        ]
        final = {
            "model": model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "length" if reply.finish == "length" else "stop",
            "total_duration": 182242375,
            "load_duration": 41295167,
            "prompt_eval_count": reply.input_tokens,
            "prompt_eval_duration": 24573166,
            "eval_count": reply.output_tokens,
            "eval_duration": 115959084,
        }
        # Thinking is on by default for a model that has it; `think: false` turns it off.
        thoughts = self.thinking_chunks if think is not False and "thinking" in m.capabilities else []
        if body.get("stream", True) is False:
            final["message"] = {
                "role": "assistant",
                "content": reply.text,
                **({"thinking": "".join(thoughts)} if thoughts else {}),
                **({"tool_calls": calls} if calls else {}),
            }
            await _send_json(resp, 200, final)
            return

        def line(message: dict[str, Any]) -> bytes:
            return _ndjson({"model": model, "created_at": _now(), "message": message, "done": False})

        # A mid-stream fault strikes after `after_chunks` content lines; no_terminator after all.
        cut = None if fault is None else fault.after_chunks if fault.kind != "no_terminator" else 1 << 30
        await resp.start_stream(200, content_type="application/x-ndjson")
        for thought in thoughts:
            await resp.write(line({"role": "assistant", "content": "", "thinking": thought}))
        for n, chunk in enumerate(reply.text_chunks):
            if fault is not None and n == cut:
                await self._fail_mid_stream(fault, resp, model)
                return
            if n and reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
            await resp.write(line({"role": "assistant", "content": chunk}))
        if calls:
            await resp.write(line({"role": "assistant", "content": "", "tool_calls": calls}))
        if fault is not None:
            await self._fail_mid_stream(fault, resp, model)
            return
        await resp.write(_ndjson(final))
        await resp.end()

    async def _fail(self, fault: Fault, resp: Response) -> None:
        """Failures before any response byte."""
        if fault.kind == "reset_before_headers":
            resp.abort()
        elif fault.kind == "stall_before_headers":
            await asyncio.sleep(fault.seconds)
            await resp.close()
        else:
            message = fault.message or _DEFAULT_ERRORS.get(fault.status, "internal error")
            await _send_json(resp, fault.status, {"error": message}, headers=fault.headers)

    async def _fail_mid_stream(self, fault: Fault, resp: Response, model: str) -> None:
        """Failures after `after_chunks` content lines (or after all of them)."""
        if fault.kind == "stall_mid_stream":
            await asyncio.sleep(fault.seconds)
            await resp.close()
        elif fault.kind == "disconnect_mid_stream":
            resp.abort()
        elif fault.kind == "malformed":
            await resp.write(f'{{"model":"{model}","created_at":"{_now()}","message":{{"role":\n'.encode())
            await resp.end()
        elif fault.kind == "error_event":
            # Ollama keeps the 200 and reports the failure as one more NDJSON line.
            await resp.write(
                _ndjson({"error": fault.message or "an error was encountered while running the model"})
            )
            await resp.end()
        else:  # no_terminator: every content line went out, then a clean end without `done`
            await resp.end()
