"""The hostile-upstream suite: upstreams nobody sane would write, against a real daemon process.

Each case runs a real `model-broker serve` with two providers, `hostile` (a loopback fake
whose completion endpoint does the hostile thing; discovery and health answer normally) and
`control` (a well-behaved fake), makes one StreamComplete to hostile/<model>, then one to
control/gpt-4o-mini, which must succeed. All along, grpc.health.v1 Check for "" and
"modelbroker.v1.ModelBroker" is polled every 100 ms and must answer SERVING within 1 s, and
the daemon's RSS is sampled; its peak (VmHWM) must stay under the case's cap. After the call
the daemon must have closed the hostile connection (the fake sees it go within 2 s), and on
SIGTERM it must exit within 5 s. The hostile provider runs with ttft/stall timeouts of 4 s
(unless the case sets its own) and fast retries (2 attempts), so a daemon that misses a cap
shows up as the wrong status, not as a hung test. See conftest.py for the machinery.

Every fake is bounded: at most 4 hostile answers, each cut off after 20 s, and the server
stops itself after 60 s. Nothing big is ever allocated: the 1 GiB line and the gzip bomb are
generated lazily, 64 KiB at a time, and stop when the daemon hangs up.

| case | expected status (ErrorInfo reason) | bound | RSS cap |
|---|---|---|---|
| endless stream (caller deadline 1.5 s) | DEADLINE_EXCEEDED; upstream closed within 1 s of the deadline | 2.5 s | 120 MB |
| 1 GiB SSE line, openai, max_line_bytes 1 MiB | UNAVAILABLE UPSTREAM_PROTOCOL_ERROR | 3 s | 120 MB |
| 1 GiB SSE line after content, openai, 1 MiB | UNAVAILABLE STREAM_INTERRUPTED | 3 s | 120 MB |
| 1 GiB SSE line, anthropic, 1 MiB | UNAVAILABLE UPSTREAM_PROTOCOL_ERROR | 3 s | 120 MB |
| 1 GiB NDJSON line, ollama, 1 MiB | UNAVAILABLE UPSTREAM_PROTOCOL_ERROR | 3 s | 120 MB |
| 1 GiB SSE line, openai, default cap (16 MiB) | UNAVAILABLE UPSTREAM_PROTOCOL_ERROR | 6 s | 160 MB |
| 1 GiB NDJSON line, ollama, default cap (16 MiB) | UNAVAILABLE UPSTREAM_PROTOCOL_ERROR | 6 s | 160 MB |
| gzip bomb in the stream (max_decompressed_bytes 8 MiB) | UNAVAILABLE UPSTREAM_PROTOCOL_ERROR | 3 s | 120 MB |
| gzip bomb in the stream, default cap (64 MiB) | UNAVAILABLE UPSTREAM_PROTOCOL_ERROR | 6 s | 160 MB |
| gzip bomb in a 500 error body | UNAVAILABLE UPSTREAM_UNAVAILABLE or UPSTREAM_PROTOCOL_ERROR | 3 s | 120 MB |
| 1 MiB header line | UNAVAILABLE UPSTREAM_PROTOCOL_ERROR or UPSTREAM_UNAVAILABLE | 3 s | 120 MB |
| 1 MiB of headers in 1 KiB lines | UNAVAILABLE UPSTREAM_PROTOCOL_ERROR or UPSTREAM_UNAVAILABLE | 3 s | 120 MB |
| slowloris head (a byte every 0.5 s; ttft 1.5 s) | DEADLINE_EXCEEDED UPSTREAM_TIMEOUT | 5 s | 120 MB |
| slowloris body after content (stall 1.5 s) | UNAVAILABLE STREAM_INTERRUPTED | 3.5 s | 120 MB |
| chunk size -6 / zz / past 64 bits, in the head's read or a later one | UNAVAILABLE UPSTREAM_PROTOCOL_ERROR | 3 s | 120 MB |
| the same after a content event | UNAVAILABLE STREAM_INTERRUPTED | 3 s | 120 MB |
| HTTP/1.0 close-delimited SSE body (openai) | OK, whole text, finish STOP, usage | 3 s | 120 MB |
| HTTP/1.1 close-delimited body (connection: close) | OK, whole text, finish STOP, usage | 3 s | 120 MB |
| HTTP/1.0 close-delimited NDJSON body (ollama) | OK, whole text, finish STOP, usage | 3 s | 120 MB |
| redirect 301/302/307/308 to another host | UNAVAILABLE or FAILED_PRECONDITION; never followed, key never sent | 3 s | 120 MB |
| TLS: self-signed, or from a private CA not trusted | UNAVAILABLE, message names certificate verification; no request sent | 3 s | 120 MB |
| TLS: private CA given in tls_ca_file (control) | OK | 3 s | 120 MB |

A daemon at rest is about 67 MB here (peaks measured: 67-71 MB with 1 MiB / 8 MiB caps, about
100 MB with the default 16 MiB line cap). The caps leave room for one line of the configured
size and its copies, not for a body read whole (a 64 MiB inflated body held at once would
pass 160 MB).
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from modelbroker.v1 import broker_pb2 as pb
from tests.fakes.http import Request, Response, capture_response, sse
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.script import Reply
from tests.hostile.conftest import OPENAI_KEY, Expect, Hostile, Result, run_case
from tests.pki import make_pki

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = b"x" * (64 * 1024)
SMALL_CAP = 120.0  # MB
BIG_CAP = 160.0  # MB: one 16 MiB line / 64 MiB of inflated data in flight, and their copies
PROTOCOL = "UNAVAILABLE UPSTREAM_PROTOCOL_ERROR"
INTERRUPTED = "UNAVAILABLE STREAM_INTERRUPTED"
TIMEOUTS = {"ttft_timeout_seconds": 4, "stall_timeout_seconds": 4}
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"


def check(result: Result) -> None:
    problems = result.problems()
    assert not problems, f"{result.case}: " + "; ".join(problems)


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def oa(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
    obj: dict[str, Any] = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        obj["usage"] = usage
    return sse(obj)


ROLE = oa({"role": "assistant", "content": ""})
HELLO = oa({"content": "Hello"})
REST = [
    oa({}, "stop"),
    oa(None, usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}),
    b"data: [DONE]\n\n",
]


def dechunk(raw: bytes) -> tuple[bytes, bytes]:
    """(head without its blank line, de-chunked body) of a chunked response."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    body = bytearray()
    while True:
        line, _, rest = rest.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            return head, bytes(body)
        body += rest[:size]
        rest = rest[size + 2 :]


