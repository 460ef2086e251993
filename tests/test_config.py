"""Config: env interpolation, validation messages with paths, presets, env auto-config, round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from broker.config import (
    ConfigError,
    dump_settings,
    load_settings,
    preset_settings,
    settings_from_dict,
    settings_from_env,
)

GOOD = """
providers:
  - name: openai
    type: openai
    base_url: http://127.0.0.1:8000/v1
    api_key: ${TEST_OPENAI_KEY}
    priority: 10
  - name: local
    type: ollama
    base_url: ${OLLAMA_URL:-http://127.0.0.1:11434}
    priority: 20
aliases:
  fast: openai/gpt-4o-mini
health:
  interval_seconds: 5
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "broker.yaml"
    p.write_text(text)
    return p


def test_minimum_schema_loads_with_env_interpolation(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD), env={"TEST_OPENAI_KEY": "sk-test-interp-123456"})
    assert [p.name for p in s.enabled_providers()] == ["openai", "local"]
    assert s.providers[0].resolved_api_key() == "sk-test-interp-123456"
    assert s.providers[1].base_url == "http://127.0.0.1:11434"  # the ${VAR:-default} default
    assert s.aliases == {"fast": "openai/gpt-4o-mini"}
    assert s.health.interval_seconds == 5


def test_missing_env_var_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, GOOD), env={})
    assert e.value.problems == [
        "providers[0].api_key: environment variable TEST_OPENAI_KEY is not set (use ${TEST_OPENAI_KEY:-default})"
    ]


def test_every_problem_is_listed_with_its_path(tmp_path: Path) -> None:
    bad = """
providers:
  - name: openai
    type: openai
    base_url: localhost:8000
  - name: openai
    type: cohere
    priority: -1
    colour: blue
health:
  interval_seconds: 0
"""
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, bad))
    problems = "\n".join(e.value.problems)
    assert "providers[0].base_url: must be an http:// or https:// URL, got 'localhost:8000'" in problems
    # Every declared type is named (broker/providers/kinds.py).
    (type_line,) = [
        p for p in e.value.problems if p.startswith("providers[1].type: Input should be 'openai', ")
    ]
    assert all(f"'{t}'" in type_line for t in ("anthropic", "ollama", "gemini", "vertex")), type_line
    assert "providers[1].priority: Input should be greater than or equal to 0" in problems
    assert "providers[1].colour: unknown key" in problems
    assert "health.interval_seconds: Input should be greater than 0" in problems


def test_duplicate_provider_names_rejected() -> None:
    with pytest.raises(ConfigError) as e:
        settings_from_dict({"providers": [{"name": "a", "type": "openai"}, {"name": "a", "type": "ollama"}]})
    assert e.value.problems == ["providers[1].name: duplicate provider name 'a'"]


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, "providers:\n  - name: [unclosed\n"))
    assert e.value.problems[0].startswith("line ")
    assert "YAML syntax error" in e.value.problems[0]


def test_round_trip_to_yaml_and_back(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD), env={"TEST_OPENAI_KEY": "sk-test-roundtrip-999999"})
    again = settings_from_dict(yaml.safe_load(dump_settings(s, reveal_secrets=True)), env={})
    assert again == s
    masked = dump_settings(s)
    assert "sk-test-roundtrip-999999" not in masked
    assert "**********" in masked


@pytest.mark.parametrize("name", ["development", "cloud-only", "local-only"])
def test_presets_load(name: str) -> None:
    env = {"OPENAI_API_KEY": "sk-test-preset-000000", "ANTHROPIC_API_KEY": "sk-ant-test-preset-1"}
    s = preset_settings(name, env=env)
    types = {p.type for p in s.providers}
    assert (
        types
        == {
            "development": {"ollama", "openai", "anthropic"},
            "cloud-only": {"openai", "anthropic"},
            "local-only": {"ollama"},
        }[name]
    )
    assert settings_from_dict(yaml.safe_load(dump_settings(s, reveal_secrets=True)), env={}) == s


def test_cloud_only_preset_requires_keys() -> None:
    with pytest.raises(ConfigError) as e:
        preset_settings("cloud-only", env={})
    assert any("OPENAI_API_KEY is not set" in p for p in e.value.problems)


def test_auto_config_from_environment() -> None:
    s = settings_from_env(
        {
            "OPENAI_API_KEY": "sk-test-auto-123456",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "ANTHROPIC_API_KEY": "sk-ant-auto-123456",
            "OLLAMA_HOST": "127.0.0.1",
        }
    )
    assert [(p.name, p.type) for p in s.enabled_providers()] == [
        ("openai", "openai"),
        ("anthropic", "anthropic"),
        ("ollama", "ollama"),
    ]
    assert s.providers[0].base_url == "http://127.0.0.1:9/v1"
    assert s.providers[2].base_url == "http://127.0.0.1:11434"
    assert settings_from_env({}).providers == []


