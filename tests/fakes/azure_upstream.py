"""A fake Azure OpenAI resource on loopback: both routes, Azure's dialect of the OpenAI stream.

As the recordings show it (PROTOCOLS-CLOUD.md D, rec az-stream, az-tool-stream,
az-400-content-filter, az-400-unknown-model-v1): `api-key` (or an Entra ID bearer token)
checked; the deployments route `/openai/deployments/{name}/chat/completions` demands an
`api-version` and ignores the body's model; the `/openai/v1/` route takes the deployment name
as the model and no api-version. Streams open with the chunk that carries only
`prompt_filter_results` (empty id and model, `"choices": []`), every later chunk carries
`content_filter_results`; `filtered` ("self_harm" say) ends the answer with finish_reason
content_filter; `prompt_blocked` answers the 400 content_filter error with its innererror.
"""

from __future__ import annotations

from typing import Any

from tests.fakes.http import FakeHTTPServer, Request, Response, sse
from tests.fakes.script import Fault, Reply

API_KEY = "0123456789abcdef0123456789abcdef"
_SAFE = {"filtered": False, "severity": "safe"}
_CATEGORIES = ("hate", "self_harm", "sexual", "violence")
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "content_filter": "content_filter"}


def verdicts(filtered: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {c: dict(_SAFE) for c in _CATEGORIES}
    if filtered:
        out[filtered] = {"filtered": True, "severity": "medium"}
    return out


class FakeAzureOpenAI:
    def __init__(
        self, *, api_key: str = API_KEY, token: str | None = None, deployments: dict[str, str] | None = None
    ) -> None:
        self.api_key, self.token = api_key, token
        self.deployments = dict(deployments or {"gpt-4o-prod": "gpt-4o", "mini": "gpt-4o-mini"})
        self.reply = Reply()
        self.faults: list[Fault] = []
        self.filtered: str | None = None  # a category that cuts the answer (finish content_filter)
        self.prompt_blocked: str | None = None  # a category that blocks the prompt (400)
        self.server = FakeHTTPServer(self._handle)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    @property
    def chat_bodies(self) -> list[Any]:
        return [r.json() for r in self.requests if r.path.endswith("/chat/completions")]

    async def __aenter__(self) -> FakeAzureOpenAI:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()

    async def _error(
        self, resp: Response, status: int, error: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        await resp.send(status, {"error": error}, headers=headers)

    async def _handle(self, req: Request, resp: Response) -> None:
        bearer = req.headers.get("authorization", "")
        if req.headers.get("api-key") != self.api_key and not (
            self.token and bearer == f"Bearer {self.token}"
        ):
            return await self._error(
                resp,
                401,
                {
                    "code": "401",
                    "message": "Access denied due to invalid subscription key or wrong API endpoint.",
                },
            )
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None and fault.kind == "status":
            err = {"code": fault.error_type or str(fault.status), "message": fault.message or "error"}
            return await self._error(resp, fault.status, err, fault.headers)
        params = dict(p.split("=", 1) for p in req.query.split("&") if "=" in p)
        parts = req.path.strip("/").split("/")
        if req.method == "GET" and req.path in ("/openai/models", "/openai/v1/models"):
            if req.path == "/openai/models" and "api-version" not in params:
                return await self._error(resp, 404, {"code": "404", "message": "Resource not found"})
            return await resp.send(
                200, {"data": [{"id": m, "object": "model"} for m in set(self.deployments.values())]}
            )
        if req.method != "POST" or not req.path.endswith("/chat/completions"):
            return await self._error(resp, 404, {"code": "404", "message": "Resource not found"})
        body = req.json() or {}
        if parts[:2] == ["openai", "deployments"] and len(parts) == 5:
            if "api-version" not in params:
                return await self._error(resp, 404, {"code": "404", "message": "Resource not found"})
            deployment = parts[2]
            if deployment not in self.deployments:
                message = "The API deployment for this resource does not exist."
                return await self._error(resp, 404, {"code": "DeploymentNotFound", "message": message})
        elif parts[:2] == ["openai", "v1"]:
            deployment = str(body.get("model", ""))
            if deployment not in self.deployments:
                msg = f"Unknown model: {deployment}"
                return await self._error(resp, 400, {"code": "unknown_model", "message": msg, "details": msg})
        else:
            return await self._error(resp, 404, {"code": "404", "message": "Resource not found"})
        if self.prompt_blocked:
            return await self._error(
                resp,
                400,
                {
                    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
                    "management policy. Please modify your prompt and retry.",
                    "type": None,
                    "param": "prompt",
                    "code": "content_filter",
                    "status": 400,
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": {
                            **verdicts(self.prompt_blocked),
                            "jailbreak": {"filtered": False, "detected": False},
                        },
                    },
                },
            )
        await self._stream(resp, body, self.deployments[deployment], fault)

    def _chunk(self, model: str, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        doc = {
            "choices": choices,
            "created": 1741880483,
            "id": "chatcmpl-az1",
            "model": model,
            "object": "chat.completion.chunk",
            "system_fingerprint": "fp_az",
            **extra,
        }
        return sse(doc)

    async def _stream(self, resp: Response, body: dict[str, Any], model: str, fault: Fault | None) -> None:
        r = self.reply
        await resp.start_stream(
            200,
            content_type="text/event-stream; charset=utf-8",
            headers={"apim-request-id": "fake", "x-ms-region": "East US"},
        )
        prompt = {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": verdicts()}],
        }
        await resp.write(sse(prompt))
        await resp.write(
            self._chunk(
                model,
                [
                    {
                        "content_filter_results": {},
                        "delta": {"content": "", "refusal": None, "role": "assistant"},
                        "finish_reason": None,
                        "index": 0,
                        "logprobs": None,
                    }
                ],
            )
        )
        for i, text in enumerate(r.text_chunks):
            if fault is not None and fault.kind == "error_event" and i == fault.after_chunks:
                await resp.write(
                    sse(
                        {
                            "error": {
                                "code": "server_error",
                                "message": fault.message or "The server had an error",
                            }
                        }
                    )
                )
                return await resp.end()
            if self.filtered and i == len(r.text_chunks) - 1:
                break  # the filter cuts the answer before its last piece
            choice = {
                "content_filter_results": verdicts(),
                "delta": {"content": text},
                "finish_reason": None,
                "index": 0,
                "logprobs": None,
            }
            await resp.write(self._chunk(model, [choice]))
        for k, call in enumerate(r.tool_calls):
            first = {
                "index": k,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            await resp.write(
                self._chunk(
                    model,
                    [
                        {
                            "content_filter_results": {},
                            "delta": {"tool_calls": [first]},
                            "finish_reason": None,
                            "index": 0,
                            "logprobs": None,
                        }
                    ],
                )
            )
            for fragment in call.argument_chunks:
                piece = {"index": k, "function": {"arguments": fragment}}
                await resp.write(
                    self._chunk(
                        model,
                        [
                            {
                                "content_filter_results": {},
                                "delta": {"tool_calls": [piece]},
                                "finish_reason": None,
                                "index": 0,
                                "logprobs": None,
                            }
                        ],
                    )
                )
        finish = "content_filter" if self.filtered else _FINISH.get(r.finish, "stop")
        verdict = verdicts(self.filtered) if self.filtered else {}
        await resp.write(
            self._chunk(
                model,
                [
                    {
                        "content_filter_results": verdict,
                        "delta": {},
                        "finish_reason": finish,
                        "index": 0,
                        "logprobs": None,
                    }
                ],
            )
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": r.input_tokens,
                "completion_tokens": r.output_tokens,
                "total_tokens": r.input_tokens + r.output_tokens,
            }
            await resp.write(self._chunk(model, [], usage=usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.end()
