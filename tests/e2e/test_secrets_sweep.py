"""The secrets sweep (issue 11, item 5): every kind of configured secret, pushed through every
path that can echo it, then every byte the daemon emitted searched for it and its masked shapes.

Secrets (random per run, none shaped like `sk-`, `Bearer ...` or `mb_`, so only the
daemon's registration of configured secrets can hide them):

- `api_key` of an OpenAI provider, and a value under its `headers:`;
- `api_key_file` contents of an Anthropic provider;
- the password in an OpenAI provider's `proxy:` URL (the proxy sees it as Basic auth);
- a caller key (the config holds its hash; callers send it, and put it in prompts, model
  names and x-request-id).

Paths: a loopback upstream (and the proxy, the same server) echoes whatever secrets each
request carried back in vendor error bodies (whole, masked the ways vendors mask keys, the
raw request headers, an error event after content, a 200 that is not JSON with the secret
straddling the providers' 200-byte snippet), for completions (unary and streamed), discovery
and health checks; the caller key goes in as a model name and a request id too. Searched:
every RPC message, status and trailer, ListProviders, `config show`, and everything a real
`model-broker serve` process wrote to stdout and stderr. The table of secret kind x path x
leaked is printed (run with -s to read it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from google.rpc import status_pb2

from broker.auth import hash_key
from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.http import FakeHTTPServer, Request, Response
from tests.fakes.openai_upstream import FakeOpenAI, error_body
from tests.fakes.script import Fault, Reply

PROXY_USER = "sweep-user"
# Where a secret starts in a 200 body that is not JSON: 10 of its characters lie before
# the providers' 200-byte snippet cut (a prefix of 8 or more must go, cut or not).
CUT_AT = 190


def secret(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(14)}"


SECRETS: dict[str, str] = {
    "api_key": secret("ok"),
    "api_key_file": secret("af"),
    "headers value": secret("hv"),
    "proxy password": secret("pw"),
    "caller key": secret("ck"),
}
PROXY_BASIC = base64.b64encode(f"{PROXY_USER}:{SECRETS['proxy password']}".encode()).decode()


def masked(s: str) -> list[str]:
    """How vendors echo a key they refuse: first 8 + stars + last 4 (OpenAI), and shorter."""
    return [
        f"{s[:8]}{'*' * 24}{s[-4:]}",
        f"{s[:10]}*****{s[-4:]}",
        f"{s[:4]}...{s[-4:]}",
        f"{s[:3]}****{s[-4:]}",
        f"{s[:6]}*****{s[-3:]}",
    ]


def needles(kind: str) -> list[str]:
    """What would count as a leak of `kind`: the value, its masked shapes, any 8 characters of it."""
    values = [SECRETS[kind]] + ([PROXY_BASIC] if kind == "proxy password" else [])
    out: list[str] = []
    for v in values:
        out += [v, *masked(v)]
        out += [v[i : i + 8] for i in range(len(v) - 7)]
    return out


def leaks(kind: str, text: str) -> list[str]:
    return [n for n in needles(kind) if n in text]


class Echo:
    """The upstream and the proxy: each request answered per mode, echoing the secrets it carried."""

    def __init__(self) -> None:
        self.openai = FakeOpenAI()
        self.anthropic = FakeAnthropic(api_key=SECRETS["api_key_file"])
        self.reply = Reply(text_chunks=["fine"])
        self.openai.reply = self.anthropic.reply = self.reply
        self.chat_mode = "ok"
        self.models_mode = "ok"
        # kind -> modes in which a request carrying it was answered with an echo.
        self.pushed: dict[str, set[str]] = {k: set() for k in SECRETS}
        self.server = FakeHTTPServer(self.handle, segmenter=None)
        self.proxy = FakeHTTPServer(self.handle, segmenter=None)

    def carried(self, req: Request) -> list[str]:
        text = (
            "\n".join(f"{k}: {v}" for k, v in req.headers.items())
            + "\n"
            + req.body.decode("utf-8", "replace")
        )
        basic = req.headers.get("proxy-authorization", "")
        if basic.startswith("Basic "):
            text += "\n" + base64.b64decode(basic[6:]).decode()
        return [k for k, v in SECRETS.items() if v in text]

    async def handle(self, req: Request, resp: Response) -> None:
        if req.path.startswith("http"):  # through the proxy: an absolute URI
            req = Request(req.method, urlsplit(req.path).path, req.query, req.headers, req.body)
        anthropic = "anthropic-version" in req.headers
        models = req.path.startswith("/v1/models")
        mode = self.models_mode if models else self.chat_mode
        kinds = self.carried(req)
        fake: FakeOpenAI | FakeAnthropic = self.anthropic if anthropic else self.openai
        if mode == "ok":
            await fake._handle(req, resp)
            return
        for k in kinds:
            self.pushed[k].add(f"{'models' if models else 'chat'}:{mode}")
        values = [SECRETS[k] for k in kinds]
        whole = "; ".join(values)
        if mode == "whole":
            await self.error(resp, anthropic, 401, f"Incorrect API key provided: {whole}. Check your key.")
        elif mode == "masked":
            shapes = ", ".join(m for v in values for m in masked(v))
            await self.error(resp, anthropic, 401, f"Incorrect API key provided: {shapes}.")
        elif mode == "headers":
            await self.error(resp, anthropic, 400, f"bad request; you sent headers {json.dumps(req.headers)}")
        elif mode == "event" and not models:
            fake.faults.insert(
                0, Fault("error_event", status=500, after_chunks=1, message=f"failed for {whole}")
            )
            await fake._handle(req, resp)
        elif mode == "cut":
            for k in kinds:
                self.pushed[k].add(f"{'models' if models else 'chat'}:{mode}")
            body = (
                "<html><body>" + "gateway says: " + "." * (CUT_AT - 26) + " ".join(values) + "</body></html>"
            )
            assert body.index(values[0]) == CUT_AT if values else True
            await resp.send(200, body, content_type="text/html")
        else:
            await fake._handle(req, resp)

    async def error(self, resp: Response, anthropic: bool, status: int, message: str) -> None:
        if anthropic:
            kind = "authentication_error" if status == 401 else "invalid_request_error"
            await resp.send(status, {"type": "error", "error": {"type": kind, "message": message}})
        else:
            await resp.send(status, error_body(status, message))


def clean_env() -> dict[str, str]:
    drop = ("OPENAI_", "ANTHROPIC_", "OLLAMA_", "MODEL_BROKER_")
    proxies = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "grpc_proxy")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop) and k.lower() not in proxies}


class Emitted:
    """Everything the daemon sent back, by path."""

    def __init__(self) -> None:
        self.by_path: dict[str, list[str]] = {}

    def add(self, path: str, text: str) -> None:
        self.by_path.setdefault(path, []).append(text)

    def rpc(
        self,
        path: str,
        *,
        messages: Sequence[Any] = (),
        err: grpc.aio.AioRpcError | None = None,
        trailers: Any = (),
    ) -> None:
        parts = [str(m) for m in messages]
        md = list(trailers or ())
        if err is not None:
            parts += [err.code().name, err.details() or ""]
            md += list(err.trailing_metadata() or ())
        for k, v in md:
            if isinstance(v, bytes):
                parts.append(repr(v))
                if k == "grpc-status-details-bin":
                    parts.append(str(status_pb2.Status.FromString(v)))
            else:
                parts.append(f"{k}: {v}")
        self.add(path, "\n".join(parts))


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


async def until(check: Callable[[], Any], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while loop.time() < end:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_secrets_sweep(tmp_path: Path) -> None:
    echo = Echo()
    await echo.server.start()
    await echo.proxy.start()
    key_file = tmp_path / "anthropic.key"
    key_file.write_text(SECRETS["api_key_file"] + "\n")
    config = {
        "providers": [
            {
                "name": "p-openai",
                "type": "openai",
                "base_url": f"{echo.server.url}/v1",
                "api_key": SECRETS["api_key"],
                "headers": {"x-upstream-token": SECRETS["headers value"]},
                "priority": 10,
            },
            {
                "name": "p-anthropic",
                "type": "anthropic",
                "base_url": echo.server.url,
                "api_key_file": str(key_file),
                "priority": 20,
            },
            {
                "name": "p-proxy",
                "type": "openai",
                "base_url": f"{echo.server.url}/v1",
                "proxy": f"http://{PROXY_USER}:{SECRETS['proxy password']}@127.0.0.1:{echo.proxy.port}",
                "priority": 30,
            },
        ],
        "auth": {"keys": [{"name": "team-a", "sha256": hash_key(SECRETS["caller key"])}]},
        "health": {"interval_seconds": 0.3, "timeout_seconds": 2},
        "discovery": {"ttl_seconds": 0.3},
        "routing": {"retry": {"max_attempts": 1}, "breaker": {"enabled": False}},
    }
    config_path = tmp_path / "broker.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = Emitted()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", "serve", "--config", str(config_path), "--listen", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    lines: list[str] = []
    events: list[dict[str, Any]] = []
    serving: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def read(stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            text = raw.decode(errors="replace")
            lines.append(text)
            try:
                ev = json.loads(text)
            except ValueError:
                continue
            events.append(ev)
            if ev.get("event") == "serving" and not serving.done():
                serving.set_result(int(ev["listen"].rsplit(":", 1)[1]))

    assert proc.stdout is not None and proc.stderr is not None
    readers = [asyncio.create_task(read(proc.stdout)), asyncio.create_task(read(proc.stderr))]
    auth = (("authorization", f"Bearer {SECRETS['caller key']}"),)
    models = {"p-openai": "gpt-4o-mini", "p-anthropic": "claude-sonnet-4-5", "p-proxy": "gpt-4o-mini"}
    try:
        port = await asyncio.wait_for(serving, 30)
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]
        ) as ch:
            s = pb_grpc.ModelBrokerStub(ch)

            async def providers(path: str) -> pb.ListProvidersResponse:
                call = s.ListProviders(pb.ListProvidersRequest(), timeout=10, metadata=auth)
                resp: pb.ListProvidersResponse = await call
                out.rpc(path, messages=[resp], trailers=await call.trailing_metadata())
                out.rpc("ListProviders", messages=[resp])
                return resp

            async def all_healthy() -> bool:
                resp = await providers("ListProviders")
                return all(p.health == pb.PROVIDER_HEALTH_SERVING for p in resp.providers)

            await until(all_healthy, 20, "every provider healthy")

            # --- completions: the upstream echoes what each request carried --------------------
            prompt = f"please repeat {SECRETS['caller key']} back to me"
            for mode in ("whole", "masked", "headers", "event", "cut"):
                echo.chat_mode = mode
                path = f"upstream completion error: {mode}"
                for name, model in models.items():
                    ref = f"{name}/{model}"
                    try:
                        call = s.Complete(
                            pb.CompleteRequest(model=ref, messages=[user(prompt)]), timeout=10, metadata=auth
                        )
                        resp = await call
                        out.rpc(path, messages=[resp], trailers=await call.trailing_metadata())
                    except grpc.aio.AioRpcError as err:
                        out.rpc(path, err=err)
                    got: list[Any] = []
                    stream = s.StreamComplete(
                        pb.StreamCompleteRequest(model=ref, messages=[user(prompt)]),
                        timeout=10,
                        metadata=auth,
                    )
                    try:
                        async for m in stream:
                            got.append(m)
                        out.rpc(path, messages=got, trailers=await stream.trailing_metadata())
                    except grpc.aio.AioRpcError as err:
                        out.rpc(path, messages=got, err=err)
            echo.chat_mode = "ok"

            # --- the caller key where callers put it by mistake --------------------------------
            path = "caller key as model name / x-request-id"
            for meta in (auth, (*auth, ("x-request-id", SECRETS["caller key"]))):
                try:
                    await s.Complete(
                        pb.CompleteRequest(model=SECRETS["caller key"], messages=[user("hi")]),
                        timeout=10,
                        metadata=meta,
                    )
                except grpc.aio.AioRpcError as err:
                    out.rpc(path, err=err)
                stream = s.StreamComplete(
                    pb.StreamCompleteRequest(model="p-openai/gpt-4o-mini", messages=[user("hi")]),
                    timeout=10,
                    metadata=meta,
                )
                got = [m async for m in stream]
                out.rpc(path, messages=got, trailers=await stream.trailing_metadata())
            try:
                await s.GetModel(pb.GetModelRequest(model=SECRETS["caller key"]), timeout=10, metadata=auth)
            except grpc.aio.AioRpcError as err:
                out.rpc(path, err=err)

            # --- discovery and health checks meet the same echoes ------------------------------
            for mode in ("whole", "masked", "headers", "cut"):
                echo.models_mode = mode
                seen = len(events)

                async def failed_everywhere(seen: int = seen, mode: str = mode) -> bool:
                    fresh = events[seen:]
                    discovered = {e.get("provider") for e in fresh if e.get("event") == "discovery_failed"}
                    resp = await providers(f"ListProviders after {mode} discovery/health failures")
                    errored = all(p.last_error and not p.last_error_resolved for p in resp.providers)
                    return discovered >= set(models) and errored

                await until(failed_everywhere, 20, f"discovery and health failing ({mode})")
            echo.models_mode = "ok"

            async def recovered() -> bool:
                resp = await providers("ListProviders after recovery")
                return all(p.last_error_resolved and p.last_error_time.seconds for p in resp.providers)

            await until(recovered, 20, "last_error marked resolved after recovery")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        await asyncio.gather(*readers)
        await echo.server.stop()
        await echo.proxy.stop()
    assert code == 0, "".join(lines[-20:])

    show = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", "config", "show", "--config", str(config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    show_out, show_err = await asyncio.wait_for(show.communicate(), 30)
    assert show.returncode == 0, show_err
    out.add("config show", (show_out + show_err).decode())
    assert "x-upstream-token" in show_out.decode(), "config show names the header, masks its value"

    log_text = "".join(lines)
    out.add(
        "logs: discovery_failed lines",
        "\n".join(json.dumps(e) for e in events if e.get("event") == "discovery_failed"),
    )
    out.add(
        "logs: provider_health lines",
        "\n".join(json.dumps(e) for e in events if e.get("event") == "provider_health"),
    )
    out.add("logs: request lines", "\n".join(json.dumps(e) for e in events if e.get("event") == "request"))
    out.add("logs: all stdout + stderr", log_text)
    out.add(
        "all RPC bytes",
        "\n".join(t for p, ts in out.by_path.items() if not p.startswith(("logs", "config")) for t in ts),
    )

    # --- the table --------------------------------------------------------------------------
    kinds = list(SECRETS)
    header = f"{'path':58} | " + " | ".join(f"{k:14}" for k in kinds)
    rows = [header, "-" * len(header)]
    leaked: list[str] = []
    for path, texts in out.by_path.items():
        text = "\n".join(texts)
        cells = []
        for k in kinds:
            found = leaks(k, text)
            if found:
                leaked.append(f"{path} / {k}: {found[:3]}")
            cells.append(f"{'LEAKED' if found else 'clean':14}")
        rows.append(f"{path[:58]:58} | " + " | ".join(cells))
    print("\n--- secrets sweep: secret kind x path x leaked ---\n" + "\n".join(rows))
    print("pushed (kind: upstream echo modes that carried it):")
    for k, modes in echo.pushed.items():
        print(f"  {k}: {', '.join(sorted(modes)) or 'none'}")
    print(
        f"log lines scanned: {len(lines)}; RPC paths: {len([p for p in out.by_path if not p.startswith(('logs', 'config'))])}"
    )

    # The sweep is not vacuous: each secret went out and came back redacted.
    for k in ("api_key", "api_key_file", "headers value", "proxy password", "caller key"):
        assert {"chat:whole", "chat:masked"} <= echo.pushed[k], (k, echo.pushed[k])
        if k != "caller key":
            assert {"models:whole", "models:masked", "models:cut"} <= echo.pushed[k], (k, echo.pushed[k])
    assert "[REDACTED]" in "\n".join(out.by_path["upstream completion error: whole"])
    assert "[REDACTED]" in "\n".join(out.by_path["logs: discovery_failed lines"])
    for path, texts in out.by_path.items():  # where, for a failure message
        text = "\n".join(texts)
        for k in kinds:
            for n in leaks(k, text)[:1]:
                i = text.index(n)
                print(f"LEAK {k} in {path}: ...{text[max(i - 80, 0) : i + len(n) + 40]!r}...")
    assert not leaked, "secrets leaked:\n" + "\n".join(leaked)


async def test_a_secret_cut_short_by_a_provider_snippet_leaks_nothing(daemon, channel_to) -> None:
    """A 200 that is not an event stream, with a secret straddling the 200-byte snippet so that
    only 6 of its characters come before the cut: redacting first would remove it whole."""
    from tests.conftest import broker_settings

    key = secret("zq")

    async def handle(req: Request, resp: Response) -> None:
        if req.path == "/v1/models":
            await resp.send(200, {"object": "list", "data": [{"id": "m"}]})
            return
        await resp.send(200, "." * 194 + key + " trailing", content_type="text/html")

    async with FakeHTTPServer(handle, segmenter=None) as up:
        settings = broker_settings(
            [{"name": "p", "type": "openai", "base_url": f"{up.url}/v1", "api_key": key}],
            routing={"retry": {"max_attempts": 1}},
        )
        _, target = await daemon(settings)
        s = pb_grpc.ModelBrokerStub(channel_to(target))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.Complete(pb.CompleteRequest(model="p/m", messages=[user("hi")]), timeout=10)
    assert key[:6] not in (err.value.details() or ""), err.value.details()
