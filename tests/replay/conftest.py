"""The replay tally: printed at the end of any run that includes tests/replay.

    replay: N recordings (C cases with D derived): P passed, G expected gaps, X pending fixes ...

followed by the gaps with their reasons, the pending fixes and any failure, so the figures can
be pasted into a closing note. Also written to <pytest basetemp>/replay-summary.md.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import pytest

from tests.replay.cases import BY_ID, CASES

_ID = re.compile(r"::test_replay\[(?P<id>[^\]]+)\]$")
OUTCOMES: dict[str, str] = {}  # case id -> passed | failed | xfailed | xpassed


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    m = _ID.search(report.nodeid)
    if m is None or m["id"] not in BY_ID:
        return
    cid = m["id"]
    if report.when == "call" or report.outcome != "passed":
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.failed:
            outcome = "xpassed" if "XPASS(strict)" in str(report.longrepr) else "failed"
        else:
            outcome = report.outcome
        if OUTCOMES.get(cid) != "failed":  # a teardown error after a pass still counts
            OUTCOMES[cid] = outcome


def render() -> list[str]:
    if not OUTCOMES:
        return []
    run = [c for c in CASES if c.id in OUTCOMES]
    recordings = {c.source for c in run}
    derived = [c for c in run if c.source != c.id]
    passed = [c for c in run if OUTCOMES[c.id] == "passed" and c.gap is None and c.pending is None]
    gaps = [
        c for c in run if c.gap is not None and c.pending is None and OUTCOMES[c.id] in ("passed", "xfailed")
    ]
    pending = [c for c in run if c.pending is not None and OUTCOMES[c.id] == "xfailed"]
    failed = [c for c in run if c not in passed and c not in gaps and c not in pending]
    lines = [
        f"{len(recordings)} recordings ({len(run)} cases, {len(derived)} of them derived), "
        f"{len(passed)} passed, {len(gaps)} expected gaps, "
        f"{len(pending)} pending fixes (xfail until issue 10 item 4 lands), {len(failed)} failed",
    ]
    by_reason: dict[str, list[str]] = defaultdict(list)
    for c in gaps:
        assert c.gap is not None
        how = "xfail" if c.gap.xfail else "asserted"
        by_reason[f"{c.gap.reason} [{how}]"].append(c.id)
    if by_reason:
        lines += ["", "expected gaps:"]
        lines += [f"  - {reason}: {len(ids)}: {', '.join(ids)}" for reason, ids in by_reason.items()]
    if pending:
        lines += ["", "pending fixes:"]
        lines += [f"  - {c.id}: {c.pending}" for c in pending]
    fixed = [c for c in run if c.fixed is not None and OUTCOMES[c.id] == "passed"]
    if fixed:
        lines += ["", "issue 10 item 4 fixes the replay proves:"]
        lines += [f"  - {c.id}: {c.fixed.removeprefix('issue 10 item 4: ')}" for c in fixed if c.fixed]
    if failed:
        lines += ["", "FAILED (not an expected gap: see the test's output for what the daemon answered):"]
        lines += [f"  - {c.id}: {OUTCOMES[c.id]}" for c in failed]
    return lines


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = render()
    if not lines:
        return
    terminalreporter.section("replay summary")
    for line in lines:
        terminalreporter.write_line(line)
    base = config._tmp_path_factory.getbasetemp() if hasattr(config, "_tmp_path_factory") else None
    if base is not None:
        path = base / "replay-summary.md"
        path.write_text("\n".join(lines) + "\n")
        terminalreporter.write_line(f"(also written to {path})")
