"""Provider options: a caller's vendor parameters merged into the body the broker built.

The escape hatch for parameters the neutral API lacks (`provider_options` in the request,
keyed by provider type). The broker's own fields always win: a key the broker set, or one
it reserves for itself whether set or not (the model, the messages, streaming), is refused
with INVALID_ARGUMENT naming the key. Objects merge key by key, so `{"options":
{"num_ctx": 8192}}` adds to the Ollama options the broker set without replacing them.
Values are logged by key only (the caller's parameters may hold anything).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from broker import errors

# Keys no provider type lets options set: what the broker decides for every request.
ALWAYS_RESERVED = frozenset({"model", "messages", "stream", "stream_options"})


def merge_options(
    body: dict[str, Any],
    options: Mapping[str, Any],
    *,
    provider_type: str,
    reserved: Collection[str] = (),
) -> dict[str, Any]:
    """`body` with `options` merged in (in place, returned); raises InvalidArgument on a key
    the broker set or reserves (top level: ALWAYS_RESERVED and `reserved`)."""
    if not options:
        return body
    for key in options:
        if key in ALWAYS_RESERVED or key in reserved:
            raise _refused(provider_type, key, "is set by the broker and cannot be overridden")
    _merge(body, options, provider_type, "")
    return body


def _merge(into: dict[str, Any], extra: Mapping[str, Any], provider_type: str, prefix: str) -> None:
    for key, value in extra.items():
        path = f"{prefix}{key}"
        if key not in into:
            into[key] = value
            continue
        current = into[key]
        if isinstance(current, dict) and isinstance(value, Mapping):
            _merge(current, value, provider_type, path + ".")
            continue
        raise _refused(provider_type, path, "is already set by the broker from the request's own fields")


def _refused(provider_type: str, path: str, why: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(
        [(f"provider_options[{provider_type}].{path}", f"{why}; use the request's own field for it")]
    )


def option_keys(options: Mapping[str, Any]) -> str:
    """The keys (not values) of options, for the log line."""
    return ",".join(sorted(options))
