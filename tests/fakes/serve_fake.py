"""Run a FakeOpenAI upstream as a separate process, for tests written in other languages.

    .venv/bin/python tests/fakes/serve_fake.py [--api-key KEY] [--max-seconds 120]

It prints one JSON line, `{"url": "http://127.0.0.1:PORT/v1", "port": PORT}`, once it
listens on 127.0.0.1 (port 0: the OS picks), then reads one command per line on stdin and
answers each with one JSON line on stdout:

    stop              take the upstream down (connections dropped, as a crash would)
    start             bring it back on the same port
    reply {json}      the next answers: Reply fields (text_chunks, input_tokens, chunk_delay...)
    fault {json}      queue a Fault for the next chat request (kind, status, after_chunks...)
    stats             {"chat_requests": N, "disconnects": N}

It exits when stdin closes, on SIGTERM/SIGINT, or after --max-seconds whatever happens, so a
test runner that dies without cleaning up cannot leave it running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

# Run as a script (python tests/fakes/serve_fake.py): make the repo root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fakes.openai_upstream import CHAT_PATH, FakeOpenAI
from tests.fakes.script import Fault, Reply, ToolCallScript


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _reply(fields: dict[str, Any]) -> Reply:
    calls = [ToolCallScript(**c) for c in fields.pop("tool_calls", [])]
    return Reply(tool_calls=calls, **fields)


async def _command(fake: FakeOpenAI, line: str, disconnects: list[float]) -> dict[str, Any]:
    verb, _, arg = line.strip().partition(" ")
    if verb == "stop":
        await fake.stop()
    elif verb == "start":
        await fake.start()
    elif verb == "reply":
        fake.reply = _reply(json.loads(arg))
    elif verb == "fault":
        fake.faults.append(Fault(**json.loads(arg)))
    elif verb == "reasoning":
        fake.reasoning_chunks = list(json.loads(arg))
    elif verb == "stats":
        while not fake.server.disconnects.empty():
            disconnects.append(fake.server.disconnects.get_nowait())
        chats = sum(1 for r in fake.requests if r.path == CHAT_PATH)
        return {"ok": verb, "chat_requests": chats, "disconnects": len(disconnects)}
    else:
        return {"error": f"unknown command {verb!r}: use stop, start, reply, fault, reasoning or stats"}
    return {"ok": verb}


def _read_stdin(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str]) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(lines.put_nowait, line)
    loop.call_soon_threadsafe(lines.put_nowait, "")


def _quiet_disconnects(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Clients hanging up mid-response is what cancellation tests do on purpose; the fake
    # counts those as disconnects, so the "exception never retrieved" noise is dropped.
    if isinstance(context.get("exception"), ConnectionError):
        return
    loop.default_exception_handler(context)


async def _serve(api_key: str | None, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_disconnects)
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    lines: asyncio.Queue[str] = asyncio.Queue()
    # A daemon thread reads stdin whatever it is (pipe, file, tty); it cannot keep us alive.
    threading.Thread(target=_read_stdin, args=(loop, lines), daemon=True).start()
    fake = await FakeOpenAI(api_key=api_key).start()
    _emit({"url": fake.url, "port": fake.server.port})
    disconnects: list[float] = []

    async def commands() -> None:
        while line := await lines.get():  # "" at EOF: the parent went away
            if not line.strip():
                continue
            try:
                _emit(await _command(fake, line, disconnects))
            except (ValueError, TypeError) as exc:  # a malformed argument must not kill the fake
                _emit({"error": f"{type(exc).__name__}: {exc}"})
        done.set()

    task = asyncio.create_task(commands())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), max_seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await fake.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api-key", default=None, help="the key the fake demands (default: none)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="exit after this long regardless")
    args = p.parse_args()
    asyncio.run(_serve(args.api_key, args.max_seconds))


if __name__ == "__main__":
    main()