# --- endless stream --------------------------------------------------------------------------------


async def endless(req: Request, resp: Response, up: Hostile) -> None:
    await resp.start_stream(200)
    await resp.write(ROLE)
    while True:
        await resp.write(oa({"content": "tick "}))
        await asyncio.sleep(0.02)


async def test_endless_stream_ends_at_the_callers_deadline_and_closes_the_upstream(tmp_path: Path) -> None:
    up = Hostile("openai", endless)
    result = await run_case(
        tmp_path,
        "endless stream, caller deadline 1.5 s",
        up,
        Expect(("DEADLINE_EXCEEDED",), within=2.5, rss_cap_mb=SMALL_CAP, deadline=1.5),
        provider=TIMEOUTS,
    )
    check(result)
    assert result.outcome.text.startswith("tick tick")
    assert result.close_lag is not None and result.close_lag < 1.0, result.close_lag


# --- a 1 GiB line ----------------------------------------------------------------------------------

OPENAI_LINE = (
    b'data: {"id":"chatcmpl-hostile","object":"chat.completion.chunk","created":1,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"'
)
ANTHROPIC_START = [
    sse(
        {
            "type": "message_start",
            "message": {
                "id": "msg_hostile",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-5",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 1},
            },
        },
        "message_start",
    ),
    sse(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        "content_block_start",
    ),
]
ANTHROPIC_LINE = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"'
)
OLLAMA_LINE = (
    b'{"model":"llama3.2","created_at":"2025-01-01T00:00:00Z","message":{"role":"assistant","content":"'
)
CONTENT_TYPES = {
    "openai": "text/event-stream",
    "anthropic": "text/event-stream; charset=utf-8",
    "ollama": "application/x-ndjson",
}


