"""GoogleCredentials (broker/providers/google_auth.py) against a fake token endpoint on loopback.

The fake verifies every JWT assertion's RS256 signature with the public half of an RSA key
this module makes, and its claims (iss, aud, scope, lifetime). Expiry is driven by a clock
the test owns (`Clock`), never by waiting: a token is cached while fresh, refreshed in the
background in its last five minutes, and waited for in its last minute. The fake runs on the
test's event loop, so every token it issues also shows the refresh did not block that loop
(google-auth's blocking HTTP call runs in a worker thread).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker import errors
from broker.config import ConfigError
from broker.providers.google_auth import FRESH_SECONDS, MIN_SECONDS, GoogleCredentials
from broker.redact import redact
from tests.fakes.google_token import (
    EMAIL,
    GOOGLE_TOKEN_URI,
    JWT_BEARER,
    KEY_ID,
    SCOPE,
    FakeGoogleToken,
    make_key,
    service_account_key,
    write_json,
)


class Clock:
    """Wall-clock time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return make_key()


@pytest.fixture
async def endpoint(key: rsa.RSAPrivateKey) -> AsyncIterator[FakeGoogleToken]:
    async with FakeGoogleToken(key.public_key()) as fake:
        yield fake


def track(made: list[GoogleCredentials], creds: GoogleCredentials) -> GoogleCredentials:
    made.append(creds)
    return creds


@pytest.fixture
async def made() -> AsyncIterator[list[GoogleCredentials]]:
    """Credentials a test makes, closed at its end (their pooled connections to the fake)."""
    creds: list[GoogleCredentials] = []
    yield creds
    for c in creds:
        await c.close()


@pytest.fixture
def key_file(tmp_path: Path, key: rsa.RSAPrivateKey, endpoint: FakeGoogleToken) -> Path:
    return write_json(tmp_path / "key.json", service_account_key(key, endpoint.url))


async def test_a_service_account_token_comes_from_a_verified_jwt_grant(
    made: list[GoogleCredentials], endpoint: FakeGoogleToken, key_file: Path
) -> None:
    creds = track(made, GoogleCredentials(provider="vx", credentials_file=key_file))
    assert creds.project_id == "my-project" and EMAIL in creds.source
    headers = await creds.headers()
    (grant,) = endpoint.grants
    assert headers == {"authorization": f"Bearer {grant.token}"}
    assert grant.grant_type == JWT_BEARER
    assert grant.header == {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}
    assert grant.claims["iss"] == EMAIL and grant.claims["aud"] == GOOGLE_TOKEN_URI
    assert grant.claims["scope"] == SCOPE and grant.claims["exp"] - grant.claims["iat"] == 3600
    # Cached: the next requests reuse it.
    assert await creds.token() == grant.token and await creds.token() == grant.token
    assert len(endpoint.grants) == 1 and creds.refreshes == 1


async def test_refreshed_before_expiry_in_the_background_then_waited_for(
    made: list[GoogleCredentials], endpoint: FakeGoogleToken, key_file: Path
) -> None:
    clock = Clock()
    creds = track(made, GoogleCredentials(provider="vx", credentials_file=key_file, clock=clock))
    first = await creds.token()
    expires = time.time() + endpoint.expires_in
    # Five minutes and less before expiry: the old token still serves while a refresh runs.
    clock.offset = expires - time.time() - (FRESH_SECONDS - 60)
    assert await creds.token() == first
    await creds.wait_refreshed()
    second = endpoint.grants[1].token
    assert second != first and await creds.token() == second
    # Within the last minute of the new token: the request waits for a third.
    clock.offset = (time.time() + endpoint.expires_in) - time.time() - (MIN_SECONDS / 2)
    third = await creds.token()
    assert third == endpoint.grants[2].token and len({first, second, third}) == 3
    # Each refresh signed a new assertion: three grants, each verified, each issued anew.
    assert [g.grant_type for g in endpoint.grants] == [JWT_BEARER] * 3 and not endpoint.refused
    assert creds.refreshes == 3


