"""GetUsage (who may see which key's usage) and the price of a request that ended without usage.

A key sees its own usage; a key with `admin: true` sees every key's. Names are those of
auth.keys, so what a caller can ask about is bounded by the config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker import errors
from broker.catalog.cost import compute_cost
from broker.config import AuthConfig
from broker.limits import KeyPolicy
from broker.registry import Registry
from broker.state import KeyUsage, StateStore
from broker.types import Cost, Usage

Pricer = Callable[[str, str, Usage], Cost]


@dataclass(slots=True)
class UsageReport:
    keys: list[KeyUsage]
    shared: bool  # counted in Redis: every replica, kept across restarts


class UsageService:
    def __init__(self, auth: AuthConfig, state: StateStore) -> None:
        self.enabled = auth.enabled
        self.state = state
        self.policies = {k.name: KeyPolicy.from_config(k) for k in auth.keys}
        self.admins = frozenset(k.name for k in auth.keys if k.admin)

    async def report(self, caller: str | None, names: Sequence[str]) -> UsageReport:
        """The usage of `names` (none: the caller's own, or every key for an admin)."""
        if not self.enabled or caller is None:
            raise errors.AuthDisabled(
                "GetUsage reports usage per API key, and this broker has caller auth off "
                "(no auth.keys); add keys (`model-broker keys create`) to count usage per caller"
            )
        admin = caller in self.admins
        if not names:
            wanted = list(self.policies) if admin else [caller]
        else:
            others = sorted({n for n in names if n != caller})
            if others and not admin:
                # Whether such a key exists is not said: that is config a caller need not learn.
                raise errors.UsageNotPermitted(
                    f"key {caller!r} may see only its own usage; ask with no key_names, or use a key "
                    "with admin: true",
                    metadata={"caller": caller},
                )
            unknown = [
                (f"key_names[{i}]", f"no key named {n!r} in auth.keys")
                for i, n in enumerate(names)
                if n not in self.policies
            ]
            if unknown:
                raise errors.InvalidRequest(unknown)
            wanted = [n for n in self.policies if n in set(names)]  # config order, each once
        usage = await self.state.usage([self.policies[n] for n in wanted])
        return UsageReport(usage, self.state.shared)


def pricer(registry: Registry) -> Pricer:
    """The cost of `usage` at provider/model's price (unknown if the provider or price is)."""

    def cost(provider: str, model: str, usage: Usage) -> Cost:
        s = next((p for p in registry.providers if p.name == provider), None)
        if s is None:
            return Cost(known=False)
        return compute_cost(registry.spec(s, model).pricing, usage, local=s.local)

    return cost


def priced(registry: Registry) -> Callable[[str, str], bool]:
    """Whether a request to provider/model has a known cost (a price, or a local model)."""

    def known(provider: str, model: str) -> bool:
        s = next((p for p in registry.providers if p.name == provider), None)
        return s is not None and (s.local or registry.spec(s, model).pricing is not None)

    return known
