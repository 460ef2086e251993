"""Keep secrets out of everything a caller or a log can see.

Every configured secret is registered here when config loads (provider `api_key` and
`api_key_file` contents, every `headers:` value, `proxy` and `base_url` credentials) and
when a caller first authenticates (its plaintext key, which the config holds only as a
hash). `redact` replaces, before text leaves the daemon as an error message, a
`last_error`, a log field or `config show` output:

- a registered secret, whole;
- any prefix of it at least PREFIX_MIN (8) characters long: a key an upstream or a snippet
  cut short still goes (a prefix under 16 characters only where the text does not go on
  with a letter or digit, so `sk-test-abc` is not taken for a cut `sk-test-xyz...`);
- its masked echoes: at least 3 leading characters, a run of mask characters (`*`, `.`,
  `…`, `•`, `x`) and at least its last 3 characters, the way OpenAI echoes a wrong key
  (`sk-proj-ab*****wxyz`, `sk-p...wxyz`, `sk-pro*****xyz`);
- anything shaped like a well-known key (`sk-...`, `Bearer ...`, `mb_...`), registered or not.

Redact first, then truncate: a cut made before redaction can leave a piece too short to
recognise. Secrets shorter than MIN_SECRET_LEN (6) characters are not registered (they
would match ordinary words). A URL (a value with `://`) is matched whole only, never by
prefix or mask, or every `http://...` would go: its credentials are registered on their own.

It runs on every log line, so it is one compiled regex (the well-known shapes plus a
lookahead over the first 3 characters of every registered secret) and, only where one of
those matches, a few string comparisons against the secrets starting that way. Short texts
are remembered with their result (a request line's model, provider, rpc and status repeat
line after line; a dict lookup is a fraction of a regex search), in a table that is
replaced whenever a secret is registered, so no answer from before a secret counts after.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

MIN_SECRET_LEN = 6
# Any prefix of a registered secret this long or longer is redacted.
PREFIX_MIN = 8
# A masked echo shows at least this many leading characters...
_MASK_HEAD = 3
# ...and at least this many trailing ones (checked up to _MASK_TAIL_MAX).
_MASK_TAIL = 3
_MASK_TAIL_MAX = 16
_MASK_CHARS = frozenset("*.…•·xX")
# A whitespace-separated part of a registered value this long is a secret of its own
# ("Basic dXNlcjpwYXNz": the token may appear without its scheme).
_PART_MIN = 8

REDACTED = "[REDACTED]"

# Key shapes upstreams echo back ("Incorrect API key provided: sk-abc...").
_KEY_SHAPES_SRC = (
    r"sk-(?:ant-|proj-)?[A-Za-z0-9_\-*]{6,}"
    r"|(?i:bearer)\s+[A-Za-z0-9._\-~+/=*]{6,}"
    r"|mb_[A-Za-z0-9_\-]{16,}"
)
_KEY_SHAPES = re.compile(_KEY_SHAPES_SRC)
_SHAPE_FIRST = "sbBm"  # the characters a key shape can start with

_secrets: set[str] = set()
# The secrets also matched by prefix and masked echo (not URLs).
_partial: set[str] = set()
# Below this many characters a prefix counts only at a token boundary.
_PREFIX_ANYWHERE = 16
# First _MASK_HEAD characters -> the secrets that start so, longest first.
_by_head: dict[str, list[str]] = {}
# None: no secret registered, only the shapes apply.
_pattern: re.Pattern[str] | None = None
# Texts up to _MEMO_MAX_CHARS -> their redaction, at most _MEMO_ENTRIES (then emptied). A
# new dict whenever the secrets change: a redaction under way while a secret is registered
# stores its (older) answer in the dict being dropped, never in the current one.
_MEMO_MAX_CHARS = 128
_MEMO_ENTRIES = 4096
_memo: dict[str, str] = {}


def _rebuild() -> None:
    global _pattern
    by_head: dict[str, list[str]] = {}
    for s in sorted(_secrets, key=len, reverse=True):
        by_head.setdefault(s[:_MASK_HEAD], []).append(s)
    heads = "|".join(re.escape(h) for h in sorted(by_head))
    # A first-character class up front lets the regex engine skip most positions fast; the
    # lookahead names where a secret may start, and `_secret_span` measures how much is there.
    first = "".join(re.escape(c) for c in sorted({h[0] for h in by_head} | set(_SHAPE_FIRST)))
    _pattern = re.compile(f"(?=[{first}])(?:(?=(?P<head>{heads}))|(?P<shape>{_KEY_SHAPES_SRC}))")
    _by_head.clear()
    _by_head.update(by_head)
    _forget()


def _forget() -> None:
    """Drop every remembered redaction (the secrets changed); last, after the pattern."""
    global _memo
    _memo = {}


def register_secret(secret: str | None) -> None:
    """Remember a secret so `redact` removes it (and its prefixes and masked echoes) wherever it shows up."""
    if not secret:
        return
    new = {secret.strip()}
    parts = secret.split()
    if len(parts) > 1:
        new.update(p for p in parts if len(p) >= _PART_MIN)
    new = {s for s in new if len(s) >= MIN_SECRET_LEN} - _secrets
    if new:
        _secrets.update(new)
        _partial.update(s for s in new if "://" not in s)
        _rebuild()


def register_url_credentials(url: str | None) -> None:
    """The credentials in a URL's userinfo (`http://user:pass@proxy:3128`): the password as
    written and decoded, `user:pass`, and its Basic-auth form (what a proxy is sent)."""
    if not url:
        return
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return
    if not password and not user:
        return
    if password:
        register_secret(password)
        register_secret(unquote(password))
    pair = f"{unquote(user or '')}:{unquote(password or '')}"
    register_secret(pair)
    register_secret(base64.b64encode(pair.encode()).decode())
    netloc = parts.netloc.rpartition("@")[0]
    register_secret(netloc)


def registered() -> frozenset[str]:
    """The registered secrets (for tests and `config show`)."""
    return frozenset(_secrets)


def _common_prefix(text: str, start: int, secret: str) -> int:
    n = min(len(secret), len(text) - start)
    i = 0
    while i < n and text[start + i] == secret[i]:
        i += 1
    return i


def _masked_tail(text: str, at: int, secret: str, shown: int) -> int:
    """Characters from `at` that are a mask run followed by the secret's last 4+ characters, else 0."""
    i = at
    n = len(text)
    while i < n and text[i] in _MASK_CHARS:
        i += 1
    if i == at:
        return 0
    hidden = len(secret) - shown
    for k in range(min(_MASK_TAIL_MAX, hidden), _MASK_TAIL - 1, -1):
        if text.startswith(secret[-k:], i):
            return i + k - at
    return 0


