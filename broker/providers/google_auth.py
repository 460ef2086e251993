"""OAuth2 access tokens for Google Cloud (Vertex AI), through google-auth.

Where the credentials come from: a JSON key file named in config (`credentials_file`: a
service account's key, or any other file google-auth loads: an authorized user's ADC file,
a workload identity federation config), else Application Default Credentials
(`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's ADC file, the GCE/GKE metadata server, workload
identity) as `google.auth.default()` finds them. google-auth does the protocol: the
service account's RS256-signed JWT assertion posted to the key's `token_uri` (jwt-bearer
grant), the refresh-token grant, the metadata server, and retries of the token endpoint.
The token endpoint is the key file's `token_uri`: a test points it at a fake on loopback.

What this module adds: one cached token per provider, refreshed before it expires and off
the event loop. A token with more than FRESH_SECONDS left is used as it is; with less (but
more than MIN_SECONDS) it is still used while one refresh runs in the background; only
without a usable token does a request wait, for one refresh shared by every waiter. Each
refresh runs in a worker thread (`asyncio.to_thread`): signing and the blocking HTTP call of
google-auth's transport never stall the loop. google-auth's own threshold (refresh 3m45s
before expiry) is inside FRESH_SECONDS, so a token is never used in its last minute.

The token goes into the Authorization header of the upstream request only: it is never
logged, and no error message carries it (google-auth's errors quote the token endpoint's
error body, which holds none). Failures map to the broker's errors: bad or revoked
credentials -> UpstreamAuthFailed (FAILED_PRECONDITION, the operator's to fix), an
unreachable or failing token endpoint -> UpstreamUnavailable (retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import ssl
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google.auth
import google.auth.credentials
import google.auth.exceptions
import structlog
import urllib3
from google.auth.transport import urllib3 as google_urllib3
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from broker import errors
from broker.config import ConfigError
from broker.providers.transport import env_proxy
from broker.redact import register_secret

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
# A token with more than this many seconds left is used without a refresh.
FRESH_SECONDS = 300.0
# Less than this left: a request waits for the new token rather than use one about to expire.
MIN_SECONDS = 60.0
# Where google-auth sends a service account's grant when its key names no token_uri.
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
# The token endpoint's answer is small; it must not hold a refresh for long.
_TOKEN_READ_SECONDS = 30.0

log = structlog.get_logger("broker.providers.google_auth")


class GoogleCredentials:
    """One provider's Google credentials and its cached access token."""

    def __init__(
        self,
        *,
        provider: str,
        credentials_file: Path | None,
        proxy: str | None = None,
        ca_file: Path | None = None,
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.provider = provider
        self.credentials_file = credentials_file
        self._clock = clock
        self._creds: google.auth.credentials.Credentials | None = None
        # The project the credentials belong to (a key's project_id, ADC's), when known.
        self.project_id: str | None = None
        if credentials_file is not None:
            self._creds, self.project_id = _load_file(provider, credentials_file)
        self._token = ""
        self._expiry = 0.0  # wall-clock seconds
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self._pool = _http(proxy, ca_file, connect_timeout, self.token_uri)
        self._request = google_urllib3.Request(self._pool)  # type: ignore[no-untyped-call]
        # Refreshes done (for tests and the log line): each one is one token endpoint round trip.
        self.refreshes = 0

    @property
    def token_uri(self) -> str:
        return str(getattr(self._creds, "_token_uri", "") or DEFAULT_TOKEN_URI)

    @property
    def source(self) -> str:
        """What the credentials are, for messages: never a secret."""
        email = getattr(self._creds, "service_account_email", None)
        who = f"service account {email}" if isinstance(email, str) and "@" in email else ""
        if self.credentials_file is not None:
            return f"{who or 'credentials'} from {self.credentials_file}"
        return f"Application Default Credentials ({who})" if who else "Application Default Credentials"

    async def headers(self) -> dict[str, str]:
        """The request headers that carry the token (and the quota project, when the
        credentials name one), refreshing the token first when it must be."""
        headers = {"authorization": f"Bearer {await self.token()}"}
        quota = getattr(self._creds, "quota_project_id", None)
        if isinstance(quota, str) and quota:
            headers["x-goog-user-project"] = quota
        return headers

    async def token(self) -> str:
        left = self._expiry - self._clock()
        if self._token and left > FRESH_SECONDS:
            return self._token
        if self._token and left > MIN_SECONDS:
            self._refresh_in_background()
            return self._token
        await self._refresh()
        return self._token

    async def wait_refreshed(self) -> None:
        """Wait for a background refresh, if one runs (tests; shutdown)."""
        task = self._background
        if task is not None:
            with contextlib.suppress(errors.BrokerError):
                await task

    async def close(self) -> None:
        """Stop a background refresh and close the token endpoint's pooled connections."""
        task = self._background
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, errors.BrokerError):
                await task
        async with self._lock:  # not while a refresh uses the pool
            self._pool.clear()

    def _refresh_in_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(
                self._quiet_refresh(), name=f"{self.provider}-token-refresh"
            )

    async def _quiet_refresh(self) -> None:
        try:
            await self._refresh()
        except errors.BrokerError as exc:
            # The current token still works for a while; the next request tries again.
            log.warning("token_refresh_failed", provider=self.provider, error=exc.message)

    async def _refresh(self) -> None:
        stale = self._expiry
        async with self._lock:
            if self._token and self._expiry != stale and self._expiry - self._clock() > MIN_SECONDS:
                return  # another waiter refreshed while this one queued
            token, expiry = await asyncio.to_thread(self._refresh_sync)
            self._token, self._expiry = token, expiry
            self.refreshes += 1
        log.debug(
            "token_refreshed",
            provider=self.provider,
            source=self.source,
            expires_in=round(expiry - self._clock()),
        )

    def _refresh_sync(self) -> tuple[str, float]:
        """In a worker thread: find ADC on first use, then one token endpoint round trip."""
        try:
            if self._creds is None:
                creds, project = google.auth.default(scopes=SCOPES, request=self._request)
                self._creds, self.project_id = creds, self.project_id or project
            self._creds.refresh(self._request)  # type: ignore[no-untyped-call]
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise errors.UpstreamAuthFailed(
                f"{self.provider}: no Google credentials: set credentials_file to a service account's "
                f"JSON key, or GOOGLE_APPLICATION_CREDENTIALS, or run where ADC exist ({_reason(exc)})",
                provider=self.provider,
            ) from None
        except google.auth.exceptions.RefreshError as exc:
            kind = (
                errors.UpstreamUnavailable if getattr(exc, "retryable", False) else errors.UpstreamAuthFailed
            )
            raise kind(
                f"{self.provider}: the token endpoint refused the {self.source}: {_reason(exc)}",
                provider=self.provider,
            ) from None
        except google.auth.exceptions.TransportError as exc:
            raise errors.UpstreamUnavailable(
                f"{self.provider}: cannot reach the token endpoint {self.token_uri}: {_reason(exc)}",
                provider=self.provider,
            ) from None
        token = self._creds.token
        if not isinstance(token, str) or not token:
            raise errors.UpstreamAuthFailed(
                f"{self.provider}: the token endpoint answered without an access token",
                provider=self.provider,
            )
        return token, _timestamp(self._creds.expiry, self._clock)


