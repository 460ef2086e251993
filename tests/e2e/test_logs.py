"""Logs: one JSON line per request with the fields an operator greps for, and no key anywhere.

The log-scan test runs the daemon as a real process (its stdout and stderr are everything
it ever prints), sends traffic with known provider and caller keys, including upstream
failures that echo a key back (401 with the full wrong key, 500 quoting the key,
connection refused), then stops it and scans every byte for any piece of any key.
Keys are random per run and avoid the well-known shapes (sk-..., mb_...) where the test can,
so only the daemon's registration of configured secrets can hide them.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from broker.auth import hash_key
from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply

REQUEST_FIELDS = {
    "request_id",
    "caller",
    "model",
    "provider",
    "attempts",
    "status",
    "duration_ms",
    "rpc",
}


def secret(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def pieces(key: str, size: int = 12) -> set[str]:
    """Every `size`-character window of the key's random tail: a partial leak counts too."""
    tail = key[-24:]
    return {tail[i : i + size] for i in range(len(tail) - size + 1)}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """`model-broker serve` as a child process; every line it prints is kept."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.raw = bytearray()
        self.serving: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        assert proc.stdout is not None and proc.stderr is not None
        self.readers = [
            asyncio.create_task(self._read(proc.stdout)),
            asyncio.create_task(self._read(proc.stderr)),
        ]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.raw += line
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            if '"event": "serving"' in text and not self.serving.done():
                self.serving.set_result(json.loads(text))

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        await asyncio.gather(*self.readers)
        return code


async def start_daemon(config: Path, *extra: str) -> Daemon:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", "serve", "--config", str(config),
        "--listen", "127.0.0.1:0", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "OLLAMA_"))},
    )  # fmt: skip
    d = Daemon(proc)
    try:
        await asyncio.wait_for(asyncio.shield(d.serving), 30)
    except TimeoutError:
        proc.kill()
        await d.stop()
        raise AssertionError("daemon did not start:\n" + "\n".join(d.lines)) from None
    return d


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


async def test_no_key_reaches_any_output(tmp_path: Path) -> None:
    good, wrong, expected_b = secret("sk-good-"), secret("pk-wrong-"), secret("pk-expected-")
    flaky, gone, ant = secret("zz-flaky-"), secret("zz-gone-"), secret("ant-")
    caller, bad_caller = secret("mb_team-a-"), secret("team-b-")
    keys = {"good": good, "wrong": wrong, "expected_b": expected_b, "flaky": flaky, "gone": gone}
    keys |= {"anthropic": ant, "caller": caller, "bad_caller": bad_caller}

    async with (
        FakeOpenAI(api_key=good) as fake_good,
        FakeOpenAI(api_key=expected_b, echo_full_key=True) as fake_wrong,
        FakeOpenAI(api_key=flaky) as fake_flaky,
        FakeAnthropic(api_key=ant) as fake_ant,
    ):
        fake_good.reply = Reply(text_chunks=["o", "k"], input_tokens=11, output_tokens=2)
        # 500s whose body quotes the key, more of them than any retry policy would try.
        fake_flaky.faults = [
            Fault("status", status=500, message=f"internal error while checking key {flaky}")
            for _ in range(10)
        ]

        def openai(name: str, url: str, key: str) -> dict[str, Any]:
            return {
                "name": name,
                "type": "openai",
                "base_url": url,
                "api_key": key,
                "models": ["gpt-4o-mini"],
            }

        config = {
            "providers": [
                openai("good", fake_good.url, good),
                openai("wrongkey", fake_wrong.url, wrong),
                openai("flaky", fake_flaky.url, flaky),
                openai("gone", f"http://127.0.0.1:{closed_port()}/v1", gone),
                {"name": "claude", "type": "anthropic", "base_url": fake_ant.url, "api_key": ant},
            ],
            "auth": {"keys": [{"name": "team-a", "sha256": hash_key(caller)}]},
            "health": {"interval_seconds": 0.3, "timeout_seconds": 1},
            "server": {"shutdown_grace_seconds": 2},
        }
        path = tmp_path / "broker.yaml"
        path.write_text(yaml.safe_dump(config))
        daemon = await start_daemon(path, "--log-level", "debug")
        target = daemon.serving.result()["listen"]
        replies: list[str] = []  # everything a caller was told
        try:
            async with grpc.aio.insecure_channel(target) as ch:
                s = pb_grpc.ModelBrokerStub(ch)
                auth = (("authorization", f"Bearer {caller}"),)

                msgs = [
                    m
                    async for m in s.StreamComplete(
                        pb.StreamCompleteRequest(model="good/gpt-4o-mini", messages=[user("hi")]),
                        timeout=10,
                        metadata=auth,
                    )
                ]
                assert msgs[-1].HasField("end")
                resp = await s.Complete(
                    pb.CompleteRequest(model="claude/claude-sonnet-4-5", messages=[user("hi")]),
                    timeout=10,
                    metadata=auth,
                )
                replies.append(str(resp))
                failing = [
                    ("wrongkey/gpt-4o-mini", auth),
                    ("flaky/gpt-4o-mini", auth),
                    ("gone/gpt-4o-mini", auth),
                    ("good/gpt-4o-mini", ()),
                    ("good/gpt-4o-mini", (("authorization", f"Bearer {bad_caller}"),)),
                ]
                codes = []
                for model, md in failing:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await s.Complete(
                            pb.CompleteRequest(model=model, messages=[user("hi")]), timeout=10, metadata=md
                        )
                    codes.append(err.value.code())
                    replies.append(f"{err.value.details()} {err.value.trailing_metadata()}")
                assert codes[3:] == [grpc.StatusCode.UNAUTHENTICATED] * 2
                assert all(c != grpc.StatusCode.OK for c in codes)
                providers = await s.ListProviders(pb.ListProvidersRequest(), timeout=10, metadata=auth)
                replies.append(str(providers))
                assert any("HTTP 401" in p.last_error for p in providers.providers), providers
            assert fake_wrong.requests, "the upstream that echoes keys was really called"
            assert any("Incorrect API key provided" in r for r in replies), replies
        finally:
            code = await daemon.stop()

    output = daemon.raw.decode(errors="replace")
    assert code == 0, output
    for name, key in keys.items():
        assert key not in output, f"the {name} key appears in the daemon's output"
        leaked = [p for p in pieces(key) if p in output]
        assert not leaked, f"part of the {name} key appears in the daemon's output: {leaked}"
        for reply in replies:
            assert not [p for p in pieces(key) if p in reply], f"the {name} key reached a caller: {reply}"

    # Not vacuous: it logged the traffic, as JSON (stderr is a pipe, not a terminal).
    events = [json.loads(line) for line in daemon.lines if line.strip()]
    requests = [e for e in events if e["event"] == "request"]
    assert len(requests) == 5, requests  # the two unauthenticated calls never reach the servicer
    for r in requests:
        assert REQUEST_FIELDS <= r.keys(), r
        assert r["caller"] == "team-a"
    ok = [r for r in requests if r["status"] == "OK"]
    assert {r["provider"] for r in ok} == {"good", "claude"}
    for r in ok:
        assert {"ttft_ms", "tokens_in", "tokens_out", "cost_micro_usd"} <= r.keys()
    assert next(r for r in ok if r["provider"] == "good")["tokens_in"] == 11
    assert sorted(r["provider"] for r in requests if r["status"] != "OK") == ["flaky", "gone", "wrongkey"]
    refused = [e for e in events if e["event"] == "request_refused"]
    assert [e["status"] for e in refused] == ["UNAUTHENTICATED", "UNAUTHENTICATED"]
    names = [e["event"] for e in events]
    for lifecycle in ("serving", "shutdown_requested", "health_shutdown", "stopped"):
        assert lifecycle in names
    down = [e for e in events if e["event"] == "provider_health" and e["provider"] == "gone"]
    assert down and down[0]["serving"] is False and down[0]["error"]


async def test_library_warnings_are_json_and_redacted(tmp_path: Path) -> None:
    """stdlib logging (asyncio, httpx) goes through the same redaction and JSON renderer."""
    key = secret("zz-lib-")
    code = (
        "import logging; from broker.logs import configure_logging; from broker.redact import register_secret\n"
        f"register_secret({key!r}); configure_logging('info', json=True)\n"
        f"logging.getLogger('httpx').warning('retrying with key %s', {key!r})\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.decode().splitlines()]
    assert len(lines) == 1 and key not in err.decode()
    assert lines[0]["event"] == "retrying with key [REDACTED]"
    assert lines[0]["level"] == "warning" and lines[0]["logger"] == "httpx"
