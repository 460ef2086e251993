"""Every recording in ../shared/recordings, replayed byte for byte through a real daemon.

One test per row of cases.CASES (the recordings plus the derived cases). A row with an open
gap either asserts the gap as it stands or is xfail(strict=True) with its reason; a row whose
defect issue 10 item 4 is fixing asserts the correct behaviour and is xfail(strict=True) until
the fix lands. Nothing is skipped. conftest.py prints the tally at the end of the run.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.replay import harness
from tests.replay.cases import CASES, Case

# Rows that do not go through a completion: only their recording and their gap are checked.
NOT_CHAT = ("embed", "count_tokens", "oauth_token", "responses")


def _marks(case: Case) -> list[Any]:
    if case.pending:
        return [pytest.mark.xfail(strict=True, reason=case.pending)]
    if case.gap is not None and case.gap.xfail:
        # A missing provider type must fail as exactly that; anything else (a config key the
        # new provider names differently, a wrong answer) is a real failure.
        raises = harness.MissingProviderType if "provider type" in case.gap.reason else None
        return [pytest.mark.xfail(strict=True, reason=case.gap.reason, raises=raises)]
    return []


def _report(case: Case, problems: list[str], observed: harness.Observed) -> str:
    lines = [f"{case.id} (recording {case.source}):"]
    lines += [f"  - {p}" for p in problems]
    lines.append("  the daemon answered:")
    lines += [f"    {line}" for line in observed.summary().splitlines()]
    return "\n".join(lines)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES])
async def test_replay(case: Case, daemon: Any, channel_to: Any) -> None:
    if case.kind in NOT_CHAT:
        harness.load(case.source)  # the recording is there...
        assert case.gap is not None, f"{case.id}: a {case.kind} row needs its gap"
        closed = harness.open_gaps(case.gap)  # ...and the API still lacks what it needs
        assert not closed, (
            f"{case.id}: the gap is closing ({'; '.join(closed)}): replay it now ({case.gap.reason})"
        )
        return
    run = await harness.run(case, daemon, channel_to)
    problems = harness.mismatches(case, run)
    if case.gap is not None and not case.gap.xfail:
        problems += [
            f"gap closing: {c}: assert what it carries ({case.gap.reason})"
            for c in harness.open_gaps(case.gap)
        ]
    assert not problems, _report(case, problems, run.observed)


def test_every_recording_has_a_row() -> None:
    """A recording added to ../shared/recordings without a row here fails, and so does a row without one."""
    recorded = set(harness.recording_ids())
    rows = {c.source for c in CASES}
    assert not recorded - rows, f"recordings with no row in tests/replay/cases.py: {sorted(recorded - rows)}"
    assert not rows - recorded, (
        f"rows whose recording is missing from {harness.RECORDINGS}: {sorted(rows - recorded)}"
    )