def long_line(vendor: str, before: list[bytes], prefix: bytes, total: int = GiB) -> Any:
    async def behaviour(req: Request, resp: Response, up: Hostile) -> None:
        await resp.start_stream(200, content_type=CONTENT_TYPES[vendor])
        for event in before:
            await resp.write(event)
        await resp.write(prefix)
        sent = len(prefix)
        while sent < total:  # lazily: one 64 KiB block, written again and again
            await resp.write(BLOCK)
            sent += len(BLOCK)
            up.bytes_sent += len(BLOCK)
        await resp.end()

    return behaviour


LINE_CASES = [
    ("openai", [ROLE], OPENAI_LINE, 1 * MiB, PROTOCOL, 3.0, SMALL_CAP),
    ("openai", [ROLE, HELLO], OPENAI_LINE, 1 * MiB, INTERRUPTED, 3.0, SMALL_CAP),
    ("anthropic", ANTHROPIC_START, ANTHROPIC_LINE, 1 * MiB, PROTOCOL, 3.0, SMALL_CAP),
    ("ollama", [], OLLAMA_LINE, 1 * MiB, PROTOCOL, 3.0, SMALL_CAP),
    ("openai", [ROLE], OPENAI_LINE, None, PROTOCOL, 6.0, BIG_CAP),
    ("ollama", [], OLLAMA_LINE, None, PROTOCOL, 6.0, BIG_CAP),
]


@pytest.mark.parametrize(
    ("vendor", "before", "prefix", "cap", "status", "within", "rss_cap"),
    LINE_CASES,
    ids=[
        "openai-1MiB",
        "openai-after-content-1MiB",
        "anthropic-1MiB",
        "ollama-1MiB",
        "openai-default",
        "ollama-default",
    ],
)
async def test_a_1_gib_line_is_cut_at_the_line_cap(
    tmp_path: Path,
    vendor: str,
    before: list[bytes],
    prefix: bytes,
    cap: int | None,
    status: str,
    within: float,
    rss_cap: float,
) -> None:
    up = Hostile(vendor, long_line(vendor, before, prefix))
    shown = f"{cap // MiB} MiB" if cap else "default 16 MiB"
    after = " after content" if HELLO in before else ""
    result = await run_case(
        tmp_path,
        f"1 GiB {'NDJSON' if vendor == 'ollama' else 'SSE'} line{after}, {vendor}, cap {shown}",
        up,
        Expect((status,), within=within, rss_cap_mb=rss_cap),
        provider={**TIMEOUTS, **({"max_line_bytes": cap} if cap else {})},
    )
    result.extra += (
        []
        if up.bytes_sent < 256 * MiB
        else [f"the fake wrote {up.bytes_sent // MiB} MiB before the daemon hung up"]
    )
    check(result)


# --- gzip bomb --------------------------------------------------------------------------------------


