"""`server.event_loop`: the daemon serves on uvloop by default and on asyncio's own loop when
configured so; the `serving` line names the loop that is actually running."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.clirun import run_cli, serving
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply


@pytest.mark.parametrize(
    ("configured", "running"), [(None, "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
async def test_serves_on_the_configured_event_loop(
    tmp_path: Path, configured: str | None, running: str
) -> None:
    async with FakeOpenAI(models=["gpt-4o-mini"]) as fake:
        fake.reply = Reply(text_chunks=["Bon", "jour"], input_tokens=4, output_tokens=2)
        config = tmp_path / "broker.yaml"
        server = f"server:\n  event_loop: {configured}\n" if configured else ""
        config.write_text(
            f"{server}providers:\n  - name: openai\n    type: openai\n    base_url: {fake.url}\n"
            "    api_key: sk-test-0123456789\n"
        )
        async with serving(config) as (target, daemon):
            code, out, err = await run_cli(
                "complete", "--target", target, "--model", "openai/gpt-4o-mini", "--no-stream", "hi"
            )
            assert (code, out.strip()) == (0, "Bonjour"), err
            started = next(e for e in daemon.events if e.get("event") == "serving")
            assert started["event_loop"] == running


async def test_an_unknown_event_loop_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("server:\n  event_loop: trio\n")
    code, _, err = await run_cli("serve", "--config", str(config), "--listen", "127.0.0.1:0")
    assert code == 2
    assert "server.event_loop" in err and "uvloop" in err, err
