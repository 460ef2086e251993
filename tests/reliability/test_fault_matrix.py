"""The fault matrix: every upstream failure x {unary, stream}, alone and with a fallback.

For each fault the primary upstream fails every chat request the same way; a second,
healthy upstream is named in `fallback_models` for the "with a fallback" runs. Each of the
four RPCs asserts the status code and ErrorInfo reason the caller sees, whether the
fallback served it (the backup fake counting chat requests says so, not the broker), that
no asyncio task was left behind and that the in-flight count is back to 0.

What the rows prove: retryable failures before any output move on (connection refused,
reset, 429, 5xx, 529, a silent upstream); the broker's own key or an unknown model do not;
after content has reached a streaming caller nothing is retried or spliced
(STREAM_INTERRUPTED), while a unary caller, who has seen nothing yet, gets a clean answer
from the fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.conftest import OPENAI_TEST_KEY, broker_settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Fault, Reply
from tests.reliability.conftest import (
    FAST_ROUTING,
    Outcome,
    openai_provider,
    refused_url,
    settled,
    stream,
    stub,
    unary,
    user,
)

UNAVAILABLE = "UNAVAILABLE UPSTREAM_UNAVAILABLE"
TIMEOUT = "DEADLINE_EXCEEDED UPSTREAM_TIMEOUT"
PROTOCOL = "UNAVAILABLE UPSTREAM_PROTOCOL_ERROR"
INTERRUPTED = "UNAVAILABLE STREAM_INTERRUPTED"
OK = "OK"


@dataclass(frozen=True)
class Case:
    fault: str
    script: Fault | None  # None: nothing listens (connection refused)
    alone: tuple[str, str]  # (unary, stream) status with no fallback
    with_fallback: tuple[str, str]
    fallback_used: tuple[bool, bool]


def both(status: str) -> tuple[str, str]:
    return (status, status)


CASES = [
    Case("connection refused", None, (UNAVAILABLE, UNAVAILABLE), (OK, OK), (True, True)),
    Case(
        "reset before headers",
        Fault("reset_before_headers"),
        (UNAVAILABLE, UNAVAILABLE),
        (OK, OK),
        (True, True),
    ),
    Case(
        "401 (the broker's key)",
        Fault("status", status=401),
        both("FAILED_PRECONDITION UPSTREAM_AUTH_FAILED"),
        both("FAILED_PRECONDITION UPSTREAM_AUTH_FAILED"),
        (False, False),
    ),
    Case(
        "404 (unknown model)",
        Fault("status", status=404),
        both("NOT_FOUND MODEL_NOT_FOUND"),
        both("NOT_FOUND MODEL_NOT_FOUND"),
        (False, False),
    ),
    Case(
        "429 with Retry-After: 1",
        Fault("status", status=429, headers={"retry-after": "1"}),
        both("RESOURCE_EXHAUSTED UPSTREAM_RATE_LIMITED"),
        (OK, OK),
        (True, True),
    ),
    Case("500", Fault("status", status=500), (UNAVAILABLE, UNAVAILABLE), (OK, OK), (True, True)),
    Case("503", Fault("status", status=503), (UNAVAILABLE, UNAVAILABLE), (OK, OK), (True, True)),
    Case(
        "529 overloaded",
        Fault("status", status=529, error_type="overloaded_error"),
        (UNAVAILABLE, UNAVAILABLE),
        (OK, OK),
        (True, True),
    ),
    Case(
        "timeout before the first byte",
        Fault("stall_before_headers", seconds=10),
        (TIMEOUT, TIMEOUT),
        (OK, OK),
        (True, True),
    ),
    Case(
        "stall mid-stream",
        Fault("stall_mid_stream", after_chunks=1, seconds=10),
        (TIMEOUT, INTERRUPTED),
        (OK, INTERRUPTED),
        (True, False),
    ),
    Case(
        "disconnect mid-stream",
        Fault("disconnect_mid_stream", after_chunks=1),
        (UNAVAILABLE, INTERRUPTED),
        (OK, INTERRUPTED),
        (True, False),
    ),
    Case(
        "malformed SSE/JSON",
        Fault("malformed", after_chunks=1),
        (PROTOCOL, INTERRUPTED),
        (OK, INTERRUPTED),
        (True, False),
    ),
    Case(
        "stream ends without [DONE]",
        Fault("no_terminator"),
        (PROTOCOL, INTERRUPTED),
        (OK, INTERRUPTED),
        (True, False),
    ),
]

# Short in-stream timeouts on the primary so the silent-upstream faults take a fraction of a second.
TTFT, STALL = 0.3, 0.3


@pytest.fixture
async def backup() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as fake:
        fake.reply = Reply(text_chunks=["from ", "the ", "backup"])
        yield fake


@pytest.mark.parametrize("case", CASES, ids=[c.fault for c in CASES])
async def test_fault(case: Case, backup: FakeOpenAI, daemon, channel_to, report) -> None:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as primary:
        primary.reply = Reply(text_chunks=["partial ", "answer ", "from ", "primary"])
        url = refused_url() if case.script is None else primary.url
        settings = broker_settings(
            [
                openai_provider(
                    "primary", url, priority=10, ttft_timeout_seconds=TTFT, stall_timeout_seconds=STALL
                ),
                openai_provider("backup", backup.url, priority=20),
            ],
            routing=FAST_ROUTING,
        )
        server, target = await daemon(settings)
        s = stub(channel_to(target))
        seen: dict[tuple[str, str], tuple[Outcome, bool]] = {}
        for label, fallbacks in (("alone", []), ("with_fallback", ["backup/gpt-4o-mini"])):
            for kind in ("unary", "stream"):
                # Every attempt meets the fault: retries must not paper over it.
                primary.faults[:] = [] if case.script is None else [case.script] * 6
                backup_before = len(backup.chat_bodies)
                before = set(asyncio.all_tasks())
                model, messages = "primary/gpt-4o-mini", [user("hi")]
                if kind == "unary":
                    r = pb.CompleteRequest(model=model, messages=messages, fallback_models=fallbacks)
                    out = await unary(s, r)
                else:
                    sr = pb.StreamCompleteRequest(model=model, messages=messages, fallback_models=fallbacks)
                    out = await stream(s, sr)
                used = len(backup.chat_bodies) > backup_before
                leftovers = await settled(server, before)
                assert not leftovers, f"{case.fault} {label} {kind}: {leftovers}"
                seen[(label, kind)] = (out, used)
        primary.faults.clear()

    for label, expected in (("alone", case.alone), ("with_fallback", case.with_fallback)):
        for kind, want in zip(("unary", "stream"), expected, strict=True):
            out, used = seen[(label, kind)]
            assert out.status == want, f"{case.fault} {label} {kind}: {out.status} ({out.metadata})"
            if out.code != "OK":
                assert out.metadata.get("provider") == "primary", out.metadata
    for kind, want_used in zip(("unary", "stream"), case.fallback_used, strict=True):
        out, used = seen[("with_fallback", kind)]
        assert used == want_used, f"{case.fault} {kind}: fallback used {used}, expected {want_used}"
        if want_used:
            assert (out.provider, out.text) == ("backup", "from the backup")
        assert not seen[("alone", kind)][1], "the backup must not be called when not named"

    for kind in ("unary", "stream"):
        out = seen[("alone", kind)][0]
        if out.reason == "UPSTREAM_RATE_LIMITED":
            assert out.retry_delay == 1.0, "RetryInfo must carry the upstream's Retry-After"
        if out.reason == "STREAM_INTERRUPTED":
            # Content reached the caller before the failure, and the status says how much.
            assert out.deltas >= 1 and out.text.startswith("partial")
            assert out.metadata["delivered_chunks"] == str(out.deltas)
            assert out.metadata["delivered_text_chars"] == str(len(out.text))
            assert out.metadata["model"] == "gpt-4o-mini"
            assert int(out.metadata["usage_output_tokens"]) >= 1
            assert not any(m.HasField("end") for m in out.messages)

    def cell(kind: int) -> str:
        alone = seen[("alone", ("unary", "stream")[kind])][0].status
        fb = seen[("with_fallback", ("unary", "stream")[kind])][0].status
        return alone if fb == alone else f"{alone} -> {fb} via fallback"

    used_cell = " / ".join("yes" if u else "no" for u in case.fallback_used)
    report.order = [c.fault for c in CASES]
    report.matrix[case.fault] = (cell(0), cell(1), used_cell)
