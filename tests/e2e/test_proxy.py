"""Upstream traffic through a real HTTP proxy: proxy.py (PyPI `proxy.py`) on loopback.

The proxy runs as its own process with a plugin (tests/e2e/proxy_log.py) that logs one
`mb-proxied METHOD host:port/path` line per request it carries, CONNECTs included, so each test
can see whether its traffic went through the proxy rather than infer it from the answer.

- a provider's `proxy:` URL carries its completions, and overrides HTTP_PROXY from the environment;
- HTTP_PROXY / HTTPS_PROXY from the environment of a `model-broker serve` process, and NO_PROXY
  excluding the upstream's host (then the proxy sees nothing);
- a proxy demanding basic auth, credentials from env through `${VAR}`: right ones work, wrong
  ones end in a status that names the proxy and never the credentials (nor do the logs);
- CONNECT tunnelling to an https upstream whose certificate is signed by a test CA that the
  daemon trusts through `tls_ca_file` or SSL_CERT_FILE, with TLS end to end (the daemon still
  refuses the certificate when it does not trust the CA: the proxy does not terminate TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.config import settings_from_dict
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, stub
from tests.e2e.proxy_log import MARK
from tests.fakes.openai_upstream import FakeOpenAI, _DroppingServer
from tests.fakes.script import Reply
from tests.pki import Pki, make_pki

REPO = Path(__file__).resolve().parents[2]
PROXY_USER = "mb-proxy-user"
PROXY_PASS = "pr0xy-s3cret-7d1e"
# Variables a daemon subprocess must not inherit from whoever runs the tests.
_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "grpc_proxy", "ssl_cert_file")
_PROVIDER_VARS = ("OPENAI_", "ANTHROPIC_", "OLLAMA_", "MODEL_BROKER_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in _PROXY_VARS and not k.startswith(_PROVIDER_VARS)
    }
    env.update(extra)
    return env


async def until(check: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


# --- the proxy ----------------------------------------------------------------------------------


@dataclass
class Proxy:
    proc: asyncio.subprocess.Process
    port: int
    log: Path

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def carried(self) -> list[str]:
        """`METHOD host:port/path` of every request the proxy carried, in order."""
        return [
            line.split(MARK + " ", 1)[1].strip() for line in self.text().splitlines() if MARK + " " in line
        ]

    async def saw(self, needle: str, within: float = 5.0) -> str:
        """The first carried request containing `needle` (the plugin logs before forwarding)."""
        await until(
            lambda: any(needle in c for c in self.carried()), within=within, what=f"proxy carried {needle!r}"
        )
        return next(c for c in self.carried() if needle in c)


StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    started: list[Proxy] = []

    async def start(basic_auth: str | None = None) -> Proxy:
        d = tmp_path / f"proxy{len(started)}"
        d.mkdir()
        port_file, log = d / "port", d / "proxy.log"
        cmd = [
            sys.executable, "-m", "proxy",
            "--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
            "--num-workers", "1", "--num-acceptors", "1",
            "--data-dir", str(d), "--plugins", "tests.e2e.proxy_log.RequestLog",
        ]  # fmt: skip
        if basic_auth:
            cmd += ["--basic-auth", basic_auth]
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=out, stderr=asyncio.subprocess.STDOUT, env=clean_env(PYTHONPATH=str(REPO))
            )
        proxy = Proxy(proc, 0, log)
        started.append(proxy)

        def listening() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"proxy.py exited with {proc.returncode}:\n{log.read_text()}")
            text = port_file.read_text().strip() if port_file.exists() else ""
            if not text:
                return False
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", int(text))) != 0:
                    return False
            proxy.port = int(text)
            return True

        await until(listening, within=20, what="proxy.py listening")
        return proxy

    yield start
    for p in started:
        if p.proc.returncode is None:
            p.proc.terminate()
            try:
                await asyncio.wait_for(p.proc.wait(), 5)
            except TimeoutError:
                p.proc.kill()
                await p.proc.wait()


# --- upstreams ----------------------------------------------------------------------------------


@dataclass
class _TLSServer(_DroppingServer):
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    async def start(self) -> _TLSServer:
        self._server = await asyncio.start_server(self._on_conn, self.host, self.port, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self


def https_fake(pki: Pki) -> FakeOpenAI:
    """A FakeOpenAI behind TLS with a certificate for 127.0.0.1 from the test CA."""
    fake = FakeOpenAI(api_key=OPENAI_TEST_KEY)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    fake.server = _TLSServer(fake._handle, ssl_context=ctx)
    return fake


def https_url(fake: FakeOpenAI) -> str:
    return f"https://127.0.0.1:{fake.server.port}/v1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        fake.reply = Reply(text_chunks=["via ", "the ", "proxy"], input_tokens=6, output_tokens=3)
        yield fake


def provider(url: str, **extra: Any) -> dict[str, Any]:
    return {"name": "openai", "type": "openai", "base_url": url, "api_key": OPENAI_TEST_KEY, **extra}


def raw_config(prov: dict[str, Any]) -> dict[str, Any]:
    # A slow health loop: the proxy logs should show what the test did, not a stream of checks.
    return {"providers": [prov], "health": {"interval_seconds": 30, "timeout_seconds": 2}}


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


async def stream_text(s: Any) -> str:
    req = pb.StreamCompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")])
    msgs = [m async for m in s.StreamComplete(req, timeout=15)]
    assert msgs[-1].WhichOneof("event") == "end", msgs
    return "".join(m.text_delta.text for m in msgs if m.WhichOneof("event") == "text_delta")


def chats(fake: FakeOpenAI) -> int:
    return len(fake.chat_bodies)


# --- a daemon as a process (environment proxies are process-wide) --------------------------------


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    target: str
    out: Path

    def output(self) -> str:
        return self.out.read_text(errors="replace")


ServeDaemon = Callable[..., Awaitable[tuple[Served, Any]]]


@pytest.fixture
async def serve(tmp_path: Path, channel_to) -> AsyncIterator[ServeDaemon]:
    """`model-broker serve --config FILE` with a given environment; waits for liveness."""
    started: list[Served] = []

    async def start(raw: dict[str, Any], env: dict[str, str]) -> tuple[Served, Any]:
        n = len(started)
        cfg, out = tmp_path / f"broker{n}.yaml", tmp_path / f"broker{n}.log"
        cfg.write_text(yaml.safe_dump(raw))
        port = free_port()
        with out.open("wb") as f:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "broker.cli", "serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
                stdout=f, stderr=asyncio.subprocess.STDOUT, env=clean_env(**env),
            )  # fmt: skip
        served = Served(proc, f"127.0.0.1:{port}", out)
        started.append(served)
        # The test process has no proxy variables, so its own gRPC channel goes direct.
        ch = channel_to(served.target)
        health = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 20
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"daemon exited {proc.returncode}:\n{served.output()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                r = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon did not come up:\n{served.output()}")
            await asyncio.sleep(0.1)
        return served, stub(ch)

    yield start
    for s in started:
        if s.proc.returncode is None:
            s.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(s.proc.wait(), 10)
            except TimeoutError:
                s.proc.kill()
                await s.proc.wait()


# --- (a) a provider's own proxy ------------------------------------------------------------------


async def test_provider_proxy_carries_completions(start_proxy, upstream, daemon, channel_to) -> None:
    proxy = await start_proxy()
    settings = settings_from_dict(raw_config(provider(upstream.url, proxy=proxy.url())), env={})
    _, target = await daemon(settings)
    s = stub(channel_to(target))

    assert await stream_text(s) == "via the proxy"
    resp = await s.Complete(pb.CompleteRequest(model="openai/gpt-4o-mini", messages=[user("hi")]), timeout=15)
    assert "".join(p.text for p in resp.message.content) == "via the proxy"

    up = f"127.0.0.1:{upstream.server.port}"
    await proxy.saw(f"POST {up}/v1/chat/completions")
    carried = proxy.carried()
    assert carried.count(f"POST {up}/v1/chat/completions") == 2, carried
    assert chats(upstream) == 2
    # Discovery went the same way: nothing reaches this upstream except through the proxy.
    assert f"GET {up}/v1/models" in carried, carried


async def test_provider_proxy_overrides_the_environment(start_proxy, upstream, serve) -> None:
    proxy = await start_proxy()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: using it would fail
    raw = raw_config(provider(upstream.url, proxy=proxy.url()))
    _, s = await serve(raw, {"HTTP_PROXY": dead, "HTTPS_PROXY": dead})
    assert await stream_text(s) == "via the proxy"
    await proxy.saw(f"POST 127.0.0.1:{upstream.server.port}/v1/chat/completions")


# --- (b) proxies from the environment ------------------------------------------------------------


async def test_http_proxy_from_the_environment(start_proxy, upstream, serve) -> None:
    proxy = await start_proxy()
    _, s = await serve(raw_config(provider(upstream.url)), {"HTTP_PROXY": proxy.url()})
    assert await stream_text(s) == "via the proxy"
    await proxy.saw(f"POST 127.0.0.1:{upstream.server.port}/v1/chat/completions")
    assert chats(upstream) == 1


async def test_no_proxy_excludes_the_upstream_host(start_proxy, upstream, serve) -> None:
    proxy = await start_proxy()
    env = {"HTTP_PROXY": proxy.url(), "HTTPS_PROXY": proxy.url(), "NO_PROXY": "localhost,127.0.0.1"}
    _, s = await serve(raw_config(provider(upstream.url)), env)
    assert await stream_text(s) == "via the proxy"  # the fake's text; it was not proxied
    assert chats(upstream) == 1
    await asyncio.sleep(0.3)  # give a (wrongly) proxied request's log line time to appear
    assert proxy.carried() == [], proxy.carried()


# --- (c) proxy credentials -----------------------------------------------------------------------


def auth_provider(proxy: Proxy, url: str, **extra: Any) -> dict[str, Any]:
    return provider(url, proxy=proxy.url("${PROXY_USER}:${PROXY_PASS}"), **extra)


async def test_proxy_credentials_from_env(start_proxy, upstream, daemon, channel_to) -> None:
    proxy = await start_proxy(basic_auth=f"{PROXY_USER}:{PROXY_PASS}")
    env = {"PROXY_USER": PROXY_USER, "PROXY_PASS": PROXY_PASS}
    settings = settings_from_dict(raw_config(auth_provider(proxy, upstream.url)), env=env)
    _, target = await daemon(settings)
    assert await stream_text(stub(channel_to(target))) == "via the proxy"
    # Carried, so authenticated: this proxy answers 407 to anything without the credentials.
    # (Not asserted: that the upstream never sees Proxy-Authorization. proxy.py strips it from
    # the first request on a connection only and forwards it on pipelined ones; that is the
    # proxy's doing, the daemon sends it to the proxy, as it must.)
    await proxy.saw(f"POST 127.0.0.1:{upstream.server.port}/v1/chat/completions")


def assert_names_the_proxy(err: grpc.aio.AioRpcError, proxy: Proxy, *secrets: str) -> None:
    assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), err
    text = err.details() or ""
    assert "proxy" in text.lower() and f"127.0.0.1:{proxy.port}" in text, text
    assert "407" in text or "auth" in text.lower(), text
    for secret in secrets:
        assert secret not in text, text
        assert secret not in str(err.trailing_metadata()), err.trailing_metadata()


async def test_wrong_proxy_credentials_name_the_proxy_not_the_secret(
    start_proxy, upstream, daemon, channel_to, capsys
) -> None:
    proxy = await start_proxy(basic_auth=f"{PROXY_USER}:{PROXY_PASS}")
    wrong = "wr0ng-pass-91c3"
    settings = settings_from_dict(
        raw_config(auth_provider(proxy, upstream.url)), env={"PROXY_USER": PROXY_USER, "PROXY_PASS": wrong}
    )
    _, target = await daemon(settings)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stream_text(stub(channel_to(target)))
    assert_names_the_proxy(err.value, proxy, wrong, PROXY_USER)
    assert chats(upstream) == 0
    logs = capsys.readouterr()
    assert wrong not in logs.out + logs.err


async def test_wrong_proxy_credentials_over_connect(start_proxy, pki, daemon, channel_to, capsys) -> None:
    proxy = await start_proxy(basic_auth=f"{PROXY_USER}:{PROXY_PASS}")
    wrong = "wr0ng-pass-91c3"
    async with https_fake(pki) as fake:
        raw = raw_config(auth_provider(proxy, https_url(fake), tls_ca_file=str(pki.ca)))
        settings = settings_from_dict(raw, env={"PROXY_USER": PROXY_USER, "PROXY_PASS": wrong})
        _, target = await daemon(settings)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream_text(stub(channel_to(target)))
        assert_names_the_proxy(err.value, proxy, wrong, PROXY_USER)
        assert chats(fake) == 0
    logs = capsys.readouterr()
    assert wrong not in logs.out + logs.err


async def test_env_proxy_credentials_stay_out_of_errors_and_logs(start_proxy, upstream, serve) -> None:
    proxy = await start_proxy(basic_auth=f"{PROXY_USER}:{PROXY_PASS}")
    wrong = "wr0ng-pass-91c3"
    served, s = await serve(
        raw_config(provider(upstream.url)), {"HTTP_PROXY": proxy.url(f"{PROXY_USER}:{wrong}")}
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stream_text(s)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), err.value
    assert wrong not in (err.value.details() or "")
    assert "proxy" in (err.value.details() or "").lower(), err.value.details()
    assert chats(upstream) == 0
    assert wrong not in served.output()


# --- (d) CONNECT to an https upstream ------------------------------------------------------------


async def test_connect_tunnel_to_https_upstream(start_proxy, pki, daemon, channel_to) -> None:
    proxy = await start_proxy()
    async with https_fake(pki) as fake:
        fake.reply = Reply(text_chunks=["tun", "nelled"], input_tokens=4, output_tokens=2)
        raw = raw_config(provider(https_url(fake), proxy=proxy.url(), tls_ca_file=str(pki.ca)))
        _, target = await daemon(settings_from_dict(raw, env={}))
        assert await stream_text(stub(channel_to(target))) == "tunnelled"
        assert chats(fake) == 1
    line = await proxy.saw("CONNECT")
    assert line == f"CONNECT 127.0.0.1:{fake.server.port}", proxy.carried()
    # The proxy saw a tunnel, never a request inside it: TLS ran end to end.
    assert not [c for c in proxy.carried() if "/v1/" in c], proxy.carried()


async def test_connect_tunnel_with_credentials(start_proxy, pki, daemon, channel_to) -> None:
    proxy = await start_proxy(basic_auth=f"{PROXY_USER}:{PROXY_PASS}")
    async with https_fake(pki) as fake:
        fake.reply = Reply(text_chunks=["ok"], input_tokens=1, output_tokens=1)
        raw = raw_config(auth_provider(proxy, https_url(fake), tls_ca_file=str(pki.ca)))
        settings = settings_from_dict(raw, env={"PROXY_USER": PROXY_USER, "PROXY_PASS": PROXY_PASS})
        _, target = await daemon(settings)
        assert await stream_text(stub(channel_to(target))) == "ok"
    await proxy.saw(f"CONNECT 127.0.0.1:{fake.server.port}")


async def test_https_proxy_from_env_with_ssl_cert_file(start_proxy, pki, serve) -> None:
    proxy = await start_proxy()
    async with https_fake(pki) as fake:
        fake.reply = Reply(text_chunks=["env ", "tunnel"], input_tokens=2, output_tokens=2)
        env = {"HTTPS_PROXY": proxy.url(), "SSL_CERT_FILE": str(pki.ca)}
        _, s = await serve(raw_config(provider(https_url(fake))), env)
        assert await stream_text(s) == "env tunnel"
    await proxy.saw(f"CONNECT 127.0.0.1:{fake.server.port}")


async def test_tunnel_does_not_bypass_certificate_checks(start_proxy, pki, daemon, channel_to) -> None:
    proxy = await start_proxy()
    async with https_fake(pki) as fake:
        raw = raw_config(provider(https_url(fake), proxy=proxy.url()))  # the test CA is not trusted
        _, target = await daemon(settings_from_dict(raw, env={}))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream_text(stub(channel_to(target)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "certificate" in (err.value.details() or "").lower(), err.value.details()
        assert chats(fake) == 0
    await proxy.saw(f"CONNECT 127.0.0.1:{fake.server.port}")
