"""structlog set-up: JSON lines when stderr is not a terminal, a console renderer when it is.

Every event passes through `redact_processor` last-but-one, so no provider or caller key
can reach a log line whatever a call site puts in it. Whatever bounds a line's size must run
after it (redact first, then truncate: a cut key may be too short to recognise).

Every request writes a line, so the chain is kept cheap where it can be without changing a
byte of it: `bound_and_redact` does `errors.bound_log_processor` + `redact_processor` in one
pass when every value is a plain scalar or a short string (the two-step path otherwise), the
timestamp is structlog's ISO-UTC text without a datetime per line (`iso_utc_stamp`), and the
JSON is json.dumps's with one encoder for all lines (`json_renderer`).
"""

from __future__ import annotations

import json as _json
import logging
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import structlog

from broker import errors
from broker.redact import redact, redact_fields

# What `_redact_value` passes through untouched (a tuple built once: `bool | int | float` in
# an isinstance call builds a union object per call).
_SCALARS = (bool, int, float)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, _SCALARS):
        return value
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    # Anything else (an exception, a URL object, bytes) would be rendered with repr(): redact
    # that text, so no object can carry a key past this step.
    return redact(repr(value))


def redact_processor(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    return {k: _redact_value(v) for k, v in event.items()}


def bound_and_redact(logger: Any, name: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """`redact_processor(errors.bound_log_processor(event))`, the same result: when every value
    is a str within `errors.MAX_LOG_VALUE_CHARS` (which bounding leaves alone) or a plain
    scalar, one pass that only redacts the strings (`redact_fields`); anything else takes
    both steps."""
    out = redact_fields(event, errors.MAX_LOG_VALUE_CHARS)
    if out is not None:
        return out
    return redact_processor(logger, name, errors.bound_log_processor(logger, name, event))


def iso_utc_stamp(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog's `TimeStamper(fmt="iso", utc=True)`: the same text (`datetime.now(utc)
    .isoformat()` with `Z`, microseconds floored, none shown when 0), with the date and time
    formatted once per second instead of a datetime per line."""
    secs, micros = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _stamp_second
    if cached[0] != secs:
        t = time.gmtime(secs)
        text = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        cached = _set_stamp_second(secs, text)
    event["timestamp"] = f"{cached[1]}.{micros:06d}Z" if micros else f"{cached[1]}Z"
    return event


# (second, its text): replaced whole, so a thread never pairs one second with another's text.
_stamp_second: tuple[int, str] = (-1, "")


def _set_stamp_second(secs: int, text: str) -> tuple[int, str]:
    global _stamp_second
    _stamp_second = (secs, text)
    return _stamp_second


def _json_fallback(obj: Any) -> Any:
    # What structlog's JSONRenderer does with a value json cannot encode (after
    # redact_processor every value is JSON already, so this is only a safety net).
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


def json_renderer() -> Callable[[Any, str, MutableMapping[str, Any]], str]:
    """structlog's `JSONRenderer()`: `json.dumps(event, default=...)`, the same text, from one
    encoder (json.dumps with `default` builds a JSONEncoder per call)."""
    encode = _json.JSONEncoder(default=_json_fallback).encode

    def render(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
        return encode(event)

    return render


def _static_fields(fields: Mapping[str, Any]) -> Any:
    def add(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for k, v in fields.items():
            event.setdefault(k, v)
        return event

    return add


def configure_logging(
    level: str = "info", *, json: bool | None = None, static: Mapping[str, Any] | None = None
) -> None:
    """`static`: fields on every line, e.g. {"worker": 1, "pid": 4242} under `serve --workers`,
    so a request line says which process served it."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = json_renderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    extra = [_static_fields(dict(static))] if static else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *extra,
            structlog.processors.add_log_level,
            iso_utc_stamp,
            structlog.processors.format_exc_info,
            # Bounded lines (no caller string makes a 3 MB line), then redacted.
            bound_and_redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line (message + newline together): `--workers` processes share
        # stderr, and PrintLogger's separate newline write let their lines interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (asyncio, aiohttp, grpc's Python layer) log through stdlib logging: send their
    # warnings through the same redaction and renderer, so every line is JSON and key-free.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                *extra,
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                iso_utc_stamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                bound_and_redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
