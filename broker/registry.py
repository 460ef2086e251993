"""Providers by priority, model resolution, and the discovery cache.

Resolution of a model reference, in order:
  1. an alias from config (which may point at any of the forms below), or a group alias
     (a list): its members' candidates in member order, a fallback chain;
  2. `name/model` where `name` is a configured provider: that provider, even if discovery
     did not list the model (a model launched today must not need a release);
  3. `type/model` where `type` is a provider type ("openai"): the providers of that type;
  4. a bare id (which may itself contain '/', as vLLM model ids do): every provider that
     lists it, by priority.
The result is an ordered candidate list; routing decides what to do with more than one.

Whether a provider is local (free) or at its vendor's own endpoint (catalogue prices) is not
decided here: its type's declaration (broker/providers/kinds.py) says.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import structlog

from broker import errors
from broker.breaker import CircuitBreaker
from broker.catalog import Catalog
from broker.config import BreakerConfig, ProviderConfig, RetryConfig, Settings
from broker.providers import create_provider
from broker.providers.base import Provider
from broker.redact import redact
from broker.retry import RetryBudget
from broker.types import Capability, DiscoveredModel, ModelSpec

log = structlog.get_logger("broker.registry")

# last_error is kept at most this long (after redaction: redact first, then truncate).
MAX_LAST_ERROR_CHARS = 1024

_ALIAS_DEPTH = 5


@dataclass(eq=False)
class ProviderState:
    provider: Provider
    config: ProviderConfig
    healthy: bool | None = None  # None until the first check
    last_check_wall: float | None = None
    # The last error's text (see the `last_error` property), when it happened (wall clock),
    # and whether the provider has passed a health check since (the error is then history).
    _last_error: str = field(default="", init=False, repr=False)
    last_error_wall: float | None = field(default=None, init=False)
    last_error_resolved: bool = field(default=False, init=False)
    models: dict[str, DiscoveredModel] = field(default_factory=dict)
    discovered_at: float | None = None  # monotonic
    # Passive health (request outcomes) and the retry budget: per provider, not per model,
    # because what fails (network, overload, an outage) is the provider's.
    breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(BreakerConfig()))
    retry_budget: RetryBudget = field(default_factory=lambda: RetryBudget(RetryConfig()))

    @property
    def last_error(self) -> str:
        """The last error a health check, discovery or request met (redacted, bounded); "" if none."""
        return self._last_error

    @last_error.setter
    def last_error(self, value: str) -> None:
        text = redact(value)
        if len(text) > MAX_LAST_ERROR_CHARS:
            text = text[:MAX_LAST_ERROR_CHARS] + "..."
        self._last_error = text
        self.last_error_wall = time.time() if text else None
        self.last_error_resolved = False

    def mark_recovered(self) -> None:
        """A check passed: a last_error from before is now history (kept, with its time)."""
        if self._last_error:
            self.last_error_resolved = True

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def type(self) -> str:
        return self.config.type

    @property
    def local(self) -> bool:
        """Local models cost nothing per token (declared by the type, or the compatible vendor)."""
        vendor = self.config.compatible_vendor
        return self.config.kind.local or (vendor is not None and vendor.local)

    @property
    def vendor_endpoint(self) -> bool:
        """Serves the vendor's catalogue at the vendor's prices (see ProviderConfig.catalog_prices)."""
        if self.config.catalog_prices is not None:
            return self.config.catalog_prices
        return self.config.kind.is_vendor_host(urlparse(self.provider.base_url).hostname or "")

    def served_models(self) -> set[str]:
        return set(self.models) | set(self.config.models)


@dataclass(frozen=True, slots=True)
class Target:
    state: ProviderState
    model: str
    spec: ModelSpec

    @property
    def provider(self) -> Provider:
        return self.state.provider


def _with_pool_default(cfg: ProviderConfig, streams: int) -> ProviderConfig:
    """An unset max_connections follows server.max_concurrent_streams (the pool is never the first limit)."""
    return cfg if cfg.max_connections else cfg.model_copy(update={"max_connections": streams})


class Registry:
    def __init__(
        self, settings: Settings, catalog: Catalog | None = None, *, previous: Registry | None = None
    ) -> None:
        """`previous`: the registry a config reload replaces (broker/reload.py). A provider
        whose config (and resolved key) is unchanged keeps its transport, listings and health;
        with unchanged routing its very state (breaker, retry budget) too. Only the others are
        new (`fresh`): `start` opens those and runs their first discovery."""
        self.settings = settings
        self.catalog = catalog or Catalog.load()
        self.catalog.apply_overrides(settings.models, {p.name: p.type for p in settings.providers})
        self.providers: list[ProviderState] = [
            self._state_for(cfg, previous) for cfg in settings.enabled_providers()
        ]
        kept = {id(s.provider) for s in previous.providers} if previous is not None else set()
        self.fresh = [s for s in self.providers if id(s.provider) not in kept]
        self.by_name = {s.name: s for s in self.providers}
        self._refresher: asyncio.Task[None] | None = None
        self._first: asyncio.Task[None] | None = None
        # Providers whose discovery is running now (start-up's may outlive the wait for it).
        self.discovering: set[str] = set()

    def _state_for(self, cfg: ProviderConfig, previous: Registry | None) -> ProviderState:
        routing = self.settings.routing
        old = previous.by_name.get(cfg.name) if previous is not None else None
        if old is not None and old.config == cfg and old.provider.api_key == cfg.resolved_api_key():
            if old.breaker.settings == routing.breaker and old.retry_budget.settings == routing.retry:
                return old
            # Same upstream, new routing: the transport, listings and health carry over.
            state = ProviderState(
                provider=old.provider,
                config=cfg,
                healthy=old.healthy,
                last_check_wall=old.last_check_wall,
                models=old.models,
                discovered_at=old.discovered_at,
                breaker=CircuitBreaker(routing.breaker),
                retry_budget=RetryBudget(routing.retry),
            )
            state._last_error, state.last_error_wall = old._last_error, old.last_error_wall
            state.last_error_resolved = old.last_error_resolved
            return state
        return ProviderState(
            provider=create_provider(_with_pool_default(cfg, self.settings.server.max_concurrent_streams)),
            config=cfg,
            breaker=CircuitBreaker(routing.breaker),
            retry_budget=RetryBudget(routing.retry),
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, *, discovery_wait: float | None = None) -> None:
        """Open the fresh providers' transports and start discovery: wait for their first round
        at most `discovery_wait` seconds (None: until it ends), then let it finish in the
        background, so a hanging upstream cannot hold start-up (each listing is bounded on its
        own too). Providers carried over from a previous registry are already open."""
        for s in self.fresh:
            await s.provider.start()
        self._first = asyncio.create_task(self.refresh(force=True, only=self.fresh), name="discovery-first")
        self._refresher = asyncio.create_task(self._refresh_loop(self._first), name="discovery-refresh")
        await self.first_discovery(discovery_wait)

    async def first_discovery(self, timeout: float | None) -> bool:
        """Wait at most `timeout` seconds (None: no limit) for start-up's discovery; True once it ended."""
        first = self._first
        if first is None or first.done():
            return True
        if timeout is not None and timeout <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(first), timeout)
        return first.done()

    async def close(self) -> None:
        await self.stop_background()
        for s in self.providers:
            await s.provider.close()

    async def stop_background(self) -> None:
        """Stop discovery (a replaced registry: its providers may live on in the next one)."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._first is not None and not self._first.done():
            self._first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._first

    async def _refresh_loop(self, first: asyncio.Task[None] | None = None) -> None:
        if first is not None:
            try:
                await first
            finally:
                first.cancel()  # cancelled with us (close() during start-up): stop it too
        while True:
            await asyncio.sleep(self.settings.discovery.ttl_seconds)
            await self.refresh()

    async def refresh(self, *, force: bool = False, only: list[ProviderState] | None = None) -> None:
        """Re-list models where the cache is older than the TTL (`force`: all of `only`, default
        every provider); a failure keeps the old list."""
        ttl = self.settings.discovery.ttl_seconds
        now = time.monotonic()
        due = [
            s
            for s in (self.providers if only is None else only)
            if s.config.discovery and (force or s.discovered_at is None or now - s.discovered_at >= ttl)
        ]
        await asyncio.gather(*(self._discover(s) for s in due))

    async def _discover(self, s: ProviderState) -> None:
        self.discovering.add(s.name)
        try:
            found = await asyncio.wait_for(s.provider.list_models(), self.settings.health.timeout_seconds * 5)
        except (errors.BrokerError, TimeoutError) as exc:
            s.last_error = str(exc) or "discovery timed out"  # redacted, then bounded
            log.warning("discovery_failed", provider=s.name, error=s.last_error)
            return
        finally:
            self.discovering.discard(s.name)
        s.models = {m.name: m for m in found}
        s.discovered_at = time.monotonic()
        log.info("discovered", provider=s.name, models=len(s.models))

    # --- model facts ------------------------------------------------------------------------------

    def spec(self, s: ProviderState, model: str) -> ModelSpec:
        return self.catalog.spec_for(
            s.name,
            s.type,
            model,
            s.models.get(model),
            vendor_endpoint=s.vendor_endpoint,
            local=s.local,
            catalog_key=s.config.catalog_key(model),
        )

    def list_models(
        self, provider: str = "", capabilities: frozenset[Capability] = frozenset()
    ) -> list[ModelSpec]:
        out: list[ModelSpec] = []
        for s in self.providers:
            if provider and s.name != provider:
                continue
            names = s.served_models()
            if s.vendor_endpoint:
                # The vendor's own endpoint serves the catalogue's models even before discovery answers.
                names |= self.catalog.models_for(s.type)
            names |= self.catalog.override_models(s.name)
            for name in sorted(names):
                spec = self.spec(s, name)
                if capabilities and not (spec.capabilities_known and capabilities <= spec.capabilities):
                    continue
                out.append(spec)
        return out

    # --- resolution ------------------------------------------------------------------------------

    def resolve(self, ref: str, *, _depth: int = 0) -> list[Target]:
        """Candidates for a model reference, in priority order; NOT_FOUND when there are none."""
        original = ref
        for _ in range(_ALIAS_DEPTH):
            if ref not in self.settings.aliases:
                break
            alias_target = self.settings.aliases[ref]
            if isinstance(alias_target, list):
                return self._resolve_group(original, ref, alias_target, _depth)
            ref = alias_target
        targets = self._resolve_plain(ref)
        if not targets:
            raise errors.ModelNotFound(self._not_found_message(original, ref), model=original)
        return targets

    def _resolve_group(self, original: str, group: str, members: list[str], depth: int) -> list[Target]:
        """A fallback group: its members' candidates in member order, each provider/model once.

        A member that resolves to nothing (its provider disabled, say) is skipped, so one
        config serves every deployment; NOT_FOUND only when no member resolves.
        """
        if depth >= _ALIAS_DEPTH:
            raise errors.ModelNotFound(
                f"alias {original!r}: groups nest deeper than {_ALIAS_DEPTH} (a loop?)", model=original
            )
        out: list[Target] = []
        seen: set[tuple[str, str]] = set()
        for member in members:
            try:
                targets = self.resolve(member, _depth=depth + 1)
            except errors.ModelNotFound:
                continue
            for t in targets:
                if (t.state.name, t.model) not in seen:
                    seen.add((t.state.name, t.model))
                    out.append(t)
        if not out:
            raise errors.ModelNotFound(
                f"model {original!r} (group {group!r}: {', '.join(members)}) not found: no member "
                "resolves to a configured provider",
                model=original,
            )
        return out

    def _resolve_plain(self, ref: str) -> list[Target]:
        prefix, sep, rest = ref.partition("/")
        if sep and rest:
            if prefix in self.by_name:
                s = self.by_name[prefix]
                return [Target(s, rest, self.spec(s, rest))]
            of_type = [s for s in self.providers if s.type == prefix]
            if of_type:
                listing = [s for s in of_type if rest in s.served_models()]
                return [Target(s, rest, self.spec(s, rest)) for s in (listing or of_type)]
        listing = [s for s in self.providers if ref in s.served_models()]
        if not listing:
            # Discovery may have failed (or be off): the vendor endpoint still serves its catalogue.
            listing = [
                s for s in self.providers if s.vendor_endpoint and ref in self.catalog.models_for(s.type)
            ]
        return [Target(s, ref, self.spec(s, ref)) for s in listing]

    def _not_found_message(self, original: str, ref: str) -> str:
        via = f" (alias of {ref!r})" if ref != original else ""
        if not self.providers:
            return f"model {original!r}{via} not found: no providers are configured"
        names = ", ".join(s.name for s in self.providers)
        return (
            f"model {original!r}{via} not found: no provider lists it; use 'provider/model' "
            f"with one of: {names} (ListModels shows what each serves)"
        )
