"""Config reload without a restart, against a real `model-broker serve` process.

The daemon watches its config file; the tests rewrite it (atomically, as an editor or a
deploy tool does) while streams are in flight from an upstream that holds every stream after
its first chunk until the test lets go, so "in flight during the reload" is a fact, not a
race. What a user checks: the streams complete on what they started with, new requests see
the new providers, aliases, keys and limits at once, a removed provider is closed after its
streams end, an invalid file changes nothing and says where it is wrong, and
`modelbroker_config_reloads_total{result}` counts each outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

from broker.auth import hash_key
from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import FAST_ROUTING, reason_of
from tests.fakes.http import FakeHTTPServer, Request, Response, sse
from tests.procs import ServeDaemon, env_without, start_serve, stop, wait_ready

KEY_A, KEY_B, KEY_C = (f"mb_reload_test_{c * 24}" for c in "abc")
UPSTREAM_KEY = "sk-reload-upstream-0f1e2d3c4b5a"


class GatedUpstream:
    """An OpenAI-compatible upstream on 127.0.0.1:0 that sends each stream's first chunk at
    once and the rest only after `release()`; it demands `key` (401 otherwise)."""

    def __init__(self, tag: str, key: str = UPSTREAM_KEY, *, gated: bool = True) -> None:
        self.tag = tag
        self.key = key
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.held = 0  # streams waiting at the gate now
        self.server = FakeHTTPServer(self._handle)

    @property
    def url(self) -> str:
        return f"{self.server.url}/v1"

    async def __aenter__(self) -> GatedUpstream:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.gate.set()
        await self.server.stop()

    def release(self) -> None:
        self.gate.set()

    async def _handle(self, req: Request, resp: Response) -> None:
        if req.headers.get("authorization") != f"Bearer {self.key}":
            body = {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error"}}
            await resp.send(401, {**body, "code": "invalid_api_key"})
            return
        if req.path == "/v1/models":
            models = [{"id": m, "object": "model", "owned_by": "test"} for m in ("gpt-4o-mini", "gpt-4o")]
            await resp.send(200, {"object": "list", "data": models})
            return
        body = req.json()
        model = body["model"]

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return sse({"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [choice]})

        await resp.start_stream()
        await resp.write(chunk({"role": "assistant", "content": ""}))
        await resp.write(chunk({"content": f"{self.tag}:"}))
        self.held += 1
        try:
            await self.gate.wait()
        finally:
            self.held -= 1
        for piece in (" one", " two", " three"):
            await resp.write(chunk({"content": piece}))
        await resp.write(chunk({}, "stop"))
        usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        await resp.write(
            sse(
                {"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}
            )
        )
        await resp.write(sse("[DONE]"))
        await resp.end()


def provider(name: str, up: GatedUpstream, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "openai", "base_url": up.url, "api_key": UPSTREAM_KEY, **extra}


def keys(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(entries)}


def key(name: str, plain: str, **limits: Any) -> dict[str, Any]:
    return {"name": name, "sha256": hash_key(plain), **limits}


def write_atomically(path: Path, config: dict[str, Any] | str) -> None:
    """As editors and deploy tools do: a temporary file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    os.replace(tmp, path)


def base(**extra: Any) -> dict[str, Any]:
    return {
        "health": {"interval_seconds": 0.5, "timeout_seconds": 2},
        "routing": FAST_ROUTING,
        "metrics": {"listen": "127.0.0.1:0"},
        "reload": {"poll_seconds": 0.2},
        **extra,
    }


class Daemon(ServeDaemon):
    stamp = True

    async def event(self, name: str, *, after: int = 0, within: float = 15.0, **match: Any) -> dict[str, Any]:
        """The first `name` event past the first `after` of them with these fields."""
        end = time.monotonic() + within
        while time.monotonic() < end:
            found = [e for e in self.logged(name) if all(e.get(k) == v for k, v in match.items())]
            if len(found) > after:
                return found[after]
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.02)
        tail = "\n".join(self.lines[-15:])
        raise AssertionError(f"no {name} {match} within {within:g}s; last lines:\n{tail}")

    async def reloads(self) -> dict[str, float]:
        """modelbroker_config_reloads_total by result, from /metrics."""
        metrics = self.logged("serving")[0]["metrics"]
        async with aiohttp.ClientSession() as http, http.get(f"http://{metrics}/metrics") as r:
            text = await r.text()
        found = re.findall(r'^modelbroker_config_reloads_total\{result="(\w+)"\} ([0-9.]+)$', text, re.M)
        return {k: float(v) for k, v in found}