async def test_concurrent_requests_share_one_refresh(
    made: list[GoogleCredentials], endpoint: FakeGoogleToken, key_file: Path
) -> None:
    creds = track(made, GoogleCredentials(provider="vx", credentials_file=key_file))
    tokens = await asyncio.gather(*(creds.token() for _ in range(8)))
    assert len(set(tokens)) == 1 and len(endpoint.grants) == 1


async def test_a_key_the_endpoint_does_not_know_is_the_operators_problem(
    made: list[GoogleCredentials], endpoint: FakeGoogleToken, tmp_path: Path
) -> None:
    other = write_json(tmp_path / "other.json", service_account_key(make_key(), endpoint.url))
    creds = track(made, GoogleCredentials(provider="vx", credentials_file=other))
    with pytest.raises(errors.UpstreamAuthFailed) as info:
        await creds.token()
    assert "invalid_grant" in info.value.message and EMAIL in info.value.message
    assert endpoint.refused == ["Invalid JWT Signature."] and not endpoint.grants


async def test_a_failing_token_endpoint_is_retried_by_google_auth(
    made: list[GoogleCredentials], endpoint: FakeGoogleToken, key_file: Path
) -> None:
    endpoint.failures = [503]
    creds = track(made, GoogleCredentials(provider="vx", credentials_file=key_file))
    assert await creds.token() == endpoint.grants[0].token


async def test_an_unreachable_token_endpoint_is_retryable(
    made: list[GoogleCredentials], key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    async with FakeGoogleToken(key.public_key()) as gone:
        url = gone.url
    path = write_json(tmp_path / "key.json", service_account_key(key, url))
    creds = track(made, GoogleCredentials(provider="vx", credentials_file=path, connect_timeout=2.0))
    with pytest.raises(errors.UpstreamUnavailable) as info:
        await creds.token()
    assert "token endpoint" in info.value.message and info.value.retryable


async def test_application_default_credentials(
    made: list[GoogleCredentials], endpoint: FakeGoogleToken, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    creds = track(made, GoogleCredentials(provider="vx", credentials_file=None))
    assert await creds.token() == endpoint.grants[0].token
    assert creds.project_id == "my-project" and creds.source.startswith("Application Default Credentials")


async def test_no_credentials_anywhere(
    made: list[GoogleCredentials], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no gcloud ADC file
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # and no metadata server to look for
    creds = track(made, GoogleCredentials(provider="vx", credentials_file=None))
    with pytest.raises(errors.UpstreamAuthFailed, match="no Google credentials: set credentials_file"):
        await creds.token()


def test_an_authorized_user_file_loads_and_its_secrets_are_redacted(tmp_path: Path) -> None:
    # google-auth always sends an authorized user's refresh-token grant to Google's own token
    # endpoint (it ignores the file's token_uri), so no fake can stand in for it here.
    doc = {
        "type": "authorized_user",
        "client_id": "client-123.apps.googleusercontent.com",
        "client_secret": "client-secret-test-77a1",
        "refresh_token": "1//refresh-token-test-9f2e",
    }
    creds = GoogleCredentials(provider="vx", credentials_file=write_json(tmp_path / "adc.json", doc))
    assert creds.token_uri == GOOGLE_TOKEN_URI and "adc.json" in creds.source
    assert (
        redact("secret client-secret-test-77a1 and 1//refresh-token-test-9f2e")
        == "secret [REDACTED] and [REDACTED]"
    )


def test_a_bad_key_file_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path in (broken, tmp_path / "missing.json", write_json(tmp_path / "odd.json", {"type": "unknown"})):
        with pytest.raises(ConfigError) as info:
            GoogleCredentials(provider="vx", credentials_file=path)
        assert info.value.problems[0].startswith("providers: vx: credentials_file:"), info.value.problems
    assert "not json" not in json.dumps(info.value.problems)