def _secret_span(text: str, start: int, head: str) -> int:
    """How many characters from `start` are a registered secret, a prefix or a masked echo of one."""
    best = 0
    for secret in _by_head.get(head, ()):
        shown = _common_prefix(text, start, secret)
        if shown == len(secret):
            span = shown
        elif secret not in _partial or len(secret) < PREFIX_MIN:
            span = 0
        else:
            span = 0
            if shown >= _PREFIX_ANYWHERE or (shown >= PREFIX_MIN and not _continues(text, start + shown)):
                span = shown
            tail = _masked_tail(text, start + shown, secret, shown)
            if tail:
                span = shown + tail
        best = max(best, span)
    return best


def _continues(text: str, at: int) -> bool:
    """The text goes on with a letter or digit at `at` (so a prefix there is not a cut secret)."""
    return at < len(text) and text[at].isalnum()


def redact(text: str) -> str:
    """`text` with every registered secret, its prefixes and masked echoes, and key shapes replaced."""
    if not text:
        return text
    if len(text) > _MEMO_MAX_CHARS or type(text) is not str:  # a str subclass comes back as itself
        return _redact(text)
    memo = _memo  # taken before the pattern is read: see _memo
    done = memo.get(text)
    if done is None:
        done = _redact(text)
        if len(memo) >= _MEMO_ENTRIES:
            memo.clear()
        memo[text] = done
    return done


# The exact types `redact_fields` passes through as they are.
_PLAIN = frozenset({bool, int, float, type(None)})


def redact_fields(fields: Mapping[str, Any], max_chars: int) -> dict[str, Any] | None:
    """`{k: redact(v)}` for fields whose values are all strs (of at most `max_chars`) or plain
    scalars (None, bool, int, float: kept as they are), in one loop that looks remembered
    redactions up itself (a log line's dozen strings, without a call each); None when any
    value is something else, for the caller's general path."""
    memo = _memo  # taken before the pattern is read: see _memo
    out: dict[str, Any] = {}
    for k, v in fields.items():
        t = type(v)
        if t is str:
            if len(v) > max_chars:
                return None
            done = memo.get(v)
            out[k] = redact(v) if done is None else done
        elif t in _PLAIN:
            out[k] = v
        else:
            return None
    return out


def _redact(text: str) -> str:
    pattern = _pattern
    if pattern is None:
        return _KEY_SHAPES.sub(REDACTED, text)
    m = pattern.search(text)
    if m is None:
        return text
    out: list[str] = []
    last = 0
    while m is not None:
        start = m.start()
        head = m.group("head")
        if head is None:
            end = m.end()
        else:
            end = start + _secret_span(text, start, head)
            shape = _KEY_SHAPES.match(text, start)
            if shape is not None:
                end = max(end, shape.end())
            if end == start:
                m = pattern.search(text, start + 1)
                continue
        out.append(text[last:start])
        out.append(REDACTED)
        last = end
        m = pattern.search(text, end)
    out.append(text[last:])
    return "".join(out)


def _reset_for_tests() -> None:
    global _pattern
    _secrets.clear()
    _partial.clear()
    _by_head.clear()
    _pattern = None
    _forget()
