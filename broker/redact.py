"""Keep secrets out of everything a caller or a log can see.

Every provider key is registered here when config loads; `redact` replaces registered
secrets and anything shaped like a well-known key (sk-..., Bearer ...) before text leaves
the daemon as an error message or a log field.
"""

from __future__ import annotations

import re

_MIN_SECRET_LEN = 6
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None

# Key shapes upstreams echo back ("Incorrect API key provided: sk-abc...").
_KEY_SHAPES = re.compile(
    r"(sk-(?:ant-|proj-)?[A-Za-z0-9_\-*]{6,}|(?i:bearer)\s+[A-Za-z0-9._\-~+/=*]{6,}|mb_[A-Za-z0-9_\-]{16,})"
)

REDACTED = "[REDACTED]"


def register_secret(secret: str | None) -> None:
    """Remember a secret so `redact` removes it wherever it shows up."""
    global _pattern
    if secret and len(secret) >= _MIN_SECRET_LEN and secret not in _secrets:
        _secrets.add(secret)
        # Longest first so a key that contains another is removed whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(s) for s in ordered))


def redact(text: str) -> str:
    if not text:
        return text
    if _pattern is not None:
        text = _pattern.sub(REDACTED, text)
    return _KEY_SHAPES.sub(REDACTED, text)