@contextlib.asynccontextmanager
async def serving(config: Path, env: dict[str, str] | None = None) -> AsyncIterator[tuple[Daemon, str]]:
    env = env or env_without("OPENAI_", "ANTHROPIC_", "OLLAMA_", "MODEL_BROKER_", "OTEL_")
    env["MODEL_BROKER_DISCOVER_LOCAL"] = "0"
    daemon = Daemon(await start_serve(config if config.name else None, "127.0.0.1:0", env=env))
    try:
        await asyncio.wait_for(daemon.serving.wait(), 30)
        target = f"127.0.0.1:{daemon.port}"
        await wait_ready(target)
        yield daemon, target
        assert await stop(daemon.proc, 30), "SIGTERM drains and exits"
        assert daemon.proc.returncode == 0
        assert not [line for line in daemon.lines if "Traceback" in line], "\n".join(daemon.lines[-30:])
    finally:
        await daemon.close()


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def bearer(k: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {k}"),)


async def complete(s: pb_grpc.ModelBrokerStub, model: str, k: str) -> tuple[str, str]:
    """(status, provider or ErrorInfo reason) of one unary completion."""
    try:
        r = await s.Complete(
            pb.CompleteRequest(model=model, messages=[user("hi")]), metadata=bearer(k), timeout=10
        )
    except grpc.aio.AioRpcError as err:
        return err.code().name, reason_of(err)
    return "OK", r.provider


class Stream:
    """One StreamComplete, read in the background: what came, and when."""

    def __init__(self, s: pb_grpc.ModelBrokerStub, model: str, k: str, t0: float) -> None:
        self.t0 = t0
        self.text = ""
        self.provider = ""
        self.status = ""
        self.first = asyncio.Event()
        self.first_at = self.done_at = 0.0
        request = pb.StreamCompleteRequest(model=model, messages=[user("hi")])
        self.task = asyncio.create_task(self._read(s.StreamComplete(request, metadata=bearer(k), timeout=60)))

    async def _read(self, call: Any) -> None:
        try:
            async for m in call:
                if m.HasField("start"):
                    self.provider = m.start.provider
                elif m.HasField("text_delta"):
                    self.text += m.text_delta.text
                    if not self.first.is_set():
                        self.first_at = time.monotonic() - self.t0
                        self.first.set()
            self.status = "OK"
        except grpc.aio.AioRpcError as err:
            self.status = f"{err.code().name} {reason_of(err)}"
        self.done_at = time.monotonic() - self.t0


async def until(check: Any, what: str, within: float = 15.0) -> None:
    end = time.monotonic() + within
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {within:g}s: {what}")
        await asyncio.sleep(0.02)


async def test_reload_under_load_in_flight_streams_finish_new_calls_see_the_new_config(
    tmp_path: Path,
) -> None:
    t0 = time.monotonic()
    timeline: list[tuple[float, str]] = []

    def mark(what: str, at: float | None = None) -> None:
        timeline.append((round((time.monotonic() - t0) if at is None else at, 3), what))

    async with GatedUpstream("slow") as slow, GatedUpstream("steady", gated=False) as steady:
        path = tmp_path / "broker.yaml"
        v1 = base(
            providers=[provider("slow", slow, priority=10), provider("steady", steady, priority=20)],
            aliases={"chat": "slow/gpt-4o-mini"},
            auth=keys(key("team-a", KEY_A)),
        )
        write_atomically(path, v1)
        async with serving(path) as (daemon, target), grpc.aio.insecure_channel(target) as ch:
            s = pb_grpc.ModelBrokerStub(ch)
            mark("daemon ready (v1: providers slow, steady; alias chat -> slow/gpt-4o-mini; key team-a)")
            streams = [Stream(s, "chat" if i % 2 else "slow/gpt-4o-mini", KEY_A, t0) for i in range(6)]
            await asyncio.wait_for(asyncio.gather(*(st.first.wait() for st in streams)), 15)
            await until(lambda: slow.held == 6, "6 streams held by the slow upstream")
            mark(
                "6 streams in flight on slow (first delta received by each)",
                max(st.first_at for st in streams),
            )

            # v2: slow removed, the alias moved, team-a's key gone, team-b limited, team-c added,
            # and new breaker settings (steady keeps its connections, gets a fresh breaker).
            v2 = base(
                routing={**FAST_ROUTING, "breaker": {"consecutive_failures": 999, "min_requests": 999}},
                providers=[provider("steady", steady, priority=20)],
                aliases={"chat": "steady/gpt-4o", "fresh": "steady/gpt-4o-mini"},
                auth=keys(key("team-b", KEY_B, requests_per_minute=2), key("team-c", KEY_C)),
            )
            write_atomically(path, v2)
            mark("v2 written (slow removed; chat -> steady/gpt-4o; alias fresh; keys team-b rpm 2, team-c)")
            reloaded = await daemon.event("config_reloaded")
            mark(
                f"config_reloaded logged (trigger {reloaded['trigger']}, {reloaded['duration_ms']} ms)",
                reloaded["_t"] - t0,
            )
            assert (reloaded["trigger"], reloaded["removed"], reloaded["providers"]) == (
                "file",
                ["slow"],
                ["steady"],
            )
            assert (reloaded["draining"], reloaded["in_flight"], reloaded["keys"]) == (1, 6, 2)
            assert (reloaded["added"], reloaded["replaced"]) == ([], []), "steady carried over"

            # New calls see v2 at once, while the six streams are still held upstream.
            assert await complete(s, "fresh", KEY_C) == ("OK", "steady")
            mark("new call on alias fresh -> OK from steady")
            assert await complete(s, "chat", KEY_C) == ("OK", "steady"), "the alias moved"
            assert await complete(s, "slow/gpt-4o-mini", KEY_C) == ("NOT_FOUND", "MODEL_NOT_FOUND")
            assert await complete(s, "fresh", KEY_A) == ("UNAUTHENTICATED", "API_KEY_INVALID"), (
                "a removed key"
            )
            assert [await complete(s, "fresh", KEY_B) for _ in range(3)] == [
                ("OK", "steady"),
                ("OK", "steady"),
                ("RESOURCE_EXHAUSTED", "CALLER_RATE_LIMITED"),
            ], "the new key's limit applies"
            mark("checked: slow/* NOT_FOUND, team-a UNAUTHENTICATED, team-b's 3rd call RESOURCE_EXHAUSTED")
            assert not any(st.task.done() for st in streams) and slow.held == 6
            assert not daemon.logged("provider_closed"), "slow drains: its streams are still running"

            slow.release()
            mark("slow upstream released the held streams")
            await asyncio.wait_for(asyncio.gather(*(st.task for st in streams)), 15)
            for st in streams:
                assert (st.status, st.provider, st.text) == ("OK", "slow", "slow: one two three")
            mark("all 6 streams completed OK on slow", max(st.done_at for st in streams))
            closed = await daemon.event("provider_closed", provider="slow")
            mark(f"provider_closed slow (after {closed['waited_ms']} ms of drain)", closed["_t"] - t0)
            assert "cut" not in closed
            assert await daemon.reloads() == {"success": 1.0, "failure": 0.0}

            # v3 is invalid: nothing changes, each problem is logged with its path.
            broken = base(
                providers=[{**provider("steady", steady), "base_url": "ftp://steady.invalid"}],
                aliases={"fresh": "steady/gpt-4o-mini"},
                routing={"retry": {"max_attemps": 3}},
            )
            write_atomically(path, broken)
            mark("v3 written (invalid: providers[0].base_url, routing.retry.max_attemps)")
            failed = await daemon.event("config_reload_failed")
            mark(
                f"config_reload_failed logged ({failed['problems']} problems, running config kept)",
                failed["_t"] - t0,
            )
            problems = {e["path"]: e["problem"] for e in daemon.logged("config_reload_problem")}
            assert set(problems) == {"providers[0].base_url", "routing.retry.max_attemps"}
            assert "http:// or https://" in problems["providers[0].base_url"]
            assert "unknown key" in problems["routing.retry.max_attemps"]
            assert await complete(s, "fresh", KEY_C) == ("OK", "steady"), "v2 still runs"
            assert await complete(s, "fresh", KEY_A) == ("UNAUTHENTICATED", "API_KEY_INVALID")
            assert await daemon.reloads() == {"success": 1.0, "failure": 1.0}

            # Fixed: v4 applies, and the invalid v3 was not retried while it sat there.
            v4 = {**v2, "aliases": {**v2["aliases"], "after": "steady/gpt-4o"}}
            write_atomically(path, v4)
            await daemon.event("config_reloaded", after=1)
            assert await complete(s, "after", KEY_C) == ("OK", "steady")
            mark("v4 written and applied (alias after)")
            assert await daemon.reloads() == {"success": 2.0, "failure": 1.0}
    print("\nreload under load, seconds from the test's start:")
    for at, what in sorted(timeline):
        print(f"  {at:7.3f}  {what}")


def configmap_dir(root: Path, name: str, files: dict[str, str], generation: int) -> None:
    """Lay out (or update) a Kubernetes ConfigMap/Secret volume: each file is a symlink through
    `..data`, which points at a timestamped directory; an update writes a new directory and
    swaps `..data` with one rename, then removes the old directory, as the kubelet does."""
    volume = root / name
    volume.mkdir(exist_ok=True)
    stamp = f"..2026_01_0{generation}_00_00_00.{generation:09d}"
    (volume / stamp).mkdir()
    for file, text in files.items():
        (volume / stamp / file).write_text(text)
    data = volume / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    (volume / "..data_tmp").symlink_to(stamp)
    os.replace(volume / "..data_tmp", data)
    for file in files:
        link = volume / file
        if not link.is_symlink():
            link.symlink_to(f"..data/{file}")
    if old is not None:
        for f in (volume / old).iterdir():
            f.unlink()
        (volume / old).rmdir()


async def test_configmap_and_secret_symlink_swaps_reload_the_config_and_rotate_the_key(
    tmp_path: Path,
) -> None:
    new_key = "sk-reload-rotated-9a8b7c6d5e4f"
    async with GatedUpstream("up", gated=False) as up:
        configmap_dir(tmp_path, "secret", {"openai-key": UPSTREAM_KEY + "\n"}, 1)

        def config(aliases: dict[str, str]) -> str:
            p = {
                "name": "openai",
                "type": "openai",
                "base_url": up.url,
                "api_key_file": str(tmp_path / "secret/openai-key"),
            }
            return yaml.safe_dump(base(providers=[p], aliases=aliases))

        configmap_dir(tmp_path, "config", {"broker.yaml": config({"one": "openai/gpt-4o-mini"})}, 1)
        path = tmp_path / "config/broker.yaml"
        async with serving(path) as (daemon, target), grpc.aio.insecure_channel(target) as ch:
            s = pb_grpc.ModelBrokerStub(ch)
            assert await complete(s, "one", "") == ("OK", "openai")

            # The ConfigMap changes: a new directory behind ..data, the file's own path unchanged.
            configmap_dir(tmp_path, "config", {"broker.yaml": config({"two": "openai/gpt-4o"})}, 2)
            reloaded = await daemon.event("config_reloaded")
            assert reloaded["replaced"] == [] and reloaded["added"] == [], "the provider carried over"
            assert await complete(s, "two", "") == ("OK", "openai")
            assert (await complete(s, "one", ""))[0] == "NOT_FOUND"

            # The Secret rotates: the upstream now wants the new key; the file swap is a reload.
            up.key = new_key
            assert await complete(s, "two", "") == ("FAILED_PRECONDITION", "UPSTREAM_AUTH_FAILED"), "old key"
            configmap_dir(tmp_path, "secret", {"openai-key": new_key + "\n"}, 2)
            rotated = await daemon.event("config_reloaded", after=1)
            assert rotated["replaced"] == ["openai"], "a new key means a new provider instance"
            assert await complete(s, "two", "") == ("OK", "openai")
            await daemon.event("provider_closed", provider="openai")
            assert await daemon.reloads() == {"success": 2.0, "failure": 0.0}
    secrets_seen = "\n".join(daemon.lines)
    assert UPSTREAM_KEY not in secrets_seen and new_key not in secrets_seen


async def test_sighup_reloads_and_names_what_needs_a_restart(tmp_path: Path) -> None:
    async with GatedUpstream("up", gated=False) as up:
        path = tmp_path / "broker.yaml"
        # poll_seconds 0: no watch, so only SIGHUP reloads.
        v1 = {**base(providers=[provider("openai", up)]), "reload": {"poll_seconds": 0}}
        write_atomically(path, v1)
        async with serving(path) as (daemon, target), grpc.aio.insecure_channel(target) as ch:
            s = pb_grpc.ModelBrokerStub(ch)
            v2 = {
                **v1,
                "aliases": {"hup": "openai/gpt-4o"},
                "server": {"listen": "127.0.0.1:1", "shutdown_grace_seconds": 3},
            }
            write_atomically(path, v2)
            assert (await complete(s, "hup", ""))[0] == "NOT_FOUND", "no watch: not reloaded yet"
            daemon.proc.send_signal(1)  # SIGHUP
            reloaded = await daemon.event("config_reloaded", trigger="sighup")
            assert reloaded["restart_required"] == ["server.listen", "server.shutdown_grace_seconds"]
            warning = await daemon.event("config_reload_restart_required")
            assert warning["keys"] == ["server.listen", "server.shutdown_grace_seconds"]
            assert await complete(s, "hup", "") == ("OK", "openai"), "the rest applied"
            # SIGHUP with the file unchanged is a reload too (nothing to swap but the objects).
            daemon.proc.send_signal(1)
            await daemon.event("config_reloaded", after=1, trigger="sighup")
            assert await daemon.reloads() == {"success": 2.0, "failure": 0.0}


async def test_sighup_without_a_config_file_changes_nothing_and_keeps_serving(tmp_path: Path) -> None:
    async with GatedUpstream("up", gated=False) as up:
        env = env_without("OPENAI_", "ANTHROPIC_", "OLLAMA_", "MODEL_BROKER_", "OTEL_")
        env.update(OPENAI_BASE_URL=up.url, OPENAI_API_KEY=UPSTREAM_KEY)
        async with serving(Path(""), env) as (daemon, target), grpc.aio.insecure_channel(target) as ch:
            daemon.proc.send_signal(1)
            skipped = await daemon.event("config_reload_skipped")
            assert "without a config file" in skipped["reason"]
            assert await complete(pb_grpc.ModelBrokerStub(ch), "openai/gpt-4o-mini", "") == ("OK", "openai")


@pytest.mark.parametrize(
    ("broken", "where"),
    [
        ("providers: [\n", "line 2, column 1"),
        ("providers:\n  - {name: x, type: nope}\n", "providers[0].type"),
        ("", "providers"),  # emptied or truncated: would take every provider away
    ],
)
async def test_a_file_that_does_not_parse_or_validate_is_refused_with_its_place(
    tmp_path: Path, broken: str, where: str
) -> None:
    async with GatedUpstream("up", gated=False) as up:
        path = tmp_path / "broker.yaml"
        write_atomically(path, base(providers=[provider("openai", up)]))
        async with serving(path) as (daemon, target), grpc.aio.insecure_channel(target) as ch:
            write_atomically(path, broken)
            failed = await daemon.event("config_reload_failed")
            [problem] = daemon.logged("config_reload_problem")
            assert problem["path"] == where
            assert failed["kept"] == "the running config"
            assert await complete(pb_grpc.ModelBrokerStub(ch), "openai/gpt-4o-mini", "") == ("OK", "openai")
            assert await daemon.reloads() == {"success": 0.0, "failure": 1.0}
