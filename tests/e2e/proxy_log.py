"""A proxy.py plugin for tests/e2e/test_proxy.py: one log line per request the proxy carries.

proxy.py's own access log is written when a client connection closes and names only the
first request on it, so a pooled daemon connection (discovery, then a completion on the same
socket) shows up late and as its first request. `handle_client_request` runs for every
request, pipelined ones included, and for each CONNECT; this logs them as

    mb-proxied POST 127.0.0.1:41234/v1/chat/completions
    mb-proxied CONNECT 127.0.0.1:41234

Loaded by the proxy subprocess with `--plugins tests.e2e.proxy_log.RequestLog` (the
repository root on PYTHONPATH). Requests refused by proxy.py's auth plugin never get here.
"""

from __future__ import annotations

import logging

from proxy.http.parser import HttpParser
from proxy.http.proxy import HttpProxyBasePlugin

logger = logging.getLogger(__name__)
MARK = "mb-proxied"


class RequestLog(HttpProxyBasePlugin):
    def handle_client_request(self, request: HttpParser) -> HttpParser | None:
        method = (request.method or b"?").decode("latin-1")
        host = (request.host or b"?").decode("latin-1")
        where = f"{host}:{request.port}"
        if method != "CONNECT":
            where += (request.path or b"/").decode("latin-1")
        logger.info("%s %s %s", MARK, method, where)
        return request
