"""A fake Vertex AI on loopback: Gemini and Claude in one project and location.

Every call must carry `Authorization: Bearer <token>` with a token the fake token endpoint
(tests/fakes/google_token.py) issued, else Google's 401 UNAUTHENTICATED. Paths as
PROTOCOLS-CLOUD.md B1/B4 and the recordings give them (vx-text, vx-stream-flex,
vx-claude-*):

  POST /v1beta1/projects/{p}/locations/{l}/publishers/google/models/{m}:streamGenerateContent?alt=sse
       (or :generateContent, or v1): the Gemini API's answer, from FakeGemini.generate
  POST /v1/projects/{p}/locations/{l}/publishers/anthropic/models/{m}:streamRawPredict
       (or :rawPredict): the Messages API body with `anthropic_version: vertex-2023-10-16`
       and no `model`, answered by FakeAnthropic's rendering (its checks and signatures)
  GET  /v1beta1/publishers/google/models: the publisher's model listing

Another project is Google's 403 PERMISSION_DENIED, another location a 404, an unknown
Claude model Anthropic's 404. `reply` and `faults` work as on the other fakes (status faults
answer with Google's error bodies: it is Google's front end that rate-limits and fails).
`VertexStack` bundles it with its token endpoint and key file (`key_file_for(url)`).
"""

from __future__ import annotations

import functools
import re
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.anthropic_checks import validate
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.google_token import FakeGoogleToken, make_key, service_account_key, write_json
from tests.fakes.http import FakeHTTPServer, Request, Response
from tests.fakes.script import Fault, Reply

ANTHROPIC_VERSION = "vertex-2023-10-16"
CLAUDE_MODELS = ["claude-sonnet-4-5@20250929", "claude-haiku-4-5@20251001", "claude-opus-4-1@20250805"]
_PATH = re.compile(
    r"^/(?P<ver>v1|v1beta1)/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
    r"/publishers/(?P<publisher>[^/]+)/models/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)$"
)
_UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other "
    "valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)


