"""Provider types by wire protocol. Each module registers its class with `@register`.

`provider_types()` imports every protocol module once, so the registry is complete
whichever module the caller touched first (a test checks none is missing).
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from broker.config import ProviderConfig
from broker.providers.base import Provider

_TYPES: dict[str, type[Provider]] = {}
P = TypeVar("P", bound=type[Provider])
# The protocol modules; each must register exactly the type named like the module.
PROTOCOL_MODULES = ("openai", "anthropic", "ollama")
# Shared machinery that is not a protocol: a module in providers/ is one of these, a
# protocol module, or a protocol's `<name>_wire` mapping (a test holds this).
SUPPORT_MODULES = ("base", "checks", "sse", "transport")


def register(cls: P) -> P:
    _TYPES[cls.type] = cls
    return cls


def provider_types() -> dict[str, type[Provider]]:
    for name in PROTOCOL_MODULES:
        importlib.import_module(f"broker.providers.{name}")
    return dict(_TYPES)


def create_provider(config: ProviderConfig) -> Provider:
    types = provider_types()
    try:
        cls = types[config.type]
    except KeyError:
        raise ValueError(f"no provider implements type {config.type!r}") from None
    return cls(config)
