"""TLS and mTLS on the gRPC port: a real daemon on 127.0.0.1:0 with certificates made per run.

What a caller sees: a client trusting the CA completes a request; a plaintext client, a
client that does not trust the CA, and (with mTLS) a client without a certificate or with
one from another CA are refused at the handshake. The CLI client flags reach the same
outcomes, and a certificate the daemon cannot read is reported by its config path.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker import cli
from broker.config import ConfigError
from broker.server import BrokerServer
from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings, stub
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.pki import SERVER_NAME, Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        fake.reply = Reply(text_chunks=["sec", "ure"], input_tokens=7, output_tokens=2)
        yield fake


def tls_settings(url: str, tls: dict[str, Any]) -> Any:
    provider = {"name": "openai", "type": "openai", "base_url": url, "api_key": OPENAI_TEST_KEY}
    return broker_settings([provider], tls=tls)


def server_tls(pki: Pki, *, mtls: bool = False) -> dict[str, str]:
    cfg = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    if mtls:
        cfg["client_ca_file"] = str(pki.ca)
    return cfg


def creds(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


@pytest.fixture
async def channels() -> AsyncIterator[list[grpc.aio.Channel]]:
    opened: list[grpc.aio.Channel] = []
    yield opened
    for ch in opened:
        await ch.close()


async def complete(channels: list[grpc.aio.Channel], target: str, credentials: Any) -> pb.CompleteResponse:
    ch = (
        grpc.aio.secure_channel(target, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(target)
    )
    channels.append(ch)
    req = pb.CompleteRequest(
        model="openai/gpt-4o-mini",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])],
    )
    resp: pb.CompleteResponse = await stub(ch).Complete(req, timeout=5)
    return resp


async def test_tls_client_trusting_the_ca_completes(pki, upstream, daemon, channels) -> None:
    _, target = await daemon(tls_settings(upstream.url, server_tls(pki)))
    resp = await complete(channels, target, creds(pki.ca))
    assert [p.text for p in resp.message.content] == ["secure"]
    assert resp.usage.input_tokens == 7


async def test_tls_refuses_plaintext_and_untrusting_clients(pki, upstream, daemon, channels) -> None:
    _, target = await daemon(tls_settings(upstream.url, server_tls(pki)))
    for credentials in (None, creds(pki.rogue_ca)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await complete(channels, target, credentials)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not upstream.chat_bodies, "no request may reach the provider without a handshake"


async def test_mtls_requires_a_client_certificate_from_the_ca(pki, upstream, daemon, channels) -> None:
    _, target = await daemon(tls_settings(upstream.url, server_tls(pki, mtls=True)))
    resp = await complete(channels, target, creds(pki.ca, pki.client_cert, pki.client_key))
    assert [p.text for p in resp.message.content] == ["secure"]
    refused = [creds(pki.ca), creds(pki.ca, pki.rogue_client_cert, pki.rogue_client_key)]
    for credentials in refused:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await complete(channels, target, credentials)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(upstream.chat_bodies) == 1, "only the certified client reached the provider"


async def test_mtls_guards_health_too(pki, upstream, daemon, channels) -> None:
    """The port is one TLS endpoint: probes need a certificate as well (exec probe with flags)."""
    _, target = await daemon(tls_settings(upstream.url, server_tls(pki, mtls=True)))
    ok = grpc.aio.secure_channel(target, creds(pki.ca, pki.client_cert, pki.client_key))
    bare = grpc.aio.secure_channel(target, creds(pki.ca))
    channels += [ok, bare]
    req = health_pb2.HealthCheckRequest(service="")
    resp = await health_pb2_grpc.HealthStub(ok).Check(req, timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health_pb2_grpc.HealthStub(bare).Check(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def run_cli(*argv: str) -> tuple[int, str, str]:
    """The CLI as a user runs it: its own process (it uses the blocking gRPC API)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_client_flags(pki, upstream, daemon) -> None:
    _, target = await daemon(tls_settings(upstream.url, server_tls(pki, mtls=True)))
    ca, cert, key = str(pki.ca), str(pki.client_cert), str(pki.client_key)
    mtls = ["--ca-cert", ca, "--client-cert", cert, "--client-key", key]

    code, out, err = await run_cli("health", "--target", target, *mtls)
    assert (code, out.strip()) == (cli.EXIT_SERVING, "(server): SERVING"), err
    code, out, err = await run_cli(
        "complete", "--target", target, *mtls, "--model", "openai/gpt-4o-mini", "--timeout", "5", "hi"
    )
    assert (code, out) == (0, "secure\n"), err
    code, out, err = await run_cli("providers", "--target", target, "--timeout", "5", *mtls)
    assert code == 0 and out.startswith("openai "), err

    # The certificate is for broker.internal and 127.0.0.1: a wrong expected name fails the
    # handshake, the right one passes, so --tls-server-name really drives verification.
    code, _, _ = await run_cli(
        "health", "--target", target, "--timeout", "1", *mtls, "--tls-server-name", "wrong.example"
    )
    assert code == cli.EXIT_CONNECT
    code, _, err = await run_cli("health", "--target", target, *mtls, "--tls-server-name", SERVER_NAME)
    assert code == cli.EXIT_SERVING, err

    # Without a client certificate the mTLS port does not even complete the handshake.
    code, _, err = await run_cli("health", "--target", target, "--timeout", "1", "--ca-cert", ca)
    assert code == cli.EXIT_CONNECT and "cannot connect" in err
    code, _, err = await run_cli("health", "--target", target, "--ca-cert", ca, "--client-cert", cert)
    assert code == 1 and "--client-cert and --client-key go together" in err
    code, _, err = await run_cli("health", "--target", target, "--ca-cert", str(pki.ca.parent / "nope.pem"))
    assert code == 1 and "--ca-cert: cannot read" in err and "nope.pem" in err


async def test_unreadable_certificate_is_reported_by_its_config_path(pki, tmp_path) -> None:
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("this is not a certificate\n")
    cases = [
        ({"cert_file": str(tmp_path / "missing.pem"), "key_file": str(pki.server_key)}, "tls.cert_file"),
        ({"cert_file": str(not_pem), "key_file": str(pki.server_key)}, "tls.cert_file"),
        ({**server_tls(pki), "client_ca_file": str(tmp_path / "ca.pem")}, "tls.client_ca_file"),
    ]
    for tls, path in cases:
        server = BrokerServer(tls_settings("http://127.0.0.1:9/v1", tls))
        with pytest.raises(ConfigError) as err:
            await server.start("127.0.0.1:0")
        assert err.value.problems[0].startswith(f"{path}: "), err.value.problems
        await server.stop(0)


def test_tls_config_shape_errors_name_their_path() -> None:
    from broker.config import settings_from_dict

    cases = [
        ({"cert_file": "s.pem"}, "tls.key_file: required when tls.cert_file is set"),
        ({"key_file": "s.key"}, "tls.key_file: set without tls.cert_file"),
        ({"client_ca_file": "ca.pem"}, "tls.client_ca_file: mTLS needs TLS"),
    ]
    for tls, problem in cases:
        with pytest.raises(ConfigError) as err:
            settings_from_dict({"tls": tls}, env={})
        assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
    # `${VAR:-}` left empty means TLS off, so one file serves both ways.
    s = settings_from_dict({"tls": {"cert_file": "${CERT:-}", "key_file": "${KEY:-}"}}, env={})
    assert not s.tls.enabled