def _bomb_blocks() -> tuple[bytes, bytes]:
    """A gzip stream's first block and a block repeatable for ever (each 1 MiB of SSE comments).

    After Z_FULL_FLUSH the compressor keeps no history, so the next 1 MiB compresses to the
    same ~1 KB every time: a 1000:1 bomb of any length, made of two small byte strings.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    unit = b":\n" * (512 * 1024)
    first = c.compress(unit) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(unit) + c.flush(zlib.Z_FULL_FLUSH)
    assert again == c.compress(unit) + c.flush(zlib.Z_FULL_FLUSH)
    return first, again


BOMB_FIRST, BOMB_AGAIN = _bomb_blocks()
BOMB_BATCH = BOMB_AGAIN * 64  # 64 MiB inflated per ~66 KB written


def gzip_bomb(status: int = 200, inflated: int = 100 * GiB) -> Any:
    async def behaviour(req: Request, resp: Response, up: Hostile) -> None:
        ctype = "text/event-stream" if status == 200 else "application/json"
        await resp.start_stream(status, content_type=ctype, headers={"content-encoding": "gzip"})
        await resp.write(BOMB_FIRST)
        total = MiB
        while total < inflated:
            await resp.write(BOMB_BATCH)
            total += 64 * MiB
            up.bytes_sent += len(BOMB_BATCH)
        await resp.end()

    return behaviour


@pytest.mark.parametrize(
    ("cap", "within", "rss_cap"), [(8 * MiB, 3.0, SMALL_CAP), (None, 6.0, BIG_CAP)], ids=["8MiB", "default"]
)
async def test_a_gzip_bomb_is_cut_at_the_decompression_cap(
    tmp_path: Path, cap: int | None, within: float, rss_cap: float
) -> None:
    up = Hostile("openai", gzip_bomb())
    result = await run_case(
        tmp_path,
        f"gzip bomb (100 GiB inflated), cap {f'{cap // MiB} MiB' if cap else 'default 64 MiB'}",
        up,
        Expect((PROTOCOL,), within=within, rss_cap_mb=rss_cap),
        provider={**TIMEOUTS, **({"max_decompressed_bytes": cap} if cap else {})},
    )
    check(result)
    assert up.chat_requests and "identity" in up.chat_requests[0].headers.get("accept-encoding", "")


async def test_a_gzip_bomb_in_an_error_body_is_read_bounded(tmp_path: Path) -> None:
    up = Hostile("openai", gzip_bomb(status=500))
    result = await run_case(
        tmp_path,
        "gzip bomb in a 500 error body",
        up,
        Expect(("UNAVAILABLE UPSTREAM_UNAVAILABLE", PROTOCOL), within=3.0, rss_cap_mb=SMALL_CAP),
        provider={**TIMEOUTS, "max_decompressed_bytes": 8 * MiB},
    )
    check(result)


# --- huge headers -----------------------------------------------------------------------------------


def huge_headers(line_size: int) -> Any:
    """About 1 MiB of response headers in lines of `line_size` bytes, then a valid stream."""

    async def behaviour(req: Request, resp: Response, up: Hostile) -> None:
        await resp.write_raw(SSE_HEAD)
        n = 0
        while n < MiB:
            size = min(line_size, 64 * 1024)  # one header line may be written in several pieces
            name = f"x-junk-{n}: ".encode()
            await resp.write_raw(name)
            left = line_size - len(name)
            while left > 0:
                piece = BLOCK[: min(size, left)]
                await resp.write_raw(piece)
                left -= len(piece)
            await resp.write_raw(b"\r\n")
            n += line_size
        await resp.write_raw(b"\r\n")
        for event in [ROLE, HELLO, *REST]:
            await resp.write(event)
        await resp.end()
        resp.finished = True

    return behaviour


@pytest.mark.parametrize("line_size", [MiB, 1024], ids=["one-1MiB-line", "1KiB-lines"])
async def test_a_megabyte_of_headers_is_refused(tmp_path: Path, line_size: int) -> None:
    up = Hostile("openai", huge_headers(line_size))
    result = await run_case(
        tmp_path,
        f"1 MiB of headers in {'one line' if line_size == MiB else '1 KiB lines'}",
        up,
        Expect((PROTOCOL, "UNAVAILABLE UPSTREAM_UNAVAILABLE"), within=3.0, rss_cap_mb=SMALL_CAP),
        provider=TIMEOUTS,
    )
    check(result)


# --- slowloris --------------------------------------------------------------------------------------


def dribble(before: bytes, data: bytes, every: float = 0.5) -> Any:
    """`before` at once, then `data` one byte every `every` seconds."""

    async def behaviour(req: Request, resp: Response, up: Hostile) -> None:
        if before:
            await resp.write_raw(before)
        for i in range(len(data)):
            await asyncio.sleep(every)
            await resp.write_raw(data[i : i + 1])
        await resp.close()

    return behaviour


WHOLE_STREAM = b"".join(chunk(e) for e in [ROLE, HELLO, *REST]) + b"0\r\n\r\n"


async def test_slowloris_headers_end_at_the_ttft_timeout(tmp_path: Path) -> None:
    up = Hostile("openai", dribble(b"", SSE_HEAD + b"\r\n" + WHOLE_STREAM))
    result = await run_case(
        tmp_path,
        "slowloris head (1 byte / 0.5 s), ttft 1.5 s",
        up,
        Expect(("DEADLINE_EXCEEDED UPSTREAM_TIMEOUT",), within=5.0, rss_cap_mb=SMALL_CAP),
        provider={"ttft_timeout_seconds": 1.5, "stall_timeout_seconds": 1.5},
    )
    check(result)


async def test_slowloris_body_after_content_ends_at_the_stall_timeout(tmp_path: Path) -> None:
    head = SSE_HEAD + b"\r\n" + chunk(ROLE) + chunk(HELLO)
    # The rest of a valid stream, framing included, one byte every 0.5 s: each byte is
    # progress for a socket timer, none is an event.
    rest = b"".join(chunk(e) for e in REST) + b"0\r\n\r\n"
    up = Hostile("openai", dribble(head, rest))
    result = await run_case(
        tmp_path,
        "slowloris body after content (1 byte / 0.5 s), stall 1.5 s",
        up,
        Expect((INTERRUPTED,), within=3.5, rss_cap_mb=SMALL_CAP),
        provider={"ttft_timeout_seconds": 1.5, "stall_timeout_seconds": 1.5},
    )
    check(result)
    assert result.outcome.text == "Hello"


# --- bad chunk sizes --------------------------------------------------------------------------------


def bad_chunks(parts: list[bytes]) -> Any:
    """Write each part as its own read (20 ms apart), then hold the connection open."""

    async def behaviour(req: Request, resp: Response, up: Hostile) -> None:
        for part in parts:
            await resp.write_raw(part)
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)  # the connection stays open: the framing alone must fail it
        await resp.close()

    return behaviour


BAD_SIZES = {
    "-6": b"-6\r\nabcdef\r\n",
    "zz": b"zz\r\nabcdef\r\n",
    "past 64 bits": b"10000000000000000\r\nabcdef\r\n",
}
AFTER_BAD = b"".join(chunk(e) for e in [ROLE, HELLO, *REST]) + b"0\r\n\r\n"
HEAD_END = SSE_HEAD + b"\r\n"
# Where the bad size line arrives: in the head's read, in a read of its own after the head
# (the response is then already handed over), or after a content event reached the caller.
POSITIONS = {
    "with the head": lambda bad: ([HEAD_END + bad + AFTER_BAD], PROTOCOL),
    "after the head": lambda bad: ([HEAD_END, bad + AFTER_BAD], PROTOCOL),
    "after content": lambda bad: ([HEAD_END + chunk(ROLE) + chunk(HELLO), bad + AFTER_BAD], INTERRUPTED),
}


@pytest.mark.parametrize("where", list(POSITIONS))
@pytest.mark.parametrize("size", list(BAD_SIZES))
async def test_a_bad_chunk_size_is_a_protocol_error(tmp_path: Path, size: str, where: str) -> None:
    parts, status = POSITIONS[where](BAD_SIZES[size])
    up = Hostile("openai", bad_chunks(parts))
    result = await run_case(
        tmp_path,
        f"chunk size {size}, {where}",
        up,
        Expect((status,), within=3.0, rss_cap_mb=SMALL_CAP),
        provider=TIMEOUTS,
    )
    check(result)


# --- close-delimited bodies -------------------------------------------------------------------------

REPLY = Reply(text_chunks=["close", "-delimited", " and whole"], input_tokens=17, output_tokens=6)


def close_delimited(status_line: bytes, extra: bytes = b"") -> Any:
    """The fake's own streamed answer, de-chunked, with no length and no chunking; then FIN."""

    async def behaviour(req: Request, resp: Response, up: Hostile) -> None:
        up.fake.reply = REPLY
        head, body = dechunk(await capture_response(up.inner, req))
        ctype = next(
            (ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-type:")),
            b"content-type: text/event-stream",
        )
        await resp.write_raw(status_line + b"\r\n" + ctype + b"\r\n" + extra + b"\r\n" + body)
        await resp.close()

    return behaviour


@pytest.mark.parametrize(
    ("vendor", "status_line", "extra"),
    [
        ("openai", b"HTTP/1.0 200 OK", b""),
        ("openai", b"HTTP/1.1 200 OK", b"connection: close\r\n"),
        ("ollama", b"HTTP/1.0 200 OK", b""),
    ],
    ids=["http1.0-sse", "http1.1-close-sse", "http1.0-ndjson"],
)
async def test_a_close_delimited_body_is_a_complete_answer(
    tmp_path: Path, vendor: str, status_line: bytes, extra: bytes
) -> None:
    up = Hostile(vendor, close_delimited(status_line, extra))
    result = await run_case(
        tmp_path,
        f"{status_line[:8].decode()} close-delimited body ({vendor}{', connection: close' if extra else ''})",
        up,
        Expect(("OK",), within=3.0, rss_cap_mb=SMALL_CAP),
        provider=TIMEOUTS,
    )
    check(result)
    end = result.outcome.end
    assert result.outcome.text == REPLY.text
    assert end is not None and end.finish_reason == pb.FINISH_REASON_STOP
    assert (end.usage.input_tokens, end.usage.output_tokens) == (REPLY.input_tokens, REPLY.output_tokens)


# --- redirects -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_never_followed(tmp_path: Path, status: int) -> None:
    async with FakeOpenAI(models=["gpt-4o-mini"]) as elsewhere:

        async def redirect(req: Request, resp: Response, up: Hostile) -> None:
            target = f"{elsewhere.server.url}/v1/chat/completions"
            await resp.send(status, b"", headers={"location": target}, content_type="text/html")

        up = Hostile("openai", redirect)
        result = await run_case(
            tmp_path,
            f"redirect {status} to another host",
            up,
            Expect(("UNAVAILABLE", "FAILED_PRECONDITION"), within=3.0, rss_cap_mb=SMALL_CAP),
            provider=TIMEOUTS,
        )
        followed = [r for r in elsewhere.requests if r.method == "POST"]
        keyed = [r for r in elsewhere.requests if OPENAI_KEY in r.headers.get("authorization", "")]
    check(result)
    assert not followed, f"the redirect was followed: {[(r.method, r.path) for r in followed]}"
    assert not keyed, "the provider key reached the redirect target"
    assert 1 <= len(up.chat_requests) <= 2  # the attempt and at most one retry, to the original URL


# --- TLS the daemon must not trust ------------------------------------------------------------------


async def ok_stream(req: Request, resp: Response, up: Hostile) -> None:
    await up.inner(req, resp)


def self_signed(d: Path) -> tuple[Path, Path]:
    """A self-signed leaf for 127.0.0.1 (no CA at all), made with the openssl binary."""
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "self.key", "-out", "self.pem", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", "-addext", "extendedKeyUsage=serverAuth",
        ],
        cwd=d, check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return d / "self.pem", d / "self.key"