def test_auto_config_follows_each_declared_type() -> None:
    # Priorities are the type's place among the declarations, whichever types are present; an
    # Anthropic base URL without a key makes no provider (the API needs one); Ollama needs no key.
    s = settings_from_env({"ANTHROPIC_BASE_URL": "http://127.0.0.1:9", "OLLAMA_HOST": "http://127.0.0.1:8/"})
    assert [(p.name, p.priority, p.base_url) for p in s.providers] == [("ollama", 30, "http://127.0.0.1:8")]
    s = settings_from_env(
        {"ANTHROPIC_API_KEY": "sk-ant-auto-654321", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}
    )
    assert [(p.name, p.priority, p.base_url) for p in s.providers] == [
        ("anthropic", 20, "http://127.0.0.1:9")
    ]
    s = settings_from_env({"OPENAI_BASE_URL": "http://127.0.0.1:7/v1"})
    assert [(p.name, p.api_key) for p in s.providers] == [("openai", None)]  # local servers need no key


def test_vendor_rows_fill_the_base_url_and_are_checked() -> None:
    s = settings_from_dict(
        {
            "providers": [
                {"name": "g", "type": "openai", "vendor": "groq"},
                {"name": "r", "type": "openai", "vendor": "openrouter"},
                {"name": "own", "type": "openai", "vendor": "groq", "base_url": "http://127.0.0.1:1/v1"},
            ]
        },
        env={},
    )
    assert [p.resolved_base_url() for p in s.providers] == [
        "https://api.groq.com/openai/v1",
        "https://openrouter.ai/api/v1",
        "http://127.0.0.1:1/v1",
    ]
    assert settings_from_dict(yaml.safe_load(dump_settings(s, reveal_secrets=True)), env={}) == s
    with pytest.raises(ConfigError) as e:
        settings_from_dict(
            {
                "providers": [
                    {"name": "a", "type": "openai", "vendor": "grok"},
                    {"name": "b", "type": "anthropic", "vendor": "groq"},
                ]
            },
            env={},
        )
    assert e.value.problems == [
        "providers[0].vendor: Input should be 'groq' or 'openrouter'",
        "providers[1].vendor: groq speaks the openai protocol: set type: openai",
    ]


def test_base_url_defaults_follow_vendor_sdks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    s = settings_from_dict(
        {
            "providers": [
                {"name": "o", "type": "openai"},
                {"name": "a", "type": "anthropic"},
                {"name": "l", "type": "ollama"},
            ]
        }
    )
    assert [p.resolved_base_url() for p in s.providers] == [
        "https://api.openai.com/v1",
        "https://api.anthropic.com",
        "http://localhost:11434",
    ]
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:9999")
    assert s.providers[2].resolved_base_url() == "http://0.0.0.0:9999"


def test_api_key_file(tmp_path: Path) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_text("sk-test-from-file-42\n")
    s = settings_from_dict({"providers": [{"name": "o", "type": "openai", "api_key_file": str(keyfile)}]})
    assert s.providers[0].resolved_api_key() == "sk-test-from-file-42"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_config_check_lists_problems_and_fails(tmp_path: Path) -> None:
    path = write(
        tmp_path, "providers:\n  - name: x\n    type: openai\n    base_url: ftp://nope\n  - type: ollama\n"
    )
    r = run_cli("config", "check", str(path))
    assert r.returncode == 1
    assert "providers[0].base_url: must be an http:// or https:// URL, got 'ftp://nope'" in r.stderr
    assert "providers[1].name: Field required" in r.stderr


def test_cli_config_check_ok(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  - name: x\n    type: openai\n    base_url: http://127.0.0.1:1/v1\n")
    r = run_cli("config", "check", str(path))
    assert r.returncode == 0, r.stderr
    assert "ok; providers by priority: x (openai)" in r.stdout


def test_cli_serve_refuses_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  - name: x\n    type: nope\n")
    r = run_cli("serve", "--config", str(path), "--listen", "127.0.0.1:0")
    assert r.returncode != 0
    assert "providers[0].type" in r.stderr


def test_cli_config_show_preset_masks_keys() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "broker.cli", "config", "show", "--preset", "development"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "sk-test-show-777777"},
    )
    assert r.returncode == 0, r.stderr
    assert "sk-test-show-777777" not in r.stdout
    assert yaml.safe_load(r.stdout)["providers"][0]["name"] == "ollama"