class FakeVertex:
    def __init__(
        self, tokens: FakeGoogleToken, *, project: str = "my-project", location: str = "us-central1"
    ) -> None:
        self.tokens = tokens
        self.project = project
        self.location = location
        self.gemini = FakeGemini()  # its generate path and checks; never started itself
        self.claude = FakeAnthropic(models=list(CLAUDE_MODELS))  # its rendering and signatures
        self.faults: list[Fault] = []
        self.claude_bodies: list[dict[str, Any]] = []
        self.server = FakeHTTPServer(self._handle)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def reply(self) -> Reply:
        return self.gemini.reply

    @reply.setter
    def reply(self, value: Reply) -> None:
        self.gemini.reply = value
        self.claude.reply = value

    async def __aenter__(self) -> FakeVertex:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()

    async def _handle(self, req: Request, resp: Response) -> None:
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None and await self.gemini.early_fault(resp, fault):
            return
        if fault is not None and fault.kind == "stall_before_headers":
            fault = None
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not self.tokens.valid(token):
            return await self.gemini.error(resp, 401, _UNAUTHENTICATED)
        if req.method == "GET" and req.path == "/v1beta1/publishers/google/models":
            models = [
                {"name": f"publishers/google/models/{m}", "versionId": "001", "launchStage": "GA"}
                for m in [*self.gemini.models, "imagen-4.0-generate-001"]
            ]
            return await resp.send(
                200, {"publisherModels": models}, content_type="application/json; charset=UTF-8"
            )
        m = _PATH.match(req.path)
        if req.method != "POST" or m is None:
            return await self.gemini.error(resp, 404, "Requested entity was not found.")
        if m["project"] != self.project:
            resource = f"//aiplatform.googleapis.com/projects/{m['project']}/locations/{m['location']}/publishers/{m['publisher']}/models/{m['model']}"
            return await self.gemini.error(
                resp,
                403,
                f"Permission 'aiplatform.endpoints.predict' denied on resource '{resource}' (or it may not exist).",
            )
        if m["location"] != self.location:
            return await self.gemini.error(
                resp,
                404,
                f"Publisher Model `projects/{m['project']}/locations/{m['location']}/publishers/{m['publisher']}/models/{m['model']}` not found.",
            )
        if m["publisher"] == "google" and m["method"] in ("streamGenerateContent", "generateContent"):
            if m["model"] not in self.gemini.models:
                return await self.gemini.error(
                    resp,
                    404,
                    f"Publisher Model `{m['model']}` was not found or your project does not have access to it.",
                )
            stream = m["method"] == "streamGenerateContent"
            return await self.gemini.generate(
                req, resp, m["model"], stream=stream, sse="alt=sse" in req.query, fault=fault
            )
        if (
            m["publisher"] == "anthropic"
            and m["method"] in ("streamRawPredict", "rawPredict")
            and m["ver"] == "v1"
        ):
            return await self._claude(req, resp, m["model"], m["method"] == "streamRawPredict", fault)
        await self.gemini.error(resp, 404, "Requested entity was not found.")

    async def _claude(
        self, req: Request, resp: Response, model: str, stream: bool, fault: Fault | None
    ) -> None:
        body = req.json()
        claude = self.claude
        if not isinstance(body, dict):
            return await claude._error(resp, 400, "body: Input should be an object")
        if body.get("anthropic_version") != ANTHROPIC_VERSION:
            return await claude._error(resp, 400, f"anthropic_version: Input should be '{ANTHROPIC_VERSION}'")
        if "model" in body:
            return await claude._error(resp, 400, "model: Extra inputs are not permitted")
        self.claude_bodies.append(body)
        checked = {k: v for k, v in body.items() if k != "anthropic_version"} | {"model": model}
        problem = validate(checked, claude.signatures)
        if problem:
            return await claude._error(resp, 400, problem)
        if model not in claude.models:
            return await claude._error(resp, 404, f"model: {model}")
        if stream and body.get("stream"):
            return await claude._stream(resp, claude.reply, model, fault)
        await claude._send_doc(resp, claude._whole_message(claude.reply, model), fault)


@functools.cache
def _stack_key() -> rsa.RSAPrivateKey:
    return make_key()  # 2048-bit generation is slow enough to make once per process


_KEY_FILES = tempfile.TemporaryDirectory(prefix="fake-vertex-")


def key_file_for(url: str) -> Path:
    """The service-account key file a VertexStack serving at `url` wrote (its token_uri is
    the stack's token endpoint): what a provider config names as credentials_file."""
    return Path(_KEY_FILES.name) / f"key-{urllib.parse.urlsplit(url).port}.json"


class VertexStack:
    """A FakeVertex with its own JWT-verifying token endpoint and a service account's key
    file, for suites that configure a provider by the fake's URL alone (key_file_for)."""

    def __init__(self) -> None:
        key = _stack_key()
        self.tokens = FakeGoogleToken(key.public_key())
        self.vertex = FakeVertex(self.tokens)
        self._key = key

    @property
    def url(self) -> str:
        return self.vertex.url

    @property
    def server(self) -> FakeHTTPServer:
        return self.vertex.server

    @property
    def requests(self) -> list[Request]:
        return self.vertex.server.requests

    @property
    def faults(self) -> list[Fault]:
        return self.vertex.faults

    @property
    def reply(self) -> Reply:
        return self.vertex.reply

    @reply.setter
    def reply(self, value: Reply) -> None:
        self.vertex.reply = value

    async def __aenter__(self) -> VertexStack:
        await self.tokens.__aenter__()
        await self.vertex.__aenter__()
        write_json(key_file_for(self.url), service_account_key(self._key, self.tokens.url))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.vertex.__aexit__(*exc)
        await self.tokens.__aexit__(*exc)
