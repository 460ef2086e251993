"""A small aiohttp client for tests that talk HTTP to a fake upstream or /metrics.

The daemon's own HTTP is broker/providers/transport.py; this is only the tests' view,
shaped like the few calls they make (status, headers, text, json).
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy


@dataclass
class Reply:
    status_code: int
    headers: CIMultiDictProxy[str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class HTTP:
    """`async with HTTP(base_url) as c: await c.post("path", json=..., headers=...)`."""

    def __init__(self, base_url: str = "", *, timeout: float = 5.0) -> None:
        self.base_url = base_url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HTTP:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def request(self, method: str, path: str, **kw: Any) -> Reply:
        assert self._session is not None
        kw.pop("timeout", None)
        url = path if path.startswith("http") else self.base_url.rstrip("/") + "/" + path.lstrip("/")
        async with self._session.request(method, url, **kw) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, **kw: Any) -> Reply:
        return await self.request("POST", path, **kw)
