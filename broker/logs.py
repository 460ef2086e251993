"""structlog set-up: JSON lines when stderr is not a terminal, a console renderer when it is.

Every event passes through `redact_processor` last-but-one, so no provider or caller key
can reach a log line whatever a call site puts in it. Whatever bounds a line's size must run
after it (redact first, then truncate: a cut key may be too short to recognise).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from broker import errors
from broker.redact import redact


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
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
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    extra = [_static_fields(dict(static))] if static else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *extra,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            errors.bound_log_processor,  # bounded lines: no caller string makes a 3 MB line
            redact_processor,
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
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                errors.bound_log_processor,
                redact_processor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
