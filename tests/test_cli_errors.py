"""What the CLI says when it cannot do what was asked: one line on stderr, never a traceback.

A bad `--listen` (no port, no host, a port out of range), a `--target` with a missing port,
nothing listening, a plaintext client on a TLS port (and a TLS client on a plaintext one),
an unknown health service. Every case is a real `model-broker` process; the TLS daemon is a
real `serve` process with certificates made for the run.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from broker.cli_connect import DEFAULT_PORT, normalize_target
from tests.clirun import clean_env, run_cli, serving
from tests.pki import Pki, make_pki
from tests.procs import free_port


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("localhost", "'localhost' has no port: give HOST:PORT, e.g. localhost:50051"),
        (":99999", "no host before the ':'"),
        (":99999", "the port must be a number from 0 to 65535, got '99999'"),
        ("127.0.0.1:", "no port after the ':'"),
    ],
)
async def test_bad_listen_is_one_line(listen: str, says: str) -> None:
    code, out, err = await run_cli("serve", "--listen", listen)
    line = one_line(err)
    assert code == 2 and out == ""
    assert line.startswith("model-broker serve: error: argument --listen: ") and says in line, line


async def test_listen_on_a_taken_port_is_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = clean_env(OPENAI_BASE_URL="http://127.0.0.1:9/v1")  # a provider: no first-run screen
        code, _, err = await run_cli("serve", "--listen", f"127.0.0.1:{taken}", env=env)
    lines = [line for line in err.splitlines() if not line.startswith("{")]  # JSON log lines aside
    assert code == 1 and "Traceback" not in err
    assert lines == [
        f"model-broker: cannot listen on 127.0.0.1:{taken}: the port is in use (another model-broker serve?)"
    ]


def test_a_target_without_a_port_gets_the_daemons_port() -> None:
    assert DEFAULT_PORT == 50051
    assert normalize_target("127.0.0.1") == "127.0.0.1:50051"  # gRPC alone would dial :443
    assert normalize_target("broker.internal") == "broker.internal:50051"
    assert normalize_target("[::1]") == normalize_target("::1") == "[::1]:50051"
    assert normalize_target("dns:///broker.svc") == "dns:///broker.svc:50051"
    assert normalize_target("10.0.0.1:7000") == "10.0.0.1:7000"
    assert normalize_target("unix:///run/mb.sock") == "unix:///run/mb.sock"
    for bad, says in [("127.0.0.1:", "missing the port"), (":50051", "has no host"), ("h:0", "1 to 65535")]:
        with pytest.raises(ValueError, match=says):
            normalize_target(bad)


async def test_missing_port_and_nothing_listening_are_one_line() -> None:
    code, _, err = await run_cli("models", "--target", "127.0.0.1:")
    assert code == 2
    assert "argument --target: '127.0.0.1:': missing the port after ':'" in one_line(err)

    closed = free_port()  # bound then released: nothing listens there
    code, _, err = await run_cli("complete", "--target", f"127.0.0.1:{closed}", "--model", "m", "hi")
    assert code == 1
    assert one_line(err) == (
        f"error: UNAVAILABLE: nothing is listening on 127.0.0.1:{closed} (connection refused): start the "
        "daemon (`model-broker serve`) or point --target / MODEL_BROKER_TARGET at it"
    )
    code, _, err = await run_cli("health", "--target", f"127.0.0.1:{closed}", "--timeout", "1")
    assert code == 2 and "nothing is listening on" in one_line(err)


async def test_bare_host_dials_the_default_port_not_443() -> None:
    with socket.socket() as probe:
        probe.settimeout(1)
        if probe.connect_ex(("127.0.0.9", DEFAULT_PORT)) == 0:
            pytest.skip(f"something listens on 127.0.0.9:{DEFAULT_PORT}")
    code, _, err = await run_cli("models", "--target", "127.0.0.9", "--timeout", "5")
    assert code == 1
    assert one_line(err).startswith("error: UNAVAILABLE: nothing is listening on 127.0.0.9:50051 ")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(pki: Pki, tmp_path: Path) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(
        yaml.safe_dump({"tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}})
    )
    return path


async def test_plaintext_client_on_a_tls_port_is_told_so(pki: Pki, tmp_path: Path) -> None:
    async with serving(tls_config(pki, tmp_path)) as (target, _):
        for argv in (["models"], ["complete", "--model", "m", "hi"], ["health", "--timeout", "1"]):
            code, _, err = await run_cli(*argv, "--target", target)
            line = one_line(err)
            assert code in (1, 2), line
            assert f"{target} speaks TLS and this client sent plaintext: add --tls" in line, line
        # With the CA it works, so the message pointed at the right fix.
        code, out, err = await run_cli("health", "--target", target, "--ca-cert", str(pki.ca))
        assert (code, out.strip()) == (0, "(server): SERVING"), err

    async with serving() as (plain_target, _):
        code, _, err = await run_cli("models", "--target", plain_target, "--ca-cert", str(pki.ca))
        assert code == 1
        assert f"{plain_target} does not speak TLS (a plaintext port?): drop --tls" in one_line(err)


async def test_unknown_health_service_names_the_known_ones() -> None:
    async with serving() as (target, _):
        code, _, err = await run_cli("health", "--target", target, "--service", "provider/nope")
    assert code == 3
    assert one_line(err) == (
        "error: health check of 'provider/nope' failed: NOT_FOUND: unknown health service "
        "'provider/nope'; known: '', modelbroker.v1.ModelBroker ('' is liveness)"
    )
