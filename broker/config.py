"""Settings: one YAML file (or the environment alone), validated with pydantic.

Owns the schema, its messages, loading, presets and env auto-config. What a provider type
allows, defaults to and reads from the environment is not written here: it comes from its
declaration in broker/providers/kinds.py.

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
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from broker.providers import kinds
from broker.redact import register_secret, register_url_credentials

PRESETS = ("development", "cloud-only", "local-only")

DEFAULT_LISTEN = "127.0.0.1:50051"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,62}$")
_AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_AZURE_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
_DEPLOYMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_GCP_PROJECT = re.compile(r"^([a-z0-9][a-z0-9.\-]{0,62}:)?[a-z][a-z0-9\-]{4,28}[a-z0-9]$")
_GCP_LOCATION = re.compile(r"^[a-z][a-z0-9\-]{0,40}[a-z0-9]$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderConfig(_Strict):
    name: str
    # A declared provider type (broker/providers/kinds.py): the wire protocol.
    type: str
    # A compatible vendor's row (kinds.VENDORS, e.g. groq for `type: openai`): its base_url.
    vendor: str | None = None
    base_url: str = ""  # empty: the vendor's, else the type's default (Ollama: $OLLAMA_HOST)
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    priority: int = Field(default=100, ge=0)
    enabled: bool = True
    # Extra headers on every upstream request (e.g. OpenAI-Organization).
    headers: dict[str, str] = Field(default_factory=dict)
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    # Longest wait for the next byte from the upstream (time to first token, stalls).
    read_timeout_seconds: float = Field(default=120.0, gt=0)
    # Inside a stream: longest wait from sending the request to the first token (retryable:
    # nothing reached the caller yet), and longest silence between chunks after it (a stall
    # after content interrupts the stream). Generous by default: reasoning models and cold
    # local models can think for a minute or more before their first token.
    ttft_timeout_seconds: float = Field(default=120.0, gt=0)
    stall_timeout_seconds: float = Field(default=60.0, gt=0)
    # Pooled connections to this upstream; unset: server.max_concurrent_streams, so the pool
    # is never the first limit a load meets. A request waits for a free one within its
    # deadline (or pool_timeout_seconds), then fails with BROKER_POOL_FULL.
    max_connections: int | None = Field(default=None, ge=1)
    pool_timeout_seconds: float = Field(default=30.0, gt=0)
    # An HTTP(S) proxy for this upstream (userinfo carries its credentials); overrides
    # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, which apply otherwise.
    proxy: SecretStr | None = None
    # A private CA bundle (PEM) trusted for this upstream besides the system's.
    tls_ca_file: Path | None = None
    # Longest SSE or NDJSON line accepted from the upstream, and the most bytes a compressed
    # answer may inflate to (the broker asks for identity; this bounds one that compresses anyway).
    max_line_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_decompressed_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Models served even if discovery does not list them (and for servers with no listing).
    models: list[str] = Field(default_factory=list)
    discovery: bool = True
    # Bill at the catalogue's prices? Default (unset): only on the vendor's own endpoint
    # (api.openai.com, api.anthropic.com); a proxy to the vendor can set true.
    catalog_prices: bool | None = None
    # Output limit sent when a request sets no max_tokens, capped by the model's max output.
    # Unset: Anthropic (which requires one) gets 4096; OpenAI and Ollama send none.
    default_max_tokens: int | None = Field(default=None, ge=1)
    # openai type: the output-limit field. auto: max_completion_tokens for reasoning models
    # (o-series, gpt-5 family: catalogue flag, else the id), max_tokens otherwise.
    max_tokens_field: Literal["auto", "max_tokens", "max_completion_tokens"] = "auto"
    # Embed: at most this many inputs per upstream call (a bigger batch is split, the parts
    # sent concurrently and reassembled in order). Unset: openai 2048 (the API's limit),
    # ollama 512.
    embed_batch_size: int | None = Field(default=None, ge=1, le=2048)
    # Embed: at most this many parts of one split batch in flight at once.
    embed_concurrency: int = Field(default=4, ge=1, le=64)
    # bedrock: the AWS region (required): the runtime host bedrock-runtime.{region}.amazonaws.com,
    # the control plane bedrock.{region}.amazonaws.com and the SigV4 signing region. base_url
    # only overrides the host; credentials come from the AWS chain (AWS_* env, AWS_PROFILE, IRSA).
    region: str | None = None
    # azure_openai: the deployments route's api-version (/openai/deployments/{name}/...?api-version=);
    # unset: the /openai/v1/ route, with the deployment name as the body's model.
    api_version: str | None = None
    # azure_openai: deployment name -> the OpenAI model it runs, for catalogue facts and prices.
    deployments: dict[str, str] = Field(default_factory=dict)
    # vertex: the Google Cloud project (required) and location (unset: global) of every call:
    # {location}-aiplatform.googleapis.com/.../projects/{project}/locations/{location}/...
    project: str | None = None
    location: str | None = None
    # vertex: a service-account (or other google-auth) JSON key file; unset: Application
    # Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's ADC file, the metadata server).
    credentials_file: Path | None = None

    @field_validator("name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                "must be lowercase letters, digits, '_', '-' or '.', starting with a letter or digit"
            )
        return v

    @field_validator("type", mode="before")
    @classmethod
    def _declared_type(cls, v: Any) -> Any:
        # Checked at validation time, not frozen in a Literal: a type declared later counts.
        if not isinstance(v, str) or kinds.find(v) is None:
            raise ValueError(kinds.one_of(kinds.names()))
        return v

    @field_validator("vendor")
    @classmethod
    def _declared_vendor(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        row = kinds.VENDORS.get(v)
        if row is None:
            raise ValueError(kinds.one_of(kinds.VENDORS))
        if info.data.get("type", row.kind) != row.kind:
            raise ValueError(f"{v} speaks the {row.kind} protocol: set type: {row.kind}")
        return v

    @field_validator("base_url")
    @classmethod
    def _url_shape(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
        return v.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy_shape(cls, v: SecretStr | None) -> SecretStr | None:
        if (
            v is not None
            and v.get_secret_value()
            and not re.match(r"^https?://[^/\s]+", v.get_secret_value())
        ):
            # The value itself is not echoed: it may carry credentials.
            raise ValueError("must be an http:// or https:// proxy URL")
        return v if v is not None and v.get_secret_value() else None

    @model_validator(mode="after")
    def _one_key_source(self) -> ProviderConfig:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set api_key or api_key_file, not both")
        return self

    @field_validator("region")
    @classmethod
    def _region_shape(cls, v: str | None) -> str | None:
        if v is not None and not _AWS_REGION.match(v):
            raise ValueError(f"must be an AWS region such as us-east-1, got {v!r}")
        return v

    @field_validator("api_version")
    @classmethod
    def _api_version_shape(cls, v: str | None) -> str | None:
        if v is not None and not _AZURE_API_VERSION.match(v):
            raise ValueError(f"must be an Azure OpenAI api-version such as 2024-10-21, got {v!r}")
        return v

    @field_validator("deployments")
    @classmethod
    def _deployment_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, model in v.items():
            if not _DEPLOYMENT.match(name):
                raise ValueError(
                    f"{name!r}: a deployment name is letters, digits, '_', '-' or '.' (at most 64)"
                )
            if not model.strip():
                raise ValueError(f"{name!r}: the model it runs is empty")
        return v

    @field_validator("project")
    @classmethod
    def _project_shape(cls, v: str | None) -> str | None:
        # Project ids are 6-30 lowercase letters, digits and hyphens (legacy ones carry a
        # domain: example.com:my-project); the id goes into every request path.
        if v is not None and not _GCP_PROJECT.match(v):
            raise ValueError(f"must be a Google Cloud project id such as my-project, got {v!r}")
        return v

    @field_validator("location")
    @classmethod
    def _location_shape(cls, v: str | None) -> str | None:
        # It names the host ({location}-aiplatform.googleapis.com): letters, digits, hyphens only.
        if v is not None and not _GCP_LOCATION.match(v):
            raise ValueError(f"must be a Vertex AI location such as us-central1 or global, got {v!r}")
        return v

    @model_validator(mode="after")
    def _type_fields(self) -> ProviderConfig:
        """The cloud types' own fields: required where the type needs them, refused elsewhere."""
        if self.type == "vertex":
            if self.project is None:
                raise ValueError("project: required for type vertex (the Google Cloud project id)")
            if self.api_key is not None or self.api_key_file is not None:
                raise ValueError(
                    "api_key: type vertex authenticates with OAuth2 (credentials_file, or Application "
                    "Default Credentials when unset); for a Gemini API key use type gemini"
                )
        else:
            for key in ("project", "location", "credentials_file"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only type vertex takes {key}")
        if self.type == "bedrock" and self.region is None:
            raise ValueError("region: required for type bedrock (the AWS region, e.g. us-east-1)")
        if self.type != "bedrock" and self.region is not None:
            raise ValueError("region: only type bedrock takes a region")
        if self.type != "azure_openai":
            for key in ("api_version", "deployments"):
                if getattr(self, key):
                    raise ValueError(f"{key}: only type azure_openai takes {key}")
        elif not self.base_url:
            raise ValueError(
                "base_url: required for type azure_openai (the resource endpoint, "
                "https://<resource>.openai.azure.com)"
            )
        return self

    def catalog_key(self, model: str) -> tuple[str, str]:
        """The catalogue row describing `model` here: an Azure deployment is the OpenAI model
        it runs (`deployments`, else the deployment's own name), at OpenAI's prices."""
        if self.type == "azure_openai":
            return "openai", self.deployments.get(model, model)
        return self.type, model

    @property
    def kind(self) -> kinds.ProviderKind:
        """The declaration of this provider's type."""
        return kinds.kind(self.type)

    @property
    def compatible_vendor(self) -> kinds.CompatibleVendor | None:
        return kinds.VENDORS[self.vendor] if self.vendor is not None else None

    def resolved_base_url(self) -> str:
        if self.base_url:
            return self.base_url
        if self.compatible_vendor is not None:
            return self.compatible_vendor.base_url
        kind = self.kind
        if kind.host_env and os.environ.get(kind.host_env):
            return kind.url_from_host(os.environ[kind.host_env])
        if kind.regional_base_url and self.region:
            return kind.regional_base_url.format(region=self.region)
        if self.type == "vertex":
            return kinds.vertex_base_url(self.location or "global")
        return kind.default_base_url

    def resolved_api_key(self) -> str | None:
        """The key from api_key or api_key_file (read when the provider is made: at start, and at
        a config reload, which a change of the file starts: broker/reload.py)."""
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


class RetryConfig(_Strict):
    """Retries of one candidate before moving to the next (see broker/retry.py)."""

    # Attempts per candidate, the first included: 1 turns same-candidate retries off.
    max_attempts: int = Field(default=2, ge=1, le=10)
    # Full jitter: the n-th retry waits uniform(0, min(max, initial * 2**(n-1))).
    initial_backoff_seconds: float = Field(default=0.2, ge=0)
    max_backoff_seconds: float = Field(default=5.0, ge=0)
    # A Retry-After longer than this is not waited out: the caller gets RetryInfo instead and
    # decides (a broker sitting silent for long looks like a hang).
    max_retry_after_seconds: float = Field(default=5.0, ge=0)
    # Retries per provider may add at most budget_ratio x its requests in the window, plus
    # budget_min_retries_per_second, so a failing provider is not hammered.
    budget_ratio: float = Field(default=0.2, ge=0)
    budget_min_retries_per_second: float = Field(default=1.0, ge=0)
    budget_window_seconds: float = Field(default=10.0, gt=0)


class BreakerConfig(_Strict):
    """A circuit breaker per provider from request outcomes (see broker/breaker.py)."""

    enabled: bool = True
    # Opens on this many provider failures in a row...
    consecutive_failures: int = Field(default=5, ge=1)
    # ...or on this failure rate over window_seconds once min_requests outcomes are in it.
    error_rate: float = Field(default=0.5, gt=0, le=1)
    min_requests: int = Field(default=20, ge=1)
    window_seconds: float = Field(default=30.0, gt=0)
    # Then skips the provider this long before one half-open trial request.
    cooldown_seconds: float = Field(default=30.0, gt=0)


class RoutingConfig(_Strict):
    retry: RetryConfig = Field(default_factory=RetryConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    # A completion selected by requirements tries at most this many of the ranked models.
    max_selected_candidates: int = Field(default=3, ge=1)


class ServerConfig(_Strict):
    listen: str = DEFAULT_LISTEN
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_concurrent_rpcs: int | None = Field(default=None, ge=1)
    # In-flight Complete/StreamComplete calls, all callers together; more are refused with
    # RESOURCE_EXHAUSTED (reason BROKER_OVERLOADED). Health and reflection are not counted,
    # so probes still answer while the daemon is saturated.
    max_concurrent_streams: int = Field(default=1000, ge=1)
    # HTTP/2 keepalive: the server pings idle connections every keepalive_time and drops
    # them if no answer within keepalive_timeout; a client pinging more often than
    # min_ping_interval is sent GOAWAY (too_many_pings), so clients cannot flood it.
    keepalive_time_seconds: float = Field(default=60.0, gt=0)
    keepalive_timeout_seconds: float = Field(default=20.0, gt=0)
    min_ping_interval_seconds: float = Field(default=10.0, gt=0)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    # Send GOAWAY to a connection this old, so clients balancing round_robin over a headless
    # Service reconnect and spread onto replicas added since; in-flight streams then get
    # max_connection_age_grace_seconds to finish. Unset: connections live forever.
    max_connection_age_seconds: float | None = Field(default=None, gt=0)
    max_connection_age_grace_seconds: float = Field(default=600.0, ge=0)
    # The asyncio event loop the daemon runs on: uvloop (libuv) costs ~12% fewer
    # instructions per request than the standard library's loop (make bench-instructions);
    # "asyncio" is the fallback should a platform or a debugger need the plain loop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @field_validator("listen")
    @classmethod
    def _listen_shape(cls, v: str) -> str:
        parse_listen(v)
        return v


def _empty_is_unset(v: Any) -> Any:
    """`${VAR:-}` that resolves empty means "not set", so one file serves with and without it."""
    return None if v == "" else v


class TLSConfig(_Strict):
    """TLS on the gRPC port (PEM files, read at start); client_ca_file turns on mTLS."""

    cert_file: Path | None = None
    # validate_default: the pairing checks must run even when the key is absent.
    key_file: Path | None = Field(default=None, validate_default=True)
    # Callers must present a certificate signed by this CA; others fail the handshake.
    client_ca_file: Path | None = Field(default=None, validate_default=True)

    _unset = field_validator("cert_file", "key_file", "client_ca_file", mode="before")(_empty_is_unset)

    @field_validator("key_file")
    @classmethod
    def _paired(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        has_cert = info.data.get("cert_file") is not None
        if has_cert and v is None:
            raise ValueError("required when tls.cert_file is set")
        if v is not None and not has_cert:
            raise ValueError("set without tls.cert_file")
        return v

    @field_validator("client_ca_file")
    @classmethod
    def _needs_server_cert(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and info.data.get("cert_file") is None:
            raise ValueError("mTLS needs TLS: set tls.cert_file and tls.key_file too")
        return v

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class MetricsConfig(_Strict):
    # HOST:PORT of the Prometheus /metrics endpoint; unset (the default) serves none.
    listen: str | None = None

    _unset = field_validator("listen", mode="before")(_empty_is_unset)

    @field_validator("listen")
    @classmethod
    def _listen_shape(cls, v: str | None) -> str | None:
        if v is not None:
            parse_listen(v)
        return v


_OTLP_ENDPOINT = re.compile(
    r"^(https?://)?[^/\s:]+(:\d{1,5})?/?$|^(https?://)?\[[0-9A-Fa-f:.]+\](:\d{1,5})?/?$"
)


class TracingConfig(_Strict):
    """OpenTelemetry traces over OTLP/gRPC (broker/tracing.py). Off unless `enabled` or
    OTEL_TRACES_EXPORTER=otlp; OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn it
    off whatever this says. A key left unset here falls back to its OTEL_* variable."""

    enabled: bool = False
    # The collector's OTLP/gRPC address; unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then
    # OTEL_EXPORTER_OTLP_ENDPOINT, then http://localhost:4317. http:// is plaintext.
    endpoint: str | None = None
    # Unset: OTEL_SERVICE_NAME, else "model-broker".
    service_name: str | None = None
    # Prompt and answer text on the attempt spans (gen_ai.input.messages / output.messages,
    # redacted and bounded). Off: spans carry counts, models and outcomes, never text.
    capture_content: bool = False

    _unset = field_validator("endpoint", "service_name", mode="before")(_empty_is_unset)

    @field_validator("endpoint")
    @classmethod
    def _endpoint_shape(cls, v: str | None) -> str | None:
        if v is not None and not _OTLP_ENDPOINT.match(v):
            raise ValueError(f"must be HOST:PORT or http(s)://HOST:PORT (OTLP over gRPC), got {v!r}")
        return v


class ReloadConfig(_Strict):
    """Reloading the config without a restart (broker/reload.py): SIGHUP, or the file changing."""

    # How often the config file (and every api_key_file) is checked for a change; 0: only
    # SIGHUP reloads.
    poll_seconds: float = Field(default=5.0, ge=0)
    # A provider removed or replaced by a reload keeps serving the requests that started on
    # it for at most this long, then it is closed (what is still running then fails).
    drain_seconds: float = Field(default=600.0, ge=0)


class ModelOverride(_Strict):
    """A catalogue entry added or overridden by config: `provider/model` plus facts."""

    id: str
    context_window: int | None = Field(default=None, ge=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    vision: bool | None = None
    tools: bool | None = None
    json_mode: bool | None = None
    reasoning: bool | None = None
    structured_outputs: bool | None = None
    documents: bool | None = None
    input_usd_per_mtok: float | None = Field(default=None, ge=0)
    output_usd_per_mtok: float | None = Field(default=None, ge=0)
    cached_input_usd_per_mtok: float | None = Field(default=None, ge=0)

    @field_validator("id")
    @classmethod
    def _prefixed(cls, v: str) -> str:
        if "/" not in v or v.startswith("/") or v.endswith("/"):
            raise ValueError(f"must be 'provider/model', got {v!r}")
        return v


_CALLER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _model_glob(v: str) -> str:
    # A pattern without '/' can never match "provider/model": surely a mistake.
    if v != "*" and ("/" not in v or v.startswith("/")):
        raise ValueError(f"must be a glob over 'provider/model' like 'openai/*', got {v!r}")
    return v


ModelGlob = Annotated[str, AfterValidator(_model_glob)]


class CallerKey(_Strict):
    """One caller's API key, stored only as its SHA-256 (see `model-broker keys create`)."""

    name: str
    sha256: str
    # Globs over "provider/model" (provider = its configured name); None (absent) = all models.
    allow_models: list[ModelGlob] | None = None
    # Limits; None (absent) = unlimited. Buckets refill continuously (rate/60 per second).
    requests_per_minute: int | None = Field(default=None, ge=1)
    # How many requests may arrive at once before the per-minute rate applies; default: a
    # whole minute's allowance (requests_per_minute).
    burst: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    max_concurrent_streams: int | None = Field(default=None, ge=1)
    # Spend per UTC day and month, in USD; None = no budget. A request is admitted while the
    # window's spend is under it (the cost of each request is charged when it ends), so a
    # budget can be overshot by the requests in flight when it is reached.
    budget_usd_per_day: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    budget_usd_per_month: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # GetUsage with this key sees every key's usage (others see only their own).
    admin: bool = False

    @field_validator("name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        if not _CALLER_NAME.match(v):
            raise ValueError("must be 1-63 letters, digits, '_', '-' or '.', starting with a letter or digit")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        # Never echo the value: an operator may have pasted the key itself here.
        v = v.strip().lower()
        if not _SHA256_HEX.match(v):
            hint = " (this looks like a key: store only its hash)" if v.startswith("mb_") else ""
            raise ValueError(
                f"must be the 64-character hex SHA-256 of the key, from `model-broker keys hash`; "
                f"got {len(v)} characters{hint}"
            )
        if any(v == v[:n] * (64 // n) for n in (1, 2, 4, 8)):
            # All zeros (the deploy ConfigMap's placeholder), one repeated digit or a short
            # repeated run: no key hashes to that, so every call would fail API_KEY_INVALID.
            raise ValueError(
                f"is a placeholder ({v[:4]}...), not the hash of a key: replace it with the sha256 "
                "from `model-broker keys create` (or `keys hash`)"
            )
        return v

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> CallerKey:
        if self.burst is not None and self.requests_per_minute is None:
            raise ValueError("burst is only meaningful with requests_per_minute")
        return self


class AuthConfig(_Strict):
    # No keys: auth is off and every caller is let in (serve warns beyond loopback).
    keys: list[CallerKey] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> AuthConfig:
        names: set[str] = set()
        hashes: set[str] = set()
        for i, k in enumerate(self.keys):
            if k.name in names:
                raise ValueError(f"auth.keys[{i}].name: duplicate key name {k.name!r}")
            if k.sha256 in hashes:
                raise ValueError(
                    f"auth.keys[{i}].sha256: the same key is already configured under another name"
                )
            names.add(k.name)
            hashes.add(k.sha256)
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


_REDIS_URL = re.compile(r"^(redis|rediss|unix)://\S+$")


class StateConfig(_Strict):
    """Where caller limits, budgets and spend live (broker/state/): Redis, or each process."""

    # redis://[:password@]host:port/db, rediss:// (TLS) or unix:///path.sock. Unset: every
    # process keeps its own limits and spend (lost on restart), as before Redis.
    redis_url: str | None = None
    # Every key the broker writes starts with this (several brokers can share one Redis).
    key_prefix: str = Field(
        default="modelbroker", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$"
    )
    # Redis down or slower than timeout_seconds: fail_open admits with per-process limits
    # and the last known spend (charges are replayed when Redis returns); fail_closed refuses
    # keys with limits or budgets (UNAVAILABLE STATE_UNAVAILABLE) and readiness turns NOT_SERVING.
    on_unavailable: Literal["fail_open", "fail_closed"] = "fail_open"
    # The longest one Redis call may take (admission, charge, heartbeat, GetUsage).
    timeout_seconds: float = Field(default=0.25, gt=0, le=30)
    # While Redis is unavailable, the reconnect probe backs off up to this (full jitter).
    reconnect_max_backoff_seconds: float = Field(default=5.0, gt=0, le=300)
    # A stream slot's lease in Redis: each replica refreshes its slots every third of it, so
    # the slots of a replica that died are free again within this long.
    stream_lease_seconds: float = Field(default=30.0, ge=0.3, le=3600)
    max_connections: int = Field(default=64, ge=1, le=10_000)
    # A key with a budget asking for a model with no known price: deny refuses it before
    # any upstream call (FAILED_PRECONDITION MODEL_UNPRICED); allow serves it, charged 0
    # and counted as unpriced. Keys without a budget are never refused for this.
    unpriced: Literal["allow", "deny"] = "deny"

    _unset = field_validator("redis_url", mode="before")(_empty_is_unset)

    @field_validator("redis_url")
    @classmethod
    def _url_shape(cls, v: str | None) -> str | None:
        if v is not None and not _REDIS_URL.match(v):
            # Not echoed: it may carry a password.
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v


class Settings(_Strict):
    providers: list[ProviderConfig] = Field(default_factory=list)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    # alias -> "provider/model" or bare model id; or a list of them: a fallback group whose
    # members are tried in order (the next only after a retryable failure before output).
    aliases: dict[str, str | list[str]] = Field(default_factory=dict)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    models: list[ModelOverride] = Field(default_factory=list)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    # No provider at all: `serve` looks for model servers on 127.0.0.1 (Ollama, LM Studio,
    # llama.cpp, vLLM at their default ports) and serves those that answer (broker/discover_local.py).
    auto_discover_local: bool = True
    state: StateConfig = Field(default_factory=StateConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    reload: ReloadConfig = Field(default_factory=ReloadConfig)

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
            if isinstance(target, list):
                for i, member in enumerate(target):
                    if not member.strip():
                        raise ValueError(f"aliases.{alias}[{i}]: group member must not be empty")
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
    return kinds.kind("ollama").url_from_host(value)


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
            # Model-level messages carry their own path.
            if msg.startswith(("providers[", "aliases.", "auth.keys[")):
                problems.append(msg)
            else:
                problems.append(f"{_path(tuple(e['loc']))}: {msg}")
    else:
        if not problems:
            for p in settings.providers:
                if p.api_key is not None:
                    register_secret(p.api_key.get_secret_value())
                for value in p.headers.values():  # any header may carry a credential
                    register_secret(value)
                if p.proxy is not None:
                    register_secret(p.proxy.get_secret_value())
                    register_url_credentials(p.proxy.get_secret_value())
                register_url_credentials(p.base_url)
            register_url_credentials(settings.state.redis_url)
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
    """No file: a provider for each declared type whose variables are set (OPENAI_API_KEY or
    OPENAI_BASE_URL, ANTHROPIC_API_KEY (+ ANTHROPIC_BASE_URL), OLLAMA_HOST), then one for each
    compatible vendor whose key variable is; priorities 10, 20, 30... in declaration order."""
    env = os.environ if env is None else env

    def var(name: str | None) -> str:
        return env.get(name, "") if name else ""

    providers: list[dict[str, Any]] = []
    for i, kind in enumerate(kinds.KINDS.values()):
        key, base_url, host = var(kind.key_env), var(kind.base_url_env), var(kind.host_env)
        key = key or next((v for name in kind.more_key_envs if (v := var(name))), "")
        if not key and (kind.needs_key or not (base_url or host)):
            continue
        p: dict[str, Any] = {"name": kind.name, "type": kind.name, "priority": 10 * (i + 1)}
        if base_url or host:
            p["base_url"] = base_url or kind.url_from_host(host)
        if key:
            p["api_key"] = key
        providers.append(p)
    for i, vendor in enumerate(kinds.VENDORS.values(), start=len(kinds.KINDS)):
        if key := var(vendor.key_env):
            providers.append(
                {
                    "name": vendor.name,
                    "type": vendor.kind,
                    "vendor": vendor.name,
                    "priority": 10 * (i + 1),
                    "api_key": key,
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
        if p.proxy is not None:
            p_out["proxy"] = p.proxy.get_secret_value() if reveal_secrets else "**********"
        if p.headers and not reveal_secrets:
            p_out["headers"] = dict.fromkeys(p.headers, "**********")
    return yaml.safe_dump(data, sort_keys=False)
