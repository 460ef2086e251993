"""Provider classes by type: the `@register` decorator, `provider_types()` and `create_provider()`.

Which types exist, and which module implements each, is declared once in `kinds.py`;
`provider_types()` imports every declared module, so the set is complete whichever module the
caller touched first. `@register` refuses a class whose `type` is not declared for its module
(tests/test_registry.py holds both directions).

Kept free of imports from the daemon at module level: config reads `kinds` (and so runs this
file) before any provider module may import config.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, TypeVar

from broker.providers import kinds

if TYPE_CHECKING:
    from broker.config import ProviderConfig
    from broker.providers.base import Provider

_TYPES: dict[str, type[Provider]] = {}
P = TypeVar("P", bound="type[Provider]")
# Shared machinery that is not a protocol: a module in providers/ is one of these, a declared
# kind's module, or a protocol's `<name>_wire` mapping (a test holds this).
SUPPORT_MODULES = (
    "aws_auth",
    "base",
    "checks",
    "eventstream",
    "google_auth",
    "kinds",
    "options",
    "sse",
    "transport",
)


def is_part_of_a_protocol(module: str, protocol_modules: set[str]) -> bool:
    """`<type>_wire`, `<type>_request`, ...: a protocol's own helpers, beside its module
    (the type's name may hold an underscore itself: azure_openai_wire)."""
    return any(module.startswith(f"{p}_") for p in protocol_modules)


def register(cls: P) -> P:
    declared = kinds.find(cls.type)
    if declared is None or declared.module != cls.__module__:
        where = f"declared for {declared.module}" if declared else "not declared in broker/providers/kinds.py"
        raise TypeError(f"{cls.__module__}.{cls.__name__}: provider type {cls.type!r} is {where}")
    _TYPES[cls.type] = cls
    return cls


def provider_types() -> dict[str, type[Provider]]:
    for kind in kinds.KINDS.values():
        importlib.import_module(kind.module)
    return dict(_TYPES)


def create_provider(config: ProviderConfig) -> Provider:
    types = provider_types()
    try:
        cls = types[config.type]
    except KeyError:
        raise ValueError(f"no provider implements type {config.type!r}") from None
    return cls(config)
