"""Azure OpenAI's differences from the OpenAI wire, as pure functions (PROTOCOLS-CLOUD.md D).

The bodies, the stream and embeddings are OpenAI's (`openai_wire`, called by
azure_openai.py, never copied); what is Azure's own is here: which credential a key is (an
`api-key` or an Entra ID access token), the two routes' paths, the content-filter verdicts
(`content_filter_results` in the stream, `innererror.content_filter_result` in a 400) and the
error codes that mean no such deployment. No I/O.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import orjson

_JWT = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
# Error codes that mean "no such deployment / model" on either route.
NOT_FOUND_CODES = frozenset({"deploymentnotfound", "unknown_model", "model_not_found"})
MAX_CATEGORIES = 16


def is_entra_token(value: str) -> bool:
    return bool(_JWT.match(value))


def filtered_categories(results: Any) -> list[str]:
    """`content_filter_result(s)`: the categories with `filtered: true`, with their severity
    where given ("self_harm:medium", "jailbreak")."""
    found: list[str] = []
    if not isinstance(results, dict):
        return found
    for name, verdict in results.items():
        if isinstance(verdict, dict) and verdict.get("filtered") is True and len(found) < MAX_CATEGORIES:
            severity = verdict.get("severity")
            found.append(f"{name}:{severity}" if isinstance(severity, str) and severity else str(name))
    return found


def route(operation: str, deployment: str, api_version: str | None) -> str:
    """`chat/completions` or `embeddings`: the deployments route with an api-version, else
    the /openai/v1/ route (the deployment name then goes in the body's model)."""
    if api_version:
        name = quote(deployment, safe="")
        return f"openai/deployments/{name}/{operation}?api-version={quote(api_version, safe='')}"
    return f"openai/v1/{operation}"


def models_path(api_version: str | None) -> str:
    """The resource's model listing (free; needs a valid key or token): the health probe."""
    return f"openai/models?api-version={quote(api_version, safe='')}" if api_version else "openai/v1/models"


def error_doc(body: bytes) -> dict[str, Any]:
    """The `error` object of an error body ({} when there is none)."""
    try:
        doc = orjson.loads(body)
    except ValueError:
        return {}
    err = doc.get("error") if isinstance(doc, dict) else None
    return err if isinstance(err, dict) else {}


def is_not_found(err: dict[str, Any]) -> bool:
    return str(err.get("code") or "").lower() in NOT_FOUND_CODES
