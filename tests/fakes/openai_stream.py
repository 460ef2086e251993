"""How the fake OpenAI server (tests/fakes/openai_upstream.py) writes one chat answer, byte for byte.

`Streamer` writes a streamed answer in the dialect of the server the fake plays
(`FakeOpenAI.vendor`), each as its recording shows it (shared/recordings, SOURCES.md):

  openai      (oa-gpt5-stream) a role chunk `{"role":"assistant","content":"","refusal":null}`,
              reasoning deltas `{"reasoning": ...}` or `{"reasoning_content": ...}` (vLLM,
              llama.cpp: api.openai.com itself sends none), `{"refusal": ...}` fragments,
              content and tool-call chunks, a finish chunk with an empty delta, the usage
              chunk with `"choices":[]` and completion_tokens_details.reasoning_tokens; every
              chunk with `obfuscation`;
  groq        (oa-groq-reasoning) `{"reasoning": ..., "channel": "analysis"}`, no obfuscation,
              usage on the finish chunk and again in `x_groq.usage`, no separate usage chunk;
  openrouter  (oa-openrouter-reasoning) `: OPENROUTER PROCESSING` comments, every delta with
              `reasoning` (null or text) and `reasoning_details` (the text, then a signature
              entry), `native_finish_reason`, a usage chunk with one empty choice and `cost`.

Then `data: [DONE]`. `completion_body` is the `stream: false` answer. Mid-stream faults
strike after `Fault.after_chunks` content deltas, as before.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING, Any

from tests.fakes.http import Response, sse
from tests.fakes.openai_errors import error_body
from tests.fakes.script import Fault, Reply

if TYPE_CHECKING:
    from tests.fakes.openai_upstream import FakeOpenAI

MID_STREAM = ("stall_mid_stream", "disconnect_mid_stream", "malformed", "error_event")
OPENROUTER_PROCESSING = b": OPENROUTER PROCESSING\n\n"
# The signature OpenRouter relays for an Anthropic model's thinking (oa-openrouter-reasoning).
OPENROUTER_SIGNATURE = "Et0BCkgIChACGAIqQA2s7h7tA7IG35fbwVkou9PM2hANVJNUwcEM4q12fTRDK6y3v6YoEvJ+7bko8wnW"
_FORMAT = "anthropic-claude-v1"


class Streamer:
    """Writes one streamed answer, with a mid-stream fault where the script asks for it."""

    def __init__(
        self, body: dict[str, Any], reply: Reply, resp: Response, fault: Fault | None, *, fake: FakeOpenAI
    ) -> None:
        opts = body.get("stream_options") or {}
        self.fake = fake
        self.vendor = fake.vendor
        # Groq reports usage on the finish chunk whatever stream_options say (its recording
        # asks for none); the others only with include_usage.
        asked = bool(opts.get("include_usage")) or self.vendor == "groq"
        self.include_usage = asked and fake.send_usage
        self.obfuscate = self.vendor == "openai" and opts.get("include_obfuscation", True) is not False
        self.reply = reply
        self.resp = resp
        self.fault = fault if fault is not None and fault.kind in (*MID_STREAM, "no_terminator") else None
        model = reply.model or body["model"]
        created = int(time.time())
        self.base: dict[str, Any]
        if self.vendor == "openrouter":
            self.base = {
                "id": f"gen-{created}-{secrets.token_urlsafe(15)}",
                "provider": "Google",
                "model": model,
                "object": "chat.completion.chunk",
                "created": created,
            }
        elif self.vendor == "groq":
            self.base = {
                "id": f"chatcmpl-{secrets.token_hex(16)}",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_c82faf3ca0",
            }
        else:
            self.base = {
                "id": f"chatcmpl-{secrets.token_hex(12)}",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake0openai",
            }

    # --- one chunk --------------------------------------------------------------------------

    def chunk(
        self, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None, **extra: Any
    ) -> bytes:
        obj: dict[str, Any] = dict(self.base)
        if delta is None:
            obj["choices"] = []
        elif self.vendor == "openrouter":
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "native_finish_reason": finish}
            obj["choices"] = [{**choice, "logprobs": None}]
        else:
            obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        obj.update(extra)
        if self.vendor == "openai" and self.include_usage:
            obj["usage"] = usage  # null on every chunk but the usage chunk
        elif usage is not None:
            obj["usage"] = usage
        if self.obfuscate:
            obj["obfuscation"] = secrets.token_urlsafe(6)
        return sse(obj)

    def delta(self, **fields: Any) -> dict[str, Any]:
        """A delta as the vendor writes it (OpenRouter repeats role, content and reasoning)."""
        if self.vendor != "openrouter":
            return fields
        out: dict[str, Any] = {"role": "assistant", "content": fields.pop("content", None) or ""}
        out["reasoning"] = fields.pop("reasoning", None)
        out["reasoning_details"] = fields.pop("reasoning_details", [])
        return {**out, **fields}

    def reasoning_delta(self, text: str) -> dict[str, Any]:
        fake = self.fake
        if self.vendor == "groq":
            return {"reasoning": text, "channel": "analysis"}
        if self.vendor == "openrouter":
            detail = {"type": "reasoning.text", "text": text, "format": _FORMAT, "index": 0}
            return self.delta(reasoning=text, reasoning_details=[detail])
        return {fake.reasoning_field: text}

    def content_deltas(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [self.delta(content=c) for c in self.reply.text_chunks]
        for i, call in enumerate(self.reply.tool_calls):
            first = {
                "index": i,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            deltas.append(self.delta(tool_calls=[first]))
            deltas += [
                self.delta(tool_calls=[{"index": i, "function": {"arguments": a}}])
                for a in call.argument_chunks
            ]
        return deltas

    def usage(self) -> dict[str, Any]:
        r, fake = self.reply, self.fake
        total = r.input_tokens + r.output_tokens
        if self.vendor == "groq":
            return {
                "queue_time": 0.005626991,
                "prompt_tokens": r.input_tokens,
                "prompt_time": 0.017648485,
                "completion_tokens": r.output_tokens,
                "completion_time": 0.125333784,
                "total_tokens": total,
                "total_time": 0.142982269,
                "completion_tokens_details": {"reasoning_tokens": fake.reasoning_tokens},
            }
        prompt_details: dict[str, Any] = {"cached_tokens": r.cached_input_tokens, "audio_tokens": 0}
        if self.vendor == "openrouter":
            return {
                "prompt_tokens": r.input_tokens,
                "completion_tokens": r.output_tokens,
                "total_tokens": total,
                "cost": 0.000669,
                "is_byok": False,
                "prompt_tokens_details": {**prompt_details, "video_tokens": 0},
                "cost_details": {
                    "upstream_inference_cost": None,
                    "upstream_inference_prompt_cost": 0.000129,
                    "upstream_inference_completions_cost": 0.00054,
                },
                "completion_tokens_details": {"reasoning_tokens": fake.reasoning_tokens, "image_tokens": 0},
            }
        if fake.cache_write_tokens is not None:
            prompt_details["cache_write_tokens"] = fake.cache_write_tokens
        return {
            "prompt_tokens": r.input_tokens,
            "completion_tokens": r.output_tokens,
            "total_tokens": total,
            "prompt_tokens_details": prompt_details,
            "completion_tokens_details": {
                "reasoning_tokens": fake.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    # --- the answer -------------------------------------------------------------------------

    async def run(self, headers: dict[str, str]) -> None:
        r, resp, fake = self.reply, self.resp, self.fake
        await resp.start_stream(200, headers={**headers, "openai-processing-ms": "112"})
        if self.vendor == "openrouter":
            await resp.write(OPENROUTER_PROCESSING + OPENROUTER_PROCESSING)
            await resp.write(self.chunk(self.delta()))
        elif self.vendor == "groq":
            groq = {"id": f"req_{secrets.token_hex(13)}", "seed": 1734142537}
            await resp.write(self.chunk({"role": "assistant", "content": ""}, x_groq=groq))
        else:
            await resp.write(self.chunk({"role": "assistant", "content": "", "refusal": None}))
        for text in fake.reasoning_chunks:
            await resp.write(self.chunk(self.reasoning_delta(text)))
            if fake.reasoning_delay:
                await asyncio.sleep(fake.reasoning_delay)
        if fake.reasoning_chunks and self.vendor == "openrouter":
            # The signature comes in a details entry of its own, with reasoning null.
            sig = {"type": "reasoning.text", "signature": OPENROUTER_SIGNATURE, "format": _FORMAT, "index": 0}
            await resp.write(self.chunk(self.delta(reasoning_details=[sig])))
        for piece in fake.refusal_chunks:
            await resp.write(self.chunk(self.delta(refusal=piece)))
        deltas = self.content_deltas()
        for n, delta in enumerate(deltas):
            if n == self._fault_at(len(deltas)) and not await self._fault():
                return
            await self._pause()
            await resp.write(self.chunk(delta))
        if self._fault_at(len(deltas)) == len(deltas) and not await self._fault():
            return
        await self._pause()
        if fake.send_finish_reason:
            if self.vendor == "groq" and self.include_usage:
                usage = self.usage()
                x_groq = {"id": f"req_{secrets.token_hex(13)}", "usage": usage}
                await resp.write(self.chunk({}, finish=r.finish, x_groq=x_groq, usage=usage))
            else:
                await resp.write(self.chunk(self.delta(), finish=r.finish))
        if self.include_usage and self.vendor == "openrouter":
            await resp.write(self.chunk({"role": "assistant", "content": ""}, usage=self.usage()))
        elif self.include_usage and self.vendor == "openai":
            await resp.write(self.chunk(None, usage=self.usage()))
        if self.fault is None or self.fault.kind != "no_terminator":
            await resp.write(sse("[DONE]"))
        await resp.end()

    def _fault_at(self, total: int) -> int:
        if self.fault is None or self.fault.kind == "no_terminator":
            return -1
        return min(max(self.fault.after_chunks, 0), total)

    async def _pause(self) -> None:
        if self.reply.chunk_delay:
            await asyncio.sleep(self.reply.chunk_delay)

    async def _fault(self) -> bool:
        """Act out the mid-stream fault; True when the stream goes on afterwards."""
        assert self.fault is not None
        f, resp = self.fault, self.resp
        if f.kind == "stall_mid_stream":
            await asyncio.sleep(f.seconds)
            return True
        if f.kind == "disconnect_mid_stream":
            resp.abort()
        elif f.kind == "malformed":
            await resp.write(
                b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","choices":[{"index"\n\n'
            )
            await resp.end()
        elif f.kind == "error_event":
            # The newer vLLM shape carries the HTTP status as an int `code`; OpenAI's own
            # mid-stream errors have the same envelope.
            err = error_body(f.status, f.message, f.error_type)["error"]
            err["code"] = f.status
            await resp.write(sse({"error": err}))
            await resp.write(sse("[DONE]"))
            await resp.end()
        return False


def completion_body(body: dict[str, Any], r: Reply, fake: FakeOpenAI) -> dict[str, Any]:
    """The `stream: false` answer: message.content (null on a refusal), message.refusal, and
    the compatible servers' reasoning field when the script thinks."""
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in r.tool_calls
    ]
    refusal = "".join(fake.refusal_chunks) or None
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if refusal else r.text or None,
        "refusal": refusal,
        "annotations": [],
    }
    if fake.reasoning_chunks:
        message[fake.reasoning_field] = "".join(fake.reasoning_chunks)
    if calls:
        message["tool_calls"] = calls
    prompt_details: dict[str, Any] = {"cached_tokens": r.cached_input_tokens, "audio_tokens": 0}
    if fake.cache_write_tokens is not None:
        prompt_details["cache_write_tokens"] = fake.cache_write_tokens
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": r.model or body["model"],
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": r.finish}],
        "usage": {
            "prompt_tokens": r.input_tokens,
            "completion_tokens": r.output_tokens,
            "total_tokens": r.input_tokens + r.output_tokens,
            "prompt_tokens_details": prompt_details,
            "completion_tokens_details": {
                "reasoning_tokens": fake.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_fake0openai",
    }
