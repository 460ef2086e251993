"""Reloading the config without a restart: SIGHUP, or the config file changing on disk.

Trigger: `serve` turns SIGHUP into a reload, and `Reloader.start` watches the file the
daemon was started with (`--config` / MODEL_BROKER_CONFIG) and every provider's
`api_key_file`. The watch polls `os.stat` of each path every `reload.poll_seconds`: the
resolved path, device, inode, mtime and size, so an edit in place, an atomic rename, and a
Kubernetes ConfigMap or Secret volume (where the file is a symlink through `..data`, and
an update swaps that symlink to a new directory) are all seen, on any filesystem, without
inotify (which does not follow the swap). A daemon started without a file (environment
or preset) has nothing to re-read: SIGHUP then logs that and changes nothing.

One reload, under a lock (a signal and the watch never overlap):

1. validate: `load_settings` (every problem with its path, as `config check` gives them),
   then the registry for it (catalogue overrides, unreadable key files), then the new or
   changed providers are opened, listed (at most `health.timeout_seconds`) and checked.
   Any problem: each is logged (`config_reload_problem`, with `path`), the running config
   stays as it was, and `modelbroker_config_reloads_total{result="failure"}` counts it.
2. swap (`BrokerServer.apply`): providers, aliases, catalogue overrides, routing, health
   and discovery settings, and caller keys with their limits and budgets, all at once,
   with no await in between. Calls running keep the services they started with, so a
   stream in flight finishes on the provider, key and routing it began with.
3. retire: a provider the new config removed, or replaced (its settings or key changed),
   drains: it is closed once every call that was running at the swap has ended, or after
   `reload.drain_seconds`. An unchanged provider is carried over as it is (connections,
   model listings, health, and with unchanged routing its breaker and retry budget).

Sections the running process cannot change (server, tls, metrics, state, tracing) keep
their running values; a reload that changes them says which keys need a restart
(`restart_required`) and applies the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from broker.config import ConfigError, Settings, load_settings
from broker.health import NOT_SERVING, provider_service
from broker.providers.base import Provider
from broker.registry import ProviderState, Registry

if TYPE_CHECKING:
    from broker.server import BrokerServer

log = structlog.get_logger("broker.reload")

# Sections a running daemon keeps: changing them needs a restart.
RESTART_SECTIONS = ("server", "tls", "metrics", "state", "tracing")
# After the watch sees a change, it waits this long and looks again before reading, so a
# writer that is not atomic (an editor saving in place) has finished.
SETTLE_SECONDS = 0.1
# How often a drain looks whether the calls it waits for have ended.
DRAIN_POLL_SECONDS = 0.1
# A poll interval of 0 turns the watch off; it looks again this often whether a reload
# turned it back on.
IDLE_POLL_SECONDS = 1.0

Signature = tuple[tuple[str, tuple[Any, ...]], ...]


def file_signature(path: Path) -> tuple[Any, ...]:
    """What changes when a file is edited, replaced, or swapped under a symlink."""
    try:
        st = os.stat(path)  # follows symlinks: the file a ConfigMap's ..data points at now
        return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError as exc:
        return ("unreadable", exc.errno)


def _split(problem: str) -> tuple[str, str]:
    path, sep, message = problem.partition(": ")
    return (path, message) if sep else ("(file)", problem)


def _changed_keys(old: Any, new: Any, prefix: str) -> list[str]:
    """The dotted keys whose values differ between two dumps of a section."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out.extend(_changed_keys(old.get(key), new.get(key), f"{prefix}.{key}"))
        return out
    return [] if old == new else [prefix]


