"""The Bedrock signer (broker/providers/aws_auth.py) against AWS's published SigV4 test suite.

The vectors are AWS's aws-sig-v4-test-suite cases (docs.aws.amazon.com/general/latest/gr/
signature-v4-test-suite.html): credentials AKIDEXAMPLE / wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY,
region us-east-1, service "service", time 20150830T123600Z, host example.amazonaws.com; each
row's signature is the one in the case's .authz file. The last row is the Bedrock vector of
PROTOCOLS-CLOUD.md C2 (a model id with ':' percent-encoded in the path, a session token).
Also: the signer's canonical request equals botocore's own SigV4Auth.add_auth's for the URL
aiohttp sends, and the credential chain's refresh windows.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials, RefreshableCredentials

from broker.providers import aws_auth

SUITE_KEY = ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_TIME = "20150830T123600Z"
SUITE_TOKEN = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"

# (case, method, url, headers, body, session token, signed headers, signature)
VECTORS: list[tuple[str, str, str, dict[str, str], bytes, str | None, str, str]] = [
    ("get-vanilla", "GET", "https://example.amazonaws.com/", {}, b"", None, "host;x-amz-date",
     "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
    ("get-vanilla-query-order-key-case", "GET", "https://example.amazonaws.com/?Param2=value2&Param1=value1", {},
     b"", None, "host;x-amz-date", "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
    ("post-vanilla", "POST", "https://example.amazonaws.com/", {}, b"", None, "host;x-amz-date",
     "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    ("post-vanilla-query", "POST", "https://example.amazonaws.com/?Param1=value1", {}, b"", None, "host;x-amz-date",
     "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11"),
    ("post-x-www-form-urlencoded", "POST", "https://example.amazonaws.com/",
     {"Content-Type": "application/x-www-form-urlencoded"}, b"Param1=value1", None, "content-type;host;x-amz-date",
     "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"),
    ("get-vanilla-with-session-token", "GET", "https://example.amazonaws.com/", {}, b"", SUITE_TOKEN,
     "host;x-amz-date;x-amz-security-token", "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"),
]  # fmt: skip


@pytest.mark.parametrize("vector", VECTORS, ids=[v[0] for v in VECTORS])
def test_aws_published_vectors(
    vector: tuple[str, str, str, dict[str, str], bytes, str | None, str, str],
) -> None:
    _, method, url, headers, body, token, signed, signature = vector
    creds = ReadOnlyCredentials(*SUITE_KEY, token)
    out = aws_auth.sign(
        creds,
        method=method,
        url=url,
        body=body,
        headers=headers,
        region="us-east-1",
        service="service",
        at=SUITE_TIME,
    )
    assert out["authorization"] == (
        f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    assert out["x-amz-date"] == SUITE_TIME
    assert out.get("x-amz-security-token") == token


def test_the_bedrock_vector_of_the_protocol_notes() -> None:
    """PROTOCOLS-CLOUD.md C2: botocore and a stdlib implementation agreed on this signature."""
    out = aws_auth.sign(
        ReadOnlyCredentials(*SUITE_KEY, "EXAMPLESESSIONTOKEN"),
        method="POST",
        url="https://bedrock-runtime.us-east-1.amazonaws.com/model/us.amazon.nova-micro-v1%3A0/converse",
        body=b'{"messages":[{"role":"user","content":[{"text":"Hello!"}]}]}',
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        region="us-east-1",
        at="20250101T000000Z",
    )
    assert out["authorization"].endswith(
        "SignedHeaders=accept;content-type;host;x-amz-date;x-amz-security-token, "
        "Signature=37ad2205be270a5e6fcbd301711504f7535b595f1ebf945776d65afc679298c4"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8123/model/us.amazon.nova-micro-v1:0/converse-stream",
        "https://bedrock-runtime.eu-west-3.amazonaws.com/model/arn:aws:bedrock:eu-west-3:1:inference-profile%2Feu.x/converse",
        "https://bedrock.us-east-1.amazonaws.com/inference-profiles?maxResults=1000&nextToken=a/b%2Bc%3D%3D&type=SYSTEM_DEFINED",
    ],
)
def test_same_signature_as_botocore_add_auth(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's signer and botocore's own add_auth, at the same instant, agree (for the
    query botocore is given decoded pairs, as AWS decodes the query it receives)."""
    creds = ReadOnlyCredentials("AKIDX", "secret-x", "token-x")
    fixed = datetime.datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda *a, **k: fixed)
    base, _, query = url.partition("?")
    params: Any = aws_auth.query_pairs(query)
    theirs = AWSRequest(method="POST", url=base, data=b"{}", headers={}, params=params)
    SigV4Auth(creds, "bedrock", "eu-west-3").add_auth(theirs)
    ours = aws_auth.sign(
        creds, method="POST", url=url, body=b"{}", headers={}, region="eu-west-3", at="20260102T030405Z"
    )
    assert ours["authorization"] == theirs.headers["Authorization"]


async def test_refreshable_credentials_refresh_off_the_loop_in_the_advisory_window() -> None:
    """Inside the advisory window a request signs with the current keys while one background
    refresh runs in a thread; past the mandatory window a request waits for fresh keys."""
    calls: list[str] = []
    now = datetime.datetime.now(datetime.UTC)

    def expiring(minutes: int, key: str) -> dict[str, str]:
        return {
            "access_key": key,
            "secret_key": f"{key}-secret-value",
            "token": f"{key}-token",
            "expiry_time": (now + datetime.timedelta(minutes=minutes)).isoformat(),
        }

    def refresh() -> dict[str, str]:
        calls.append("refresh")
        return expiring(60, f"AKID{len(calls)}")

    source = RefreshableCredentials.create_from_metadata(expiring(12, "AKID0"), refresh, "test")
    chain = aws_auth.CredentialChain(name="t")
    chain._source = source  # the chain's resolved source, as botocore's session would give it
    # What the chain froze when the keys were young (reading them now would refresh them).
    chain._frozen = ReadOnlyCredentials("AKID0", "AKID0-secret-value", "AKID0-token")
    assert not source.refresh_needed(aws_auth.MANDATORY_REFRESH_SECONDS) and source.refresh_needed()
    got = await chain.get()  # 12 minutes left: advisory, not mandatory
    assert got.access_key == "AKID0"
    task = chain._background
    assert task is not None
    await task
    assert calls == ["refresh"] and (await chain.get()).access_key == "AKID1"
    await chain.close()
