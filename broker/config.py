"""Settings: one YAML file (or the environment alone), validated with pydantic.

`${VAR}` and `${VAR:-default}` in string values are read from the environment. Every
problem is reported with its path (`providers[1].base_url: ...`) so an operator can fix
the file without reading code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.redact import register_secret

ProviderType = Literal["openai", "anthropic", "ollama"]
PRESETS = ("development", "cloud-only", "local-only")

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "ollama": "http://localhost:11434",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderConfig(_Strict):
    name: str
    type: ProviderType
    base_url: str = ""  # empty: the vendor default (Ollama: $OLLAMA_HOST)
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    priority: int = Field(default=100, ge=0)
    enabled: bool = True
    # Extra headers on every upstream request (e.g. OpenAI-Organization).
    headers: dict[str, str] = Field(default_factory=dict)
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    # Longest wait for the next byte from the upstream (time to first token, stalls).
    read_timeout_seconds: float = Field(default=120.0, gt=0)
    max_connections: int = Field(default=200, ge=1)
    # Models served even if discovery does not list them (and for servers with no listing).
    models: list[str] = Field(default_factory=list)
    discovery: bool = True
    # Bill at the catalogue's prices? Default (unset): only on the vendor's own endpoint
    # (api.openai.com, api.anthropic.com); a proxy to the vendor can set true.
    catalog_prices: bool | None = None

    @field_validator("name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                "must be lowercase letters, digits, '_', '-' or '.', starting with a letter or digit"
            )
        return v

    @field_validator("base_url")
    @classmethod
    def _url_shape(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _one_key_source(self) -> ProviderConfig:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set api_key or api_key_file, not both")
        return self

    def resolved_base_url(self) -> str:
        if self.base_url:
            return self.base_url
        if self.type == "ollama" and os.environ.get("OLLAMA_HOST"):
            return ollama_host_url(os.environ["OLLAMA_HOST"])
        return DEFAULT_BASE_URLS[self.type]

    def resolved_api_key(self) -> str | None:
        """The key from api_key or api_key_file (read at start, so a rotated file is seen on restart)."""
        if self.api_key is not None:
            return self.api_key.get_secret_value() or None
        if self.api_key_file is not None:
            return self.api_key_file.read_text().strip() or None
        return None


class HealthConfig(_Strict):
    interval_seconds: float = Field(default=5.0, gt=0)
    timeout_seconds: float = Field(default=2.0, gt=0)
    # Readiness of "modelbroker.v1.ModelBroker": any provider healthy, or all of them.
    readiness: Literal["any", "all"] = "any"


class DiscoveryConfig(_Strict):
    ttl_seconds: float = Field(default=300.0, gt=0)


class ServerConfig(_Strict):
    listen: str = DEFAULT_LISTEN
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_concurrent_rpcs: int | None = Field(default=None, ge=1)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)

    @field_validator("listen")
    @classmethod
    def _listen_shape(cls, v: str) -> str:
        parse_listen(v)
        return v


class ModelOverride(_Strict):
    """A catalogue entry added or overridden by config: `provider/model` plus facts."""

    id: str
    context_window: int | None = Field(default=None, ge=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    vision: bool | None = None
    tools: bool | None = None
    json_mode: bool | None = None
    input_usd_per_mtok: float | None = Field(default=None, ge=0)
    output_usd_per_mtok: float | None = Field(default=None, ge=0)
    cached_input_usd_per_mtok: float | None = Field(default=None, ge=0)

    @field_validator("id")
    @classmethod
    def _prefixed(cls, v: str) -> str:
        if "/" not in v or v.startswith("/") or v.endswith("/"):
            raise ValueError(f"must be 'provider/model', got {v!r}")
        return v


class Settings(_Strict):
    providers: list[ProviderConfig] = Field(default_factory=list)
    # alias -> "provider/model" or bare model id
    aliases: dict[str, str] = Field(default_factory=dict)
    health: HealthConfig = Field(default_factory=HealthConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    models: list[ModelOverride] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for i, p in enumerate(self.providers):
            if p.name in seen:
                raise ValueError(f"providers[{i}].name: duplicate provider name {p.name!r}")
            seen.add(p.name)
        for alias, target in self.aliases.items():
            if not target:
                raise ValueError(f"aliases.{alias}: target must not be empty")
        return self

    def enabled_providers(self) -> list[ProviderConfig]:
        """Enabled providers in priority order (ties keep file order)."""
        return sorted((p for p in self.providers if p.enabled), key=lambda p: p.priority)


class ConfigError(Exception):
    """A config that cannot be used; `problems` are `path: message` lines."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}invalid config:\n" + "\n".join(f"  {p}" for p in problems))


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT with a port from 0 to 65535, got {value!r}")
    return host.strip("[]"), int(port)


