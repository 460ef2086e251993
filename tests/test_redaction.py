"""Redaction rules (broker/redact.py), where they are applied, and the config checks of issue 11
items 5 and 8: secrets by exact value, prefix and masked echo; redact first, then truncate;
`config show` masks `headers:`; placeholder caller-key hashes refused with their path;
ListProviders' last_error carries its time and is marked resolved after recovery.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets

import pytest

from broker.config import ConfigError, dump_settings, settings_from_dict
from broker.logs import redact_processor
from broker.redact import REDACTED, redact, register_secret, register_url_credentials
from broker.registry import MAX_LAST_ERROR_CHARS, Registry
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings, stub
from tests.fakes.openai_upstream import FakeOpenAI


def fresh(prefix: str = "zz") -> str:
    """Random, and shaped like no well-known key: only registration can hide it."""
    s = f"{prefix}{secrets.token_hex(12)}"
    register_secret(s)
    return s


def test_whole_secret_and_any_prefix_of_8_or_more() -> None:
    s = fresh()
    assert redact(f"key {s} rejected") == f"key {REDACTED} rejected"
    for n in (8, 12, len(s) - 1):
        assert redact(f"cut: {s[:n]}...") == f"cut: {REDACTED}..."
    # Fewer than 8 characters are not recognisable (why truncating before redacting leaks).
    assert redact(f"cut: {s[:7]}") == f"cut: {s[:7]}"


def test_a_short_prefix_counts_only_where_the_token_ends() -> None:
    s = fresh("zy")
    # 10 characters, then the text goes on: another token that happens to share them.
    assert redact(f"id {s[:10]}QQQQ") == f"id {s[:10]}QQQQ"
    assert redact(f"id {s[:10]}' (cut)") == f"id {REDACTED}' (cut)"
    # 16 or more: a leak whatever follows.
    assert redact(f"id {s[:16]}QQQQ") == f"id {REDACTED}QQQQ"


def test_urls_are_matched_whole_only() -> None:
    proxy = f"http://127.0.0.1:{secrets.randbelow(20000) + 20000}"
    register_secret(proxy)
    assert redact(f"via {proxy}") == f"via {REDACTED}"
    other = "http://127.0.0.1:1/v1"
    assert redact(f"base_url {other}") == f"base_url {other}", "a shared scheme and host is no leak"


@pytest.mark.parametrize(
    "shape",
    [
        lambda s: f"{s[:8]}{'*' * 30}{s[-4:]}",  # OpenAI: first 8, last 4
        lambda s: f"{s[:10]}*****{s[-4:]}",
        lambda s: f"{s[:4]}...{s[-4:]}",
        lambda s: f"{s[:3]}****{s[-4:]}",
        lambda s: f"{s[:6]}*****{s[-3:]}",  # the fake OpenAI's mask
        lambda s: f"{s[:4]}…{s[-4:]}",
        lambda s: f"{s[:4]}xxxxxxxx{s[-5:]}",
    ],
    ids=["8+4", "10+4", "4...4", "3+4", "6+3", "ellipsis", "x-mask"],
)
def test_masked_echoes(shape) -> None:
    s = fresh()
    text = f"Incorrect API key provided: {shape(s)}. You can find your key..."
    assert redact(text) == f"Incorrect API key provided: {REDACTED}. You can find your key..."


def test_masks_that_reveal_nothing_of_the_secret_stay() -> None:
    s = fresh()
    # Stars alone, or a mask whose ends do not belong to this secret.
    for text in ("key ********** refused", f"key {s[:3]}****0000 refused", "ok*****k"):
        assert redact(text) == text


def test_short_values_are_not_registered_and_parts_of_long_ones_are() -> None:
    register_secret("abc12")  # under 6 characters: would match ordinary words
    assert redact("abc12 is fine") == "abc12 is fine"
    token = secrets.token_hex(10)
    register_secret(f"Basic {token}")
    assert redact(f"sent Basic {token}") == f"sent {REDACTED}"
    assert redact(f"token {token} alone") == f"token {REDACTED} alone"
    assert redact("Basic auth is a scheme") == "Basic auth is a scheme"


def test_url_credentials_in_every_form_a_proxy_or_upstream_could_echo() -> None:
    pw = f"p@ss-{secrets.token_hex(6)}"
    quoted = pw.replace("@", "%40")
    register_url_credentials(f"http://alice:{quoted}@proxy.corp:3128")
    basic = base64.b64encode(f"alice:{pw}".encode()).decode()
    for echoed in (pw, quoted, f"alice:{pw}", basic, f"Proxy-Authorization: Basic {basic}"):
        assert pw not in redact(echoed) and basic not in redact(echoed), echoed
    assert redact("http://proxy.corp:3128") == "http://proxy.corp:3128"


def test_well_known_shapes_still_go_without_registration() -> None:
    assert redact("key sk-proj-abcdefgh1234 bad") == f"key {REDACTED} bad"
    assert redact("Authorization: Bearer abcdef123456") == f"Authorization: {REDACTED}"


def test_log_processor_redacts_objects_and_nested_keys() -> None:
    s = fresh()
    event = {"event": "x", "error": ValueError(f"upstream said {s}"), "nested": {s: [s, 1, None]}, "n": 3}
    out = json.dumps(redact_processor(None, "info", event), default=str)
    assert s not in out and s[:8] not in out
    assert '"n": 3' in out


def test_last_error_is_redacted_then_truncated() -> None:
    s = fresh()
    registry = Registry(
        broker_settings([{"name": "p", "type": "openai", "base_url": "http://127.0.0.1:1/v1"}])
    )
    (state,) = registry.providers
    # The secret straddles the cut: truncating first would leave 4 characters of it.
    state.last_error = "x" * (MAX_LAST_ERROR_CHARS - 4) + s + " tail"
    assert s[:4] not in state.last_error[MAX_LAST_ERROR_CHARS - 10 :]
    assert len(state.last_error) <= MAX_LAST_ERROR_CHARS + 3
    assert state.last_error_wall is not None and not state.last_error_resolved


def test_config_show_masks_header_values_unless_revealed() -> None:
    value = f"hv-{secrets.token_hex(8)}"
    settings = settings_from_dict(
        {
            "providers": [
                {
                    "name": "p",
                    "type": "openai",
                    "api_key": "k" * 20,
                    "headers": {"OpenAI-Organization": value},
                }
            ]
        },
        env={},
    )
    masked = dump_settings(settings)
    assert "OpenAI-Organization" in masked and value not in masked
    assert value in dump_settings(settings, reveal_secrets=True)
    assert redact(f"org {value}") == f"org {REDACTED}", "a header value is registered as a secret"


@pytest.mark.parametrize("digest", ["0" * 64, "f" * 64, "ab" * 32, "deadbeef" * 8, "F" * 64])
def test_placeholder_caller_key_hashes_are_refused_with_their_path(digest: str) -> None:
    good = {"name": "ok", "sha256": "5" + "0" * 63}  # not a placeholder: two distinct digits
    with pytest.raises(ConfigError) as e:
        settings_from_dict({"auth": {"keys": [good, {"name": "team-b", "sha256": digest}]}}, env={})
    (problem,) = e.value.problems
    assert problem.startswith("auth.keys[1].sha256: is a placeholder"), problem


async def test_last_error_has_its_time_and_is_marked_resolved_after_recovery(daemon, channel_to) -> None:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as up:
        url = up.url
        settings = broker_settings(
            [{"name": "p", "type": "openai", "base_url": url, "api_key": OPENAI_TEST_KEY}],
            health={"interval_seconds": 0.1, "timeout_seconds": 1.0},
        )
        _, target = await daemon(settings)
        s = stub(channel_to(target))

        async def info() -> pb.ProviderInfo:
            resp: pb.ListProvidersResponse = await s.ListProviders(pb.ListProvidersRequest(), timeout=5)
            return resp.providers[0]

        first = await info()
        assert not first.last_error and not first.HasField("last_error_time")
        await up.stop()
        for _ in range(100):
            down = await info()
            if down.last_error:
                break
            await asyncio.sleep(0.05)
        assert down.last_error and down.HasField("last_error_time") and not down.last_error_resolved
        await up.start()
        for _ in range(100):
            back = await info()
            if back.last_error_resolved:
                break
            await asyncio.sleep(0.05)
        assert back.last_error_resolved and back.health == pb.PROVIDER_HEALTH_SERVING
        assert back.last_error_time == down.last_error_time, "the time is the error's, kept after recovery"
        assert back.last_error == down.last_error


def test_cli_providers_prints_the_errors_time_and_state(capsys, monkeypatch) -> None:
    from broker import cli

    p = pb.ProviderInfo(
        name="p", type="openai", base_url="http://x", last_error="boom", last_error_resolved=True
    )
    p.last_error_time.FromSeconds(1_800_000_000)

    class FakeClient:
        def __init__(self, *a, **k) -> None: ...
        def __enter__(self):
            return self

        def __exit__(self, *a) -> None: ...
        def list_providers(self):
            return [p]

    import modelbroker.client

    monkeypatch.setattr(modelbroker.client, "BrokerClient", FakeClient)
    assert cli.main(["providers"]) == 0
    assert "last error (resolved, 2027-01-15T08:00:00Z): boom" in capsys.readouterr().out


def test_a_text_redacted_before_its_secret_was_registered_is_redacted_after() -> None:
    """Short texts are remembered with their redaction: registering a secret forgets them."""
    s = f"zz{secrets.token_hex(12)}"
    text = f"key {s}"
    assert redact(text) == text and redact(text) == text  # remembered: nothing to hide yet
    register_secret(s)
    assert redact(text) == f"key {REDACTED}"
    long_text = f"{'x' * 200} {s}"  # past the remembered length: redacted afresh every time
    assert redact(long_text) == f"{'x' * 200} {REDACTED}"


def test_redact_fields_is_redact_per_string_or_none() -> None:
    from broker.redact import redact_fields

    s = fresh()
    fields = {"a": f"said {s}", "b": 3, "c": None, "d": 0.5, "e": True, "f": "", "g": "plain"}
    assert redact_fields(fields, 100) == {
        k: redact(v) if isinstance(v, str) else v for k, v in fields.items()
    }
    assert redact_fields({"x": "y" * 101}, 100) is None  # over the limit: the caller bounds it first
    assert redact_fields({"x": [s]}, 100) is None  # not plain: the general path
    assert redact_fields({"x": ValueError(s)}, 100) is None
