"""AWS Signature Version 4 for the Bedrock provider: botocore's credential chain and signer.

Owns where AWS credentials come from and how a request is signed; nothing here does HTTP.

- Credentials: botocore's default chain, as the AWS CLI and SDKs resolve it: the environment
  (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN), AWS_PROFILE and the shared
  files (~/.aws/credentials, ~/.aws/config: static keys, assume-role, SSO, credential_process),
  web identity (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN: EKS IRSA), the ECS/EKS container
  endpoint, and last the EC2 instance metadata service.
- Off the event loop: resolving the chain and refreshing temporary credentials can read files
  and call STS or a metadata endpoint, so both run in a thread (asyncio.to_thread). The frozen
  credentials are kept; inside botocore's advisory window (15 minutes before expiry) one
  background refresh starts while requests go on signing with the current ones, and only
  inside the mandatory window (10 minutes) does a request wait for the refresh.
- Signing: botocore's `SigV4Auth` (`_SigV4At` only fixes the request time, so the signer the
  daemon uses is the one tests/test_sigv4.py runs against AWS's published test vectors and
  the one the fake Bedrock endpoint verifies with). The URL signed must be the URL sent byte
  for byte (the path as aiohttp will put it on the wire: see BedrockProvider._url).
- Secrets: no credential ever reaches a log line or an error message; errors name the chain's
  sources and botocore's own explanation (which carries no secret), redacted anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import botocore.exceptions
import botocore.session
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials

from broker import errors
from broker.redact import register_secret

# botocore's windows (botocore/credentials.py _DEFAULT_*_REFRESH_TIMEOUT): inside the advisory
# one a refresh is started; inside the mandatory one a request waits for it.
ADVISORY_REFRESH_SECONDS = 15 * 60
MANDATORY_REFRESH_SECONDS = 10 * 60
SERVICE = "bedrock"  # the signing name of both bedrock-runtime and the control plane

_SOURCES = (
    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), AWS_PROFILE and ~/.aws/credentials "
    "or ~/.aws/config, AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN (EKS), the container credentials "
    "endpoint, the EC2 instance role"
)


class _SigV4At(SigV4Auth):
    """botocore's SigV4Auth at a given time (add_auth's own steps, with its timestamp fixed)."""

    def __init__(self, credentials: ReadOnlyCredentials, service: str, region: str, timestamp: str) -> None:
        super().__init__(credentials, service, region)
        self._timestamp = timestamp

    def add_auth(self, request: AWSRequest) -> None:
        # botocore's add_auth step by step (its private helpers inlined), its clock replaced.
        request.context["timestamp"] = self._timestamp
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
            if name in request.headers:
                del request.headers[name]
        request.headers["X-Amz-Date"] = self._timestamp
        if self.credentials.token:
            request.headers["X-Amz-Security-Token"] = self.credentials.token
        canonical = self.canonical_request(request)
        signature = self.signature(self.string_to_sign(request, canonical), request)
        signed = self.signed_headers(self.headers_to_sign(request))
        request.headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.scope(request)}, SignedHeaders={signed}, Signature={signature}"
        )


def timestamp(now: datetime.datetime | None = None) -> str:
    """X-Amz-Date's form of `now` (UTC; default: the current time)."""
    now = now or datetime.datetime.now(datetime.UTC)
    return now.astimezone(datetime.UTC).strftime(SIGV4_TIMESTAMP)


