"""The request-line chain of broker/logs.py gives the same text as structlog's own processors
it stands in for: `bound_and_redact` = errors.bound_log_processor then redact_processor,
`iso_utc_stamp` = TimeStamper(fmt="iso", utc=True), `json_renderer` = JSONRenderer()."""

from __future__ import annotations

import copy
import datetime
import enum
import re
import secrets
import time
from typing import Any

import pytest
import structlog

from broker import errors, logs
from broker.redact import register_secret

SECRET = f"zz{secrets.token_hex(12)}"
register_secret(SECRET)


class Colour(enum.StrEnum):
    RED = "red"


EVENTS: list[dict[str, Any]] = [
    {
        "event": "request",
        "rpc": "Complete",
        "status": "OK",
        "tokens_in": 5,
        "cost_micro_usd": None,
        "duration_ms": 0.04,
        "usage_estimated": True,
        "caller": "",
    },
    {"event": "x", "error": f"upstream said {SECRET}", "model": SECRET[:10]},
    {"event": "x", "long": "y" * (errors.MAX_LOG_VALUE_CHARS + 5) + SECRET},
    {"event": "x", "exception": "t" * (errors.MAX_LOG_VALUE_CHARS + 5)},
    {"event": "x", "tags": {"team": SECRET, SECRET: "v"}, "provider_options": {"openai": ["a", "b"]}},
    {"event": "x", "list": [SECRET, 1, None, [2, {"k": SECRET}]], "t": (1, 2), "s": frozenset({3})},
    {"event": "x", "colour": Colour.RED, "obj": ValueError(SECRET), "b": b"bytes " + SECRET.encode()},
    {"event": "x", "n": 10**30, "f": float("inf"), "flag": False},
]


@pytest.mark.parametrize("event", EVENTS)
def test_bound_and_redact_is_bounding_then_redacting(event: dict[str, Any]) -> None:
    expected = logs.redact_processor(
        None, "info", errors.bound_log_processor(None, "info", copy.deepcopy(event))
    )
    got = logs.bound_and_redact(None, "info", copy.deepcopy(event))
    assert got == expected
    assert [type(v) for v in got.values()] == [type(v) for v in expected.values()]


@pytest.mark.parametrize("event", EVENTS)
def test_json_renderer_writes_what_structlog_writes(event: dict[str, Any]) -> None:
    clean = logs.bound_and_redact(None, "info", copy.deepcopy(event))
    assert logs.json_renderer()(None, "info", dict(clean)) == structlog.processors.JSONRenderer()(
        None, "info", dict(clean)
    )
    odd = {"event": "x", "obj": object()}  # not JSON: both fall back to its repr
    assert logs.json_renderer()(None, "info", odd) == structlog.processors.JSONRenderer()(None, "info", odd)


@pytest.mark.parametrize(
    "ns",
    [
        0,
        1_764_608_400_000_000_000,  # a whole second: no fraction shown, as isoformat does
        1_764_608_400_000_001_000,
        1_764_608_400_123_456_789,  # nanoseconds floored to microseconds, as datetime.now does
        1_764_608_459_999_999_999,
        951_782_400_500_000_000,  # 2000-02-29
    ],
)
def test_iso_utc_stamp_is_structlogs_iso_utc_text(monkeypatch: pytest.MonkeyPatch, ns: int) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: ns)
    got = logs.iso_utc_stamp(None, "info", {})["timestamp"]
    # What TimeStamper(fmt="iso", utc=True) writes for that instant.
    moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(microseconds=ns // 1000)
    assert got == moment.isoformat().replace("+00:00", "Z")


def test_iso_utc_stamp_reads_the_clock_like_timestamper() -> None:
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    for _ in range(20):
        before = stamper(None, "info", {})["timestamp"]
        ours = logs.iso_utc_stamp(None, "info", {})["timestamp"]
        after = stamper(None, "info", {})["timestamp"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", ours)
        assert before[:19] <= ours[:19] <= after[:19]
