"""Auth config validation, `model-broker keys`, the serve warning, and the token bucket."""

from __future__ import annotations

import hashlib
import io
import re
from typing import Any

import pytest
import yaml

from broker import cli
from broker.auth import hash_key, new_key, open_listen_warning
from broker.config import ConfigError, Settings, settings_from_dict
from broker.limits import TokenBucket
from broker.redact import REDACTED, redact

GOOD_HASH = hashlib.sha256(b"test").hexdigest()


def problems(auth: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        settings_from_dict({"auth": auth}, env={})
    return e.value.problems


def test_keys_section_loads_with_defaults_meaning_unlimited() -> None:
    s = settings_from_dict(
        {
            "auth": {
                "keys": [
                    {"name": "team-a", "sha256": GOOD_HASH.upper(), "allow_models": ["openai/*"]},
                    {"name": "team-b", "sha256": hash_key("other"), "requests_per_minute": 600},
                ]
            }
        },
        env={},
    )
    a, b = s.auth.keys
    assert s.auth.enabled
    assert a.sha256 == GOOD_HASH, "hex is normalised to lowercase"
    assert a.allow_models == ["openai/*"] and a.requests_per_minute is None
    assert b.allow_models is None and b.tokens_per_minute is None and b.max_concurrent_streams is None
    assert not Settings().auth.enabled, "auth is off unless keys are configured"


def test_sha256_must_be_64_hex_and_the_value_is_never_echoed() -> None:
    key = new_key()
    (msg,) = problems({"keys": [{"name": "a", "sha256": key}]})
    assert msg.startswith("auth.keys[0].sha256: must be the 64-character hex SHA-256")
    assert "this looks like a key" in msg
    assert key not in msg
    (msg,) = problems({"keys": [{"name": "a", "sha256": "abc123"}]})
    assert msg.startswith("auth.keys[0].sha256:") and "got 6 characters" in msg


def test_names_and_keys_must_be_unique() -> None:
    (msg,) = problems({"keys": [{"name": "a", "sha256": GOOD_HASH}, {"name": "a", "sha256": hash_key("x")}]})
    assert msg == "auth.keys[1].name: duplicate key name 'a'"
    (msg,) = problems({"keys": [{"name": "a", "sha256": GOOD_HASH}, {"name": "b", "sha256": GOOD_HASH}]})
    assert msg.startswith("auth.keys[1].sha256: the same key is already configured")


@pytest.mark.parametrize(
    ("entry", "path"),
    [
        ({"allow_models": ["openai/*", "gpt-4o"]}, "auth.keys[0].allow_models[1]: must be a glob"),
        ({"requests_per_minute": 0}, "auth.keys[0].requests_per_minute:"),
        ({"tokens_per_minute": -5}, "auth.keys[0].tokens_per_minute:"),
        ({"max_concurrent_streams": 0}, "auth.keys[0].max_concurrent_streams:"),
        ({"burst": 5}, "auth.keys[0]: burst is only meaningful with requests_per_minute"),
        ({"name": "has space"}, "auth.keys[0].name:"),
        ({"rpm": 5}, "auth.keys[0].rpm: unknown key"),
    ],
)
def test_bad_entries_are_reported_with_their_path(entry: dict[str, Any], path: str) -> None:
    (msg,) = problems({"keys": [{"name": "a", "sha256": GOOD_HASH, **entry}]})
    assert msg.startswith(path), msg


def test_keys_create_prints_a_redactable_key_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "create", "--name", "team-a"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"^key:\s+(\S+)$", out, re.M)
    digest = re.search(r"^sha256:\s+([0-9a-f]{64})$", out, re.M)
    assert key and digest
    assert re.fullmatch(r"mb_[A-Za-z0-9_\-]{40,}", key.group(1))
    assert hashlib.sha256(key.group(1).encode()).hexdigest() == digest.group(1)
    assert redact(f"caller sent {key.group(1)}") == f"caller sent {REDACTED}"
    # The printed snippet is a config that loads.
    snippet = out[out.index("auth:") :]
    s = settings_from_dict(yaml.safe_load(snippet), env={})
    assert s.auth.keys[0].name == "team-a" and s.auth.keys[0].sha256 == digest.group(1)
    assert cli.main(["keys", "create"]) == 0
    assert key.group(1) not in capsys.readouterr().out, "every key is new"


def test_keys_hash_from_argument_and_stdin_agree(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["keys", "hash", "test"]) == 0
    assert capsys.readouterr().out.strip() == GOOD_HASH
    monkeypatch.setattr("sys.stdin", io.StringIO("test\n"))
    assert cli.main(["keys", "hash"]) == 0
    assert capsys.readouterr().out.strip() == GOOD_HASH, "a trailing newline from echo is not part of the key"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["keys", "hash", "-"]) == 1
    assert "no key given" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("listen", "warns"),
    [
        ("0.0.0.0:50051", True),
        ("[::]:50051", True),
        ("10.1.2.3:50051", True),
        ("broker.internal:50051", True),
        ("127.0.0.1:50051", False),
        ("127.0.0.5:0", False),
        ("[::1]:50051", False),
        ("localhost:50051", False),
    ],
)
def test_serve_warns_beyond_loopback_only_with_auth_off(listen: str, warns: bool) -> None:
    off = Settings()
    on = settings_from_dict({"auth": {"keys": [{"name": "a", "sha256": GOOD_HASH}]}}, env={})
    warning = open_listen_warning(off, listen)
    assert (warning is not None) == warns
    if warning:
        assert listen in warning and "auth" in warning
    assert open_listen_warning(on, listen) is None
    # mTLS authenticates callers by certificate: that is caller auth too.
    mtls = settings_from_dict(
        {"tls": {"cert_file": "/srv/tls.crt", "key_file": "/srv/tls.key", "client_ca_file": "/srv/ca.crt"}},
        env={},
    )
    assert open_listen_warning(mtls, listen) is None


def test_token_bucket_takes_refuses_and_goes_into_debt() -> None:
    # One token a minute: nothing refills during the test, so no timing is involved.
    bucket = TokenBucket(2, 1 / 60)
    assert bucket.take() == 0 and bucket.take() == 0
    wait = bucket.take()
    assert 59 < wait <= 60, "the third request waits for one token to refill"
    assert bucket.debt_seconds() == 0
    bucket.charge(3)
    assert 179 < bucket.debt_seconds() <= 180, "three tokens owed at one a minute"
