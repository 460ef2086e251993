"""OpenAI's error documents as api.openai.com writes them, for the fake (tests/fakes/openai_upstream.py).

`error_body(status)` is the `{"error":{message,type,param,code}}` document with the type,
code and wording OpenAI uses for that status (or for a named error type such as
insufficient_quota); the CDN's HTML pages for 502/504; the texts of a missing or wrong key.
"""

from __future__ import annotations

from typing import Any

# status -> (message, type, param, code), as OpenAI answers them.
_ERRORS: dict[int, tuple[str, str, str | None, str | None]] = {
    400: (
        "Invalid value for 'temperature': must be between 0 and 2.",
        "invalid_request_error",
        "temperature",
        "invalid_value",
    ),
    403: (
        "Country, region, or territory not supported",
        "request_forbidden",
        None,
        "unsupported_country_region_territory",
    ),
    404: (
        "The model `gpt-5-nope` does not exist or you do not have access to it.",
        "invalid_request_error",
        None,
        "model_not_found",
    ),
    409: ("The request conflicted with another request.", "invalid_request_error", None, None),
    429: (
        "Rate limit reached for gpt-4o-mini in organization org-fake on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1. Please try again in 20s. Visit "
        "https://platform.openai.com/account/rate-limits to learn more.",
        "requests",
        None,
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
        None,
    ),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None, None),
}
# What api.openai.com (and Azure OpenAI) answer `max_tokens` with on a reasoning model
# (recording oa-gpt5-gateway-max-tokens, SOURCES.md).
MAX_TOKENS_UNSUPPORTED = (
    "Unsupported parameter: 'max_tokens' is not supported with this model. "
    "Use 'max_completion_tokens' instead."
)
# Fault.error_type values OpenAI pairs with their own wording.
_TYPED_ERRORS: dict[str, tuple[str, str, str | None, str]] = {
    "insufficient_quota": (
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: "
        "https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        None,
        "insufficient_quota",
    ),
    "context_length_exceeded": (
        "This model's maximum context length is 128000 tokens. However, your messages "
        "resulted in 131072 tokens. Please reduce the length of the messages.",
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
    ),
    "unsupported_parameter": (
        MAX_TOKENS_UNSUPPORTED,
        "invalid_request_error",
        "max_tokens",
        "unsupported_parameter",
    ),
}
# 502/504 come from the CDN in front of the API, as HTML.
GATEWAY_HTML = (
    "<html>\r\n<head><title>{s} {r}</title></head>\r\n<body>\r\n<center><h1>{s} {r}</h1></center>"
    "\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)
MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) "
    "if you're accessing the API from your browser and are prompted for a username and password. You "
    "can obtain an API key from https://platform.openai.com/account/api-keys."
)


def error_body(status: int, message: str | None = None, error_type: str | None = None) -> dict[str, Any]:
    """OpenAI's error document for a status (all four keys are always present)."""
    msg: str
    etype: str
    param: str | None
    code: str | None
    if error_type is not None and error_type in _TYPED_ERRORS:
        msg, etype, param, code = _TYPED_ERRORS[error_type]
    elif status in _ERRORS:
        msg, etype, param, code = _ERRORS[status]
        if error_type:
            etype = code = error_type
    else:
        etype = error_type or ("server_error" if status >= 500 else "invalid_request_error")
        msg, param, code = f"Request failed with status {status}.", None, error_type
    return {"error": {"message": message or msg, "type": etype, "param": param, "code": code}}


def mask_key(key: str) -> str:
    """How OpenAI echoes a wrong key: "sk-wrong-key" -> "sk-wro*****key"."""
    return f"{key[:6]}*****{key[-3:]}" if len(key) > 9 else "*****"