TLS_CASES = {
    # (how the server's certificate is made, trusted through tls_ca_file?)
    "self-signed": ("self", False),
    "private CA, not trusted": ("ca", False),
    "private CA, trusted via tls_ca_file": ("ca", True),
}


@pytest.mark.parametrize("kind", list(TLS_CASES))
async def test_an_untrusted_tls_certificate_is_refused(tmp_path: Path, kind: str) -> None:
    made, trusted = TLS_CASES[kind]
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    pki = make_pki(pki_dir)
    cert, key = self_signed(pki_dir) if made == "self" else (pki.server_cert, pki.server_key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    up = Hostile("openai", ok_stream, ssl=ctx)
    # The handshake failures are the point; keep asyncio's report of them out of the way.
    asyncio.get_running_loop().set_exception_handler(_quiet_tls)
    if trusted:
        # The control: the same server, its CA given to the daemon, is accepted.
        expect = Expect(("OK",), within=3.0, rss_cap_mb=SMALL_CAP)
    else:
        expect = Expect(
            ("UNAVAILABLE",), within=3.0, rss_cap_mb=SMALL_CAP, details_has=("certificate", "verif")
        )
    result = await run_case(
        tmp_path,
        f"TLS upstream, {kind}",
        up,
        expect,
        provider={**TIMEOUTS, **({"tls_ca_file": str(pki.ca)} if trusted else {})},
    )
    check(result)
    assert up.url.startswith("https://")
    if trusted:
        assert result.outcome.text == "Hello there!"  # the fake's default reply
    else:
        assert not up.chat_requests, "a request went over a connection the daemon should not trust"


def _quiet_tls(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if isinstance(context.get("exception"), ssl.SSLError | ConnectionResetError):
        return
    loop.default_exception_handler(context)