def sign(
    credentials: ReadOnlyCredentials,
    *,
    method: str,
    url: str,
    body: bytes | None,
    headers: Mapping[str, str],
    region: str,
    service: str = SERVICE,
    at: str | None = None,
) -> dict[str, str]:
    """The headers that sign this request: Authorization, X-Amz-Date and, with temporary
    credentials, X-Amz-Security-Token. `headers` are the ones to sign besides Host (which
    botocore takes from the URL, port included when not the scheme's default).

    The path is signed as given (AWS encodes the received path once more); the query is
    signed by its decoded pairs, which botocore encodes as SigV4 wants whatever quoting the
    HTTP client put on the wire (yarl leaves a '/' or ':' in a value unencoded)."""
    base, _, query = url.partition("?")
    # A list of pairs (botocore iterates params; a mapping would lose a repeated key).
    params: Any = query_pairs(query)
    request = AWSRequest(method=method, url=base, data=body or b"", headers=dict(headers), params=params)
    _SigV4At(credentials, service, region, at or timestamp()).add_auth(request)
    out = {"authorization": request.headers["Authorization"], "x-amz-date": request.headers["X-Amz-Date"]}
    token = request.headers.get("X-Amz-Security-Token")
    if token:
        out["x-amz-security-token"] = token
    return out


def query_pairs(query: str) -> list[tuple[str, str]]:
    """A raw query string's (key, value) pairs, percent-decoded ('+' is a plus, not a space)."""
    pairs = []
    for item in query.split("&") if query else ():
        key, _, value = item.partition("=")
        pairs.append((unquote(key), unquote(value)))
    return pairs


class CredentialChain:
    """One provider's AWS credentials, resolved and refreshed off the event loop."""

    def __init__(self, *, name: str, session: botocore.session.Session | None = None) -> None:
        self.name = name
        # A botocore Session reads AWS_PROFILE, AWS_CONFIG_FILE and the rest when it resolves.
        self._session = session or botocore.session.Session()
        self._source: Credentials | None = None
        self._frozen: ReadOnlyCredentials | None = None
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    @property
    def method(self) -> str:
        """Where the credentials came from (botocore's name: env, shared-credentials-file, ...)."""
        return str(getattr(self._source, "method", "") or "")

    async def get(self) -> ReadOnlyCredentials:
        """Credentials to sign one request with (never stale past the mandatory window)."""
        frozen = self._frozen
        if frozen is not None and not self._refresh_needed(MANDATORY_REFRESH_SECONDS):
            if self._refresh_needed(ADVISORY_REFRESH_SECONDS) and self._background is None:
                self._background = asyncio.create_task(
                    self._advisory_refresh(), name=f"{self.name}-aws-refresh"
                )
            return frozen
        async with self._lock:
            if self._frozen is None or self._refresh_needed(MANDATORY_REFRESH_SECONDS):
                self._frozen = await asyncio.to_thread(self._resolve)
            return self._frozen

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError, errors.BrokerError):
                await self._background
            self._background = None

    def _refresh_needed(self, within: int) -> bool:
        source = self._source
        return isinstance(source, RefreshableCredentials) and source.refresh_needed(within)

    async def _advisory_refresh(self) -> None:
        try:
            async with self._lock:
                self._frozen = await asyncio.to_thread(self._resolve)
        except errors.BrokerError:
            pass  # the current credentials stay valid until the mandatory window; retried then
        finally:
            self._background = None

    def _resolve(self) -> ReadOnlyCredentials:
        """In a thread: the chain (first time) and fresh frozen credentials."""
        try:
            if self._source is None:
                self._source = self._session.get_credentials()
            if self._source is None:
                raise errors.UpstreamAuthFailed(
                    f"{self.name}: no AWS credentials found; the chain looked at {_SOURCES}",
                    provider=self.name,
                )
            frozen = self._source.get_frozen_credentials()
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.UpstreamAuthFailed(
                f"{self.name}: AWS credentials could not be loaded ({type(exc).__name__}: {exc}); "
                f"the chain looks at {_SOURCES}",
                provider=self.name,
            ) from None
        if not frozen.access_key or not frozen.secret_key:
            raise errors.UpstreamAuthFailed(
                f"{self.name}: the AWS credentials found ({self.method or 'unknown source'}) have no "
                "access key or secret key",
                provider=self.name,
            )
        # Every value is a secret wherever it could be echoed (an upstream error, a log line).
        register_secret(frozen.secret_key)
        if frozen.token:
            register_secret(frozen.token)
        return frozen