def _load_file(provider: str, path: Path) -> tuple[google.auth.credentials.Credentials, str | None]:
    """The key file's credentials (read once, when the provider is made). Service accounts
    and authorized users by their own loaders; other kinds (workload identity federation)
    through google-auth's generic one, whose warning about untrusted files is for files a
    program did not choose: this one is the operator's config."""
    try:
        info = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(
            [f"providers: {provider}: credentials_file: cannot read {path}: {exc.strerror}"]
        ) from None
    except ValueError:
        raise ConfigError(
            [f"providers: {provider}: credentials_file: {path} is not a JSON key file"]
        ) from None
    kind = info.get("type") if isinstance(info, dict) else None
    try:
        if kind == "service_account":
            loader = service_account.Credentials.from_service_account_info
            creds: google.auth.credentials.Credentials = loader(info, scopes=SCOPES)  # type: ignore[no-untyped-call]
            project = info.get("project_id")
        elif kind == "authorized_user":
            creds = user_credentials.Credentials.from_authorized_user_info(info, scopes=SCOPES)  # type: ignore[no-untyped-call]
            project = info.get("quota_project_id")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                creds, project = google.auth.load_credentials_from_file(str(path), scopes=SCOPES)  # type: ignore[no-untyped-call]
    except (google.auth.exceptions.DefaultCredentialsError, ValueError, KeyError) as exc:
        raise ConfigError([f"providers: {provider}: credentials_file: {path}: {_reason(exc)}"]) from None
    # The file's secrets are never echoed.
    for key in ("refresh_token", "client_secret"):
        if isinstance(info, dict) and isinstance(info.get(key), str):
            register_secret(info[key])
    return creds, project if isinstance(project, str) else None


def _http(
    proxy: str | None, ca_file: Path | None, connect_timeout: float, token_uri: str
) -> urllib3.PoolManager:
    """google-auth's transport: urllib3 with the provider's proxy and CA bundle (the same
    trust and route the upstream calls take), short timeouts, no redirects followed."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    kw: dict[str, Any] = {
        "timeout": urllib3.Timeout(connect=connect_timeout, read=_TOKEN_READ_SECONDS),
        "retries": urllib3.Retry(total=0, redirect=0, raise_on_redirect=False),
        "ssl_context": context,
    }
    route = proxy or env_proxy(token_uri)
    if route:
        return urllib3.ProxyManager(route, **kw)
    return urllib3.PoolManager(**kw)


def _timestamp(expiry: datetime.datetime | None, clock: Callable[[], float]) -> float:
    """google-auth's expiry (naive UTC) as wall-clock seconds; none given: an hour."""
    if expiry is None:
        return clock() + 3600.0
    return expiry.replace(tzinfo=datetime.UTC).timestamp()


def _reason(exc: BaseException) -> str:
    """The first line of a google-auth error (its args hold the endpoint's error body too)."""
    first = exc.args[0] if exc.args else exc
    text = " ".join(str(first).split())
    return errors.bound(text, 300) or type(exc).__name__