class Reloader:
    """SIGHUP and the file watch -> validate -> `BrokerServer.apply` -> retire what the new config dropped."""

    def __init__(self, server: BrokerServer, path: str | os.PathLike[str] | None) -> None:
        self.server = server
        self.path = Path(path) if path is not None else None
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # reloads from SIGHUP, and drains
        # Providers a reload retired that are not closed yet.
        self._retired: dict[int, Provider] = {}
        self._seen: Signature = ()
        self._started = False  # SIGHUP before the server has started is not a reload
        self.reloads = 0  # applied since start

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Watch the config file (when there is one) for changes."""
        self._started = True
        if self.path is None or self._watch is not None:
            return
        self._seen = self._signature(self.server.settings)
        self._watch = asyncio.create_task(self._watch_loop(), name="config-watch")

    def on_sighup(self) -> None:
        """The SIGHUP handler (installed by serve_until_signal): reload in the background."""
        if not self._started:
            # Still starting (the file was read moments ago): there is nothing to swap yet.
            log.warning("config_reload_skipped", trigger="sighup", reason="the daemon is still starting")
            return
        self._spawn(self.reload("sighup"), "config-reload")

    async def close(self) -> None:
        """Stop watching; close every retired provider now (the server is stopping)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for provider in list(self._retired.values()):
            await provider.close()
        self._retired.clear()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the watch ----------------------------------------------------------------------------------

    def _signature(self, settings: Settings) -> Signature:
        paths = [self.path] if self.path is not None else []
        paths += [p.api_key_file for p in settings.providers if p.api_key_file is not None]
        return tuple((str(p), file_signature(p)) for p in paths)

    async def _watch_loop(self) -> None:
        while True:
            interval = self.server.settings.reload.poll_seconds
            await asyncio.sleep(interval if interval > 0 else IDLE_POLL_SECONDS)
            if interval <= 0 or self._signature(self.server.settings) == self._seen:
                continue
            await asyncio.sleep(SETTLE_SECONDS)
            try:
                await self.reload("file")
            except Exception:  # a bug must not end the watch
                log.exception("config_reload_crashed")

    # --- one reload -----------------------------------------------------------------------------------

    async def reload(self, trigger: str) -> bool:
        """Re-read the config and apply it; False (the running config kept) if it is invalid."""
        if self.path is None:
            log.warning(
                "config_reload_skipped",
                trigger=trigger,
                reason="the daemon was started without a config file (environment or preset): "
                "nothing to re-read; restart it to change the config",
            )
            return False
        async with self._lock:
            return await self._reload(trigger, self.path)

    async def _reload(self, trigger: str, path: Path) -> bool:
        t0 = time.monotonic()
        server = self.server
        old, old_registry = server.settings, server.registry
        # Taken before the file is read: a change made while this reload runs is seen by the
        # next poll, not lost.
        before = self._signature(old)
        try:
            settings, restart = self._validate(load_settings(path))
            registry = await self._open(settings, old_registry)
        except ConfigError as exc:
            self._seen = before
            problems = exc.problems
            for problem in problems:
                where, message = _split(problem)
                log.error("config_reload_problem", file=str(path), path=where, problem=message)
            log.error(
                "config_reload_failed",
                trigger=trigger,
                file=str(path),
                problems=len(problems),
                kept="the running config",
            )
            server.metrics.config_reloads.labels("failure").inc()
            return False

        # Calls running now may use what the swap retires: the drain waits for them.
        running = server.servicer.scopes.running()
        server.apply(settings, registry)
        # -- swapped: new RPCs see the new config from here on --
        self.reloads += 1
        await old_registry.stop_background()
        kept = {id(s.provider) for s in registry.providers}
        retired = [s for s in old_registry.providers if id(s.provider) not in kept]
        names = {s.name for s in registry.providers}
        for s in retired:
            self._retired[id(s.provider)] = s.provider
            if s.name not in names:
                await server.health.servicer.set(provider_service(s.name), NOT_SERVING)
        await server.health.update_readiness()
        if retired:
            self._spawn(self._drain(retired, running, settings.reload.drain_seconds), "config-drain")
        # The key files as read for the new registry; the config file as it was before it was read.
        seen = dict(self._signature(settings))
        seen[str(path)] = dict(before)[str(path)]
        self._seen = tuple(seen.items())
        old_names = {s.name for s in old_registry.providers}
        replaced = sorted(s.name for s in registry.fresh if s.name in old_names)
        log.info(
            "config_reloaded",
            trigger=trigger,
            file=str(path),
            providers=[s.name for s in registry.providers],
            added=sorted(s.name for s in registry.fresh if s.name not in old_names),
            removed=sorted(old_names - names),
            replaced=replaced,
            aliases=len(settings.aliases),
            keys=len(settings.auth.keys),
            draining=len(retired),
            in_flight=len(running),
            restart_required=restart,
            duration_ms=round((time.monotonic() - t0) * 1000, 1),
        )
        if restart:
            log.warning(
                "config_reload_restart_required",
                keys=restart,
                detail="these keys changed in the file but keep their running values until a restart",
            )
        server.metrics.config_reloads.labels("success").inc()
        return True

    def _validate(self, new: Settings) -> tuple[Settings, list[str]]:
        """The new settings with the running values of the sections only a restart changes, and
        the keys that differ there; every api_key_file readable (a path per problem)."""
        if not new.enabled_providers():
            # At start that is a warning (first-run discovery may fill it); on a running daemon
            # it is most likely a truncated or emptied file, and would take every provider away.
            raise ConfigError(
                [
                    "providers: the new config enables no provider, so the daemon would serve nothing; "
                    "the running providers are kept (restart the daemon to run without any)"
                ],
                str(self.path),
            )
        problems: list[str] = []
        for i, p in enumerate(new.providers):
            if p.api_key_file is not None:
                try:
                    p.resolved_api_key()
                except OSError as exc:
                    problems.append(
                        f"providers[{i}].api_key_file: cannot read {p.api_key_file}: {exc.strerror}"
                    )
        if problems:
            raise ConfigError(problems, str(self.path))
        old = self.server.settings
        restart: list[str] = []
        for section in RESTART_SECTIONS:
            restart += _changed_keys(
                getattr(old, section).model_dump(mode="json"),
                getattr(new, section).model_dump(mode="json"),
                section,
            )
        return new.model_copy(update={s: getattr(old, s) for s in RESTART_SECTIONS}), restart

    async def _open(self, settings: Settings, previous: Registry) -> Registry:
        """The registry for `settings`, its new providers open, listed and checked (bounded)."""
        try:
            registry = Registry(settings, previous=previous)  # catalogue overrides raise ConfigError
        except (OSError, ValueError) as exc:
            raise ConfigError([f"providers: {exc}"], str(self.path)) from exc
        index = {p.name: i for i, p in enumerate(settings.providers)}
        problems: list[str] = []
        try:
            for s in registry.fresh:
                try:
                    await s.provider.start()
                except Exception as exc:  # a private CA file that will not load, say
                    problems.append(f"providers[{index[s.name]}]: cannot start: {type(exc).__name__}: {exc}")
            if problems:
                raise ConfigError(problems, str(self.path))
            await registry.start(discovery_wait=settings.health.timeout_seconds)
            # Checked before the swap, so readiness does not dip while a replaced provider's
            # successor has not been checked yet.
            await asyncio.gather(*(self.server.health._check(s) for s in registry.fresh))
        except BaseException:
            # Refused, or cancelled (the server stopping): what was opened for it is closed.
            await registry.stop_background()
            for s in registry.fresh:
                await s.provider.close()
            raise
        return registry

    async def _drain(
        self, retired: list[ProviderState], running: frozenset[asyncio.Task[Any]], limit: float
    ) -> None:
        """Close `retired` providers once the calls running at the swap have ended (at most `limit` s)."""
        t0 = time.monotonic()
        scopes = self.server.servicer.scopes
        try:
            while True:
                left = running & scopes.running()
                if not left or time.monotonic() - t0 >= limit:
                    break
                await asyncio.sleep(DRAIN_POLL_SECONDS)
        finally:
            cut = len(running & scopes.running())
            for s in retired:
                provider = self._retired.pop(id(s.provider), None)
                if provider is None:
                    continue
                await provider.close()
                log.info(
                    "provider_closed",
                    provider=s.name,
                    reason="retired by a config reload",
                    waited_ms=round((time.monotonic() - t0) * 1000, 1),
                    **({"cut": cut} if cut else {}),
                )
