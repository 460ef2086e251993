"""A fake Google OAuth2 token endpoint on 127.0.0.1 that checks what it is sent.

`POST /token` (form-encoded), as oauth2.googleapis.com takes it (PROTOCOLS-CLOUD.md B2):
the jwt-bearer grant of a service account, whose assertion must be an RS256 JWT signed by
the key the test made (verified with its public key through `cryptography`), with the
service account as `iss`, this endpoint as `aud`, the cloud-platform scope and a lifetime of
at most an hour; and the refresh-token grant of an authorized user (recording vx-oauth-token).
A good grant gets `{"access_token", "expires_in", "token_type": "Bearer"}`; a bad one the
endpoint's `400 {"error": "invalid_grant", ...}`. Every verified grant is kept (`grants`),
and `valid(token)` tells the fake Vertex AI which bearer tokens this endpoint issued.

`make_key()` and `service_account_key()` give a test its own RSA key and the JSON key file
google-auth loads, with `token_uri` pointing here.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.fakes.http import FakeHTTPServer, Request, Response

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
EMAIL = "model-broker@my-project.iam.gserviceaccount.com"
KEY_ID = "0123456789abcdef0123456789abcdef01234567"
_ids = itertools.count(1)


def make_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def service_account_key(
    key: rsa.RSAPrivateKey, token_uri: str, *, project: str = "my-project", email: str = EMAIL
) -> dict[str, Any]:
    """A service account's JSON key, as the Cloud console downloads it."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {
        "type": "service_account",
        "project_id": project,
        "private_key_id": KEY_ID,
        "private_key": pem.decode(),
        "client_email": email,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "universe_domain": "googleapis.com",
    }


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Grant:
    """One verified grant: its kind, the JWT's header and claims (jwt-bearer), the token given."""

    grant_type: str
    header: dict[str, Any]
    claims: dict[str, Any]
    token: str
    at: float = field(default_factory=time.time)


class FakeGoogleToken:
    def __init__(self, public_key: rsa.RSAPublicKey, *, email: str = EMAIL, expires_in: int = 3599) -> None:
        self.public_key = public_key
        self.email = email
        self.expires_in = expires_in
        # refresh_token -> client_id, for authorized-user credentials.
        self.refresh_tokens: dict[str, str] = {}
        # Statuses to answer instead of a token, first in first out.
        self.failures: list[int] = []
        self.grants: list[Grant] = []
        self.refused: list[str] = []  # why each refused grant was refused
        self.server = FakeHTTPServer(self._handle)

    @property
    def url(self) -> str:
        return f"{self.server.url}/token"

    def valid(self, token: str) -> bool:
        return any(g.token == token for g in self.grants)

    async def __aenter__(self) -> FakeGoogleToken:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()

    async def _handle(self, req: Request, resp: Response) -> None:
        if req.method != "POST" or req.path != "/token":
            return await resp.send(404, {"error": "not_found"})
        if self.failures:
            status = self.failures.pop(0)
            return await resp.send(
                status, {"error": "internal_failure", "error_description": "Backend Error"}
            )
        if not req.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return await self._refuse(resp, "invalid_request", "Bad Request: not a form body")
        form = dict(urllib.parse.parse_qsl(req.body.decode()))
        grant_type = form.get("grant_type", "")
        if grant_type == JWT_BEARER:
            problem, header, claims = self._verify(form.get("assertion", ""))
        elif grant_type == "refresh_token":
            known = self.refresh_tokens.get(form.get("refresh_token", ""))
            problem = (
                None
                if known is not None and known == form.get("client_id")
                else "Bad Request: unknown refresh token"
            )
            header, claims = {}, {}
        else:
            problem, header, claims = f"Invalid grant_type: {grant_type}", {}, {}
        if problem is not None:
            return await self._refuse(resp, "invalid_grant", problem)
        token = f"ya29.fake-{next(_ids)}-{secrets.token_urlsafe(24)}"
        self.grants.append(Grant(grant_type, header, claims, token))
        doc = {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        await resp.send(200, json.dumps(doc), content_type="application/json; charset=utf-8")

    async def _refuse(self, resp: Response, error: str, description: str) -> None:
        self.refused.append(description)
        await resp.send(
            400,
            {"error": error, "error_description": description},
            content_type="application/json; charset=utf-8",
        )

    def _verify(self, assertion: str) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
        """The assertion's problem (None: a good grant), header and claims."""
        pieces = assertion.split(".")
        if len(pieces) != 3:
            return "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe", {}, {}
        try:
            header, claims = json.loads(_b64url(pieces[0])), json.loads(_b64url(pieces[1]))
            signature = _b64url(pieces[2])
        except ValueError:
            return "Invalid JWT: not base64url JSON", {}, {}
        if header.get("alg") != "RS256" or header.get("typ") != "JWT":
            return f"Invalid JWT header: {header}", header, claims
        try:
            self.public_key.verify(
                signature, f"{pieces[0]}.{pieces[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            return "Invalid JWT Signature.", header, claims
        now = time.time()
        if claims.get("iss") != self.email:
            return f"Invalid JWT: iss {claims.get('iss')!r} is not the service account", header, claims
        if claims.get("aud") != GOOGLE_TOKEN_URI:
            # Google's audience whatever the key's token_uri says (google-auth sends it so).
            return f"Invalid JWT: aud {claims.get('aud')!r} is not {GOOGLE_TOKEN_URI}", header, claims
        if SCOPE not in str(claims.get("scope", "")).split():
            return "Invalid JWT: the cloud-platform scope is missing", header, claims
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int) or not 0 < exp - iat <= 3600:
            return "Invalid JWT: Token must be a short-lived token (60 minutes)", header, claims
        if not iat - 300 <= now <= exp:
            return (
                "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe",
                header,
                claims,
            )
        return None, header, claims