def ollama_host_url(value: str) -> str:
    """OLLAMA_HOST may be `host`, `host:port` or a URL, as the ollama CLI accepts."""
    value = value.strip().rstrip("/")
    if not value.startswith(("http://", "https://")):
        value = "http://" + value
    if not re.search(r":\d+$", value.split("//", 1)[1]):
        value += ":11434"
    return value


# --- loading ---------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _interpolate(node: Any, loc: tuple[Any, ...], env: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            problems.append(
                f"{_path(loc)}: environment variable {name} is not set (use ${{{name}:-default}})"
            )
            return ""

        return _VAR.sub(sub, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, (*loc, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, (*loc, i), env, problems) for i, v in enumerate(node)]
    return node


def _drop_unset_optionals(raw: Any) -> Any:
    """An `api_key: ${KEY:-}` that resolves empty means "no key", not an empty secret."""
    if isinstance(raw, dict):
        for p in raw.get("providers") or []:
            if isinstance(p, dict) and p.get("api_key") == "":
                p.pop("api_key")
    return raw


def settings_from_dict(raw: Any, *, source: str = "", env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"(top level): must be a mapping, got {type(raw).__name__}"], source)
    problems: list[str] = []
    raw = _drop_unset_optionals(_interpolate(raw, (), env, problems))
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        for e in exc.errors():
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling against the README configuration reference)"
            if msg.startswith(("providers[", "aliases.")):  # model-level messages carry their own path
                problems.append(msg)
            else:
                problems.append(f"{_path(tuple(e['loc']))}: {msg}")
    else:
        if not problems:
            for p in settings.providers:
                if p.api_key is not None:
                    register_secret(p.api_key.get_secret_value())
            return settings
    raise ConfigError(problems, source)


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {path}: {exc.strerror}"], str(path)) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: YAML syntax error: {problem}"], str(path)) from exc
    return settings_from_dict(raw, source=str(path), env=env)


def preset_settings(name: str, env: Mapping[str, str] | None = None) -> Settings:
    if name not in PRESETS:
        raise ConfigError([f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}"])
    text = resources.files("broker").joinpath("presets", f"{name}.yaml").read_text()
    return settings_from_dict(yaml.safe_load(text), source=f"preset {name}", env=env)


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """No file: a provider for each of OPENAI_API_KEY/OPENAI_BASE_URL, ANTHROPIC_API_KEY, OLLAMA_HOST."""
    env = os.environ if env is None else env
    providers: list[dict[str, Any]] = []
    if env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL"):
        p: dict[str, Any] = {"name": "openai", "type": "openai", "priority": 10}
        if env.get("OPENAI_BASE_URL"):
            p["base_url"] = env["OPENAI_BASE_URL"]
        if env.get("OPENAI_API_KEY"):
            p["api_key"] = env["OPENAI_API_KEY"]
        providers.append(p)
    if env.get("ANTHROPIC_API_KEY"):
        a: dict[str, Any] = {"name": "anthropic", "type": "anthropic", "priority": 20}
        a["api_key"] = env["ANTHROPIC_API_KEY"]
        if env.get("ANTHROPIC_BASE_URL"):
            a["base_url"] = env["ANTHROPIC_BASE_URL"]
        providers.append(a)
    if env.get("OLLAMA_HOST"):
        providers.append(
            {
                "name": "ollama",
                "type": "ollama",
                "priority": 30,
                "base_url": ollama_host_url(env["OLLAMA_HOST"]),
            }
        )
    return settings_from_dict({"providers": providers}, source="environment", env=env)


def dump_settings(settings: Settings, *, reveal_secrets: bool = False) -> str:
    """YAML that loads back to the same settings (with reveal_secrets; else keys are masked)."""
    data = settings.model_dump(mode="json", exclude_defaults=True)
    for p_out, p in zip(data.get("providers", []), settings.providers, strict=True):
        if p.api_key is not None:
            p_out["api_key"] = p.api_key.get_secret_value() if reveal_secrets else "**********"
        if p.api_key_file is not None:
            p_out["api_key_file"] = str(p.api_key_file)
    return yaml.safe_dump(data, sort_keys=False)
