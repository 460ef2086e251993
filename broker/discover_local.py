"""First run: with no provider configured, serve the model servers running on this machine.

A daemon with no provider can do nothing, so `serve` (broker/cli.py) calls `first_run` when
the settings hold no provider at all: it probes 127.0.0.1 at each local server's default
port, all at once, with a short timeout, and makes a provider of each one that answers:

| server    | port  | probe            | provider                                  |
|-----------|-------|------------------|-------------------------------------------|
| Ollama    | 11434 | GET /api/tags    | `ollama`, type ollama                     |
| LM Studio | 1234  | GET /v1/models   | `lm-studio`, type openai, base_url .../v1 |
| llama.cpp | 8080  | GET /v1/models   | `llama-cpp`, type openai                  |
| vLLM      | 8000  | GET /v1/models   | `vllm`, type openai                       |

An answer counts only when it has the listing's shape (a port held by some other web server
is not a model server). An OpenAI-compatible listing whose models say `owned_by: vllm` or
`llamacpp` names that server whatever the port. Each find is logged (`local_server_found`)
and said in one line; when nothing answers, `serve` prints one screen of what to set.

Off with `auto_discover_local: false` in config or MODEL_BROKER_DISCOVER_LOCAL=0.
MODEL_BROKER_DISCOVER_PORTS moves the probes (`ollama=11434,vllm=off,...`; tests point them
at fakes so they never depend on what runs on the real ports). Only loopback is probed, and
never through a proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import structlog

from broker.config import ConfigError, ProviderConfig, Settings
from broker.providers import kinds

log = structlog.get_logger("broker.discover_local")

ENABLE_ENV = "MODEL_BROKER_DISCOVER_LOCAL"
PORTS_ENV = "MODEL_BROKER_DISCOVER_PORTS"
# Set by a `serve --workers N` parent for its workers: what it found, so they do not probe again.
FOUND_ENV = "MODEL_BROKER_DISCOVERED_LOCAL"
HOST = "127.0.0.1"
# Each probe's whole budget: a closed loopback port is refused at once, a model server lists
# its models in milliseconds; only a port that accepts and never answers waits this long.
PROBE_SECONDS = 1.0
MAX_LISTING_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LocalServer:
    name: str  # the provider name, and the key in MODEL_BROKER_DISCOVER_PORTS
    label: str
    port: int
    protocol: str  # the provider type it speaks


SERVERS = (
    LocalServer("ollama", "Ollama", 11434, "ollama"),
    LocalServer("lm-studio", "LM Studio", 1234, "openai"),
    LocalServer("llama-cpp", "llama.cpp", 8080, "openai"),
    LocalServer("vllm", "vLLM", 8000, "openai"),
)
# `owned_by` in an OpenAI-compatible listing -> the server that wrote it.
_OWNERS = {"vllm": ("vllm", "vLLM"), "llamacpp": ("llama-cpp", "llama.cpp")}


@dataclass(frozen=True, slots=True)
class Found:
    name: str
    label: str
    port: int
    protocol: str
    models: int

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}" + ("/v1" if self.protocol == "openai" else "")


def enabled(settings: Settings, env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ) if env is None else env
    off = env.get(ENABLE_ENV, "").strip().lower() in ("0", "false", "no", "off")
    return settings.auto_discover_local and not off


def probe_ports(env: dict[str, str] | None = None) -> list[LocalServer]:
    """The servers to probe, with MODEL_BROKER_DISCOVER_PORTS applied (ConfigError if malformed)."""
    env = dict(os.environ) if env is None else env
    ports: dict[str, int | None] = {s.name: s.port for s in SERVERS}
    for item in filter(None, (x.strip() for x in env.get(PORTS_ENV, "").split(","))):
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if (
            not sep
            or name not in ports
            or not (value == "off" or (value.isdigit() and 0 < int(value) < 65536))
        ):
            raise ConfigError(
                [f"{PORTS_ENV}: {item!r}: expected NAME=PORT or NAME=off, NAME one of {', '.join(ports)}"]
            )
        ports[name] = None if value == "off" else int(value)
    return [
        LocalServer(s.name, s.label, port, s.protocol) for s in SERVERS if (port := ports[s.name]) is not None
    ]


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, allow_redirects=False) as resp:
        if resp.status != 200:
            return None
        body = bytearray()
        async for piece in resp.content.iter_any():  # the body may arrive in any number of pieces
            body += piece
            if len(body) > MAX_LISTING_BYTES:
                return None
    try:
        return json.loads(body)
    except ValueError:
        return None


async def _probe(session: aiohttp.ClientSession, server: LocalServer) -> Found | None:
    base = f"http://{HOST}:{server.port}"
    try:
        if server.protocol == "ollama":
            doc = await _get_json(session, base + "/api/tags")
            if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
                return None
            return Found(server.name, server.label, server.port, server.protocol, len(doc["models"]))
        doc = await _get_json(session, base + "/v1/models")
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return None
    name, label = server.name, server.label
    owners = {m.get("owned_by") for m in doc["data"] if isinstance(m, dict)}
    for owner, (owner_name, owner_label) in _OWNERS.items():
        if owner in owners:
            name, label = owner_name, owner_label
    return Found(name, label, server.port, server.protocol, len(doc["data"]))


async def discover(servers: list[LocalServer]) -> list[Found]:
    """Probe every server at once; what answered, in SERVERS order (names made unique)."""
    timeout = aiohttp.ClientTimeout(total=PROBE_SECONDS)
    # trust_env=False: HTTP_PROXY must not carry a loopback probe to some other machine.
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        results = await asyncio.gather(*(_probe(session, s) for s in servers))
    found: list[Found] = []
    for f in results:
        if f is None:
            continue
        if any(f.name == g.name for g in found):
            f = Found(f"{f.name}-{f.port}", f.label, f.port, f.protocol, f.models)
        found.append(f)
    return found


def with_providers(settings: Settings, found: list[Found]) -> Settings:
    """`settings` serving what was found, by priority in probe order (10, 20, ...)."""
    providers = [
        ProviderConfig(name=f.name, type=f.protocol, base_url=f.base_url, priority=10 * (i + 1))
        for i, f in enumerate(found)
    ]
    return settings.model_copy(update={"providers": providers})


def what_to_set(servers: list[LocalServer], *, probed: bool) -> str:
    """One screen: why the daemon cannot serve yet, and each way to give it a provider."""
    tried = ", ".join(f"{s.label} :{s.port}" for s in servers) or "none"
    head = (
        ["no local model server answered", f"  (tried {HOST}: {tried})."]
        if probed
        else [
            "looking for local model servers is off",
            "  (auto_discover_local: false or MODEL_BROKER_DISCOVER_LOCAL=0).",
        ]
    )
    rows = []
    for k in kinds.KINDS.values():
        if k.key_env:
            rows.append((f"{k.key_env}=...", f"{k.name}, with its API key"))
        if k.base_url_env and not k.needs_key:  # a URL alone makes a provider only where no key is needed
            example = "http://127.0.0.1:8000/v1" if k.name == "openai" else k.default_base_url
            note = "an OpenAI-compatible server: vLLM, llama.cpp..." if k.name == "openai" else k.name
            rows.append((f"{k.base_url_env}={example}", note))
        if k.host_env:
            rows.append((f"{k.host_env}=127.0.0.1:11434", f"{k.name} on another host or port"))
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"model-broker: warning: no providers configured, and {head[0]}",
        head[1],
        "It runs, but cannot answer completions (readiness stays NOT_SERVING). Give it a provider:",
        "",
        "  in the environment, then restart:",
        *(f"    {var:<{width}}{what}" for var, what in rows),
        "",
        "  or start a local server (e.g. `ollama serve`) and restart,",
        "  or a config file (`model-broker config check FILE` checks it):",
        "    model-broker serve --config broker.yaml",
        "",
        "    providers:",
        "      - name: openai",
        f"        type: openai  # {' | '.join(kinds.names())}",
        "        api_key: ${OPENAI_API_KEY}",
        "",
        "  (the probe: off with auto_discover_local: false in the config, or MODEL_BROKER_DISCOVER_LOCAL=0)",
    ]
    return "\n".join(lines)


def first_run(settings: Settings, *, worker: bool = False, export: bool = False) -> Settings:
    """`settings` (which hold no provider) plus the local servers that answer; when none
    does, or discovery is off, the screen of what to set goes to stderr. A ConfigError for a
    malformed MODEL_BROKER_DISCOVER_PORTS. `export`: a `--workers` parent leaves its finds in
    FOUND_ENV for its workers; a `worker` takes them from there, quietly, instead of probing."""
    if worker and FOUND_ENV in os.environ:
        found = [Found(**f) for f in json.loads(os.environ[FOUND_ENV])]
        return with_providers(settings, found) if found else settings
    if not enabled(settings):
        print(what_to_set([], probed=False), file=sys.stderr)
        return settings
    servers = probe_ports()
    found = asyncio.run(discover(servers))
    if export:
        os.environ[FOUND_ENV] = json.dumps([asdict(f) for f in found])
    if not found:
        print(what_to_set(servers, probed=True), file=sys.stderr)
        log.info("local_servers_none", probed=[f"{s.label} {HOST}:{s.port}" for s in servers])
        return settings
    for f in found:
        said = f"found {f.label} at {f.address} ({f.models} model{'s' if f.models != 1 else ''})"
        log.info(
            "local_server_found",
            message=said,
            server=f.label,
            address=f.address,
            provider=f.name,
            models=f.models,
        )
        print(f"model-broker: {said}: serving it as provider {f.name!r}", file=sys.stderr)
    return with_providers(settings, found)
