"""Vertex AI's own wire facts: pure functions, no I/O (PROTOCOLS-CLOUD.md B1, B3, B4).

The bodies and answers are other protocols' (gemini_request/gemini_wire for Gemini,
anthropic_request/anthropic_wire for Claude); what is Vertex's is here: which publisher a
model id names, the request paths under a project and location, Claude's body version, the
publisher listing's path, and reading an error body that may come from either layer
(Google's front end answers google.rpc Status bodies; Claude's own validation, Anthropic's).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

from broker import errors
from broker.providers import anthropic_wire
from broker.providers import gemini_wire as gwire
from broker.providers.base import UpstreamErrorInfo, classify_error
from broker.redact import redact

GEMINI_API_VERSION = "v1beta1"  # python-genai's Vertex version (the recordings' paths)
CLAUDE_API_VERSION = "v1"  # the anthropic SDK's Vertex client
# The body's API version of Claude on Vertex (in place of the anthropic-version header).
ANTHROPIC_VERSION = "vertex-2023-10-16"
PUBLISHERS = ("google", "anthropic")


def publisher_of(model: str) -> tuple[str, str]:
    """(publisher, model id): `anthropic/claude-x` and `google/gemini-x` as named; a bare
    `claude-*` id is Anthropic's, any other bare id Google's."""
    head, sep, rest = model.partition("/")
    if sep and rest:
        return head, rest
    return ("anthropic" if model.lower().startswith("claude") else "google"), model


def _scope(version: str, project: str, location: str) -> str:
    return f"{version}/projects/{urllib.parse.quote(project, safe='')}/locations/{location}"


def _quoted(model: str) -> str:
    # Vertex's versioned ids carry an `@` (claude-haiku-4-5@20251001), kept as the SDKs send it.
    return urllib.parse.quote(model, safe="@")


def gemini_path(project: str, location: str, model: str) -> str:
    scope = _scope(GEMINI_API_VERSION, project, location)
    return f"{scope}/publishers/google/models/{_quoted(model)}:streamGenerateContent?alt=sse"


def claude_path(project: str, location: str, model: str) -> str:
    scope = _scope(CLAUDE_API_VERSION, project, location)
    return f"{scope}/publishers/anthropic/models/{_quoted(model)}:streamRawPredict"


def models_path(page_size: int, page_token: str | None = None) -> str:
    """Google's publisher listing (no project in the path, as python-genai calls it)."""
    path = f"{GEMINI_API_VERSION}/publishers/google/models?pageSize={page_size}"
    return f"{path}&pageToken={urllib.parse.quote(page_token, safe='')}" if page_token else path


def error_info(body: bytes) -> UpstreamErrorInfo:
    parsed = gwire.parse_status(body)
    return parsed[0] if parsed is not None else anthropic_wire.parse_error_body(body)


def error_from_body(
    provider: str, status: int, headers: Mapping[str, str], body: bytes, *, model: str
) -> errors.BrokerError:
    if gwire.parse_status(body) is not None:
        return gwire.error_from_body(provider, status, headers, body, model=model)
    info = anthropic_wire.parse_error_body(body)
    message = f"{provider} returned HTTP {status}: {redact(info.message) or 'no message'}"
    kw: dict[str, Any] = {"provider": provider, "model": model, "upstream_status": status}
    return classify_error(status, info, message, headers, kw)
