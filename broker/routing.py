"""Requirement-based selection: every model the registry knows -> qualified and ranked, or excluded with a reason.

A candidate qualifies when its provider is allowed, it is known to have every needed
capability (unknown is not "has": selection must not guess), its context window is known
and large enough, its prices are known and under the ceilings, and its provider is
serving (breaker not open, active check not failing). Ranking by preference:
  priority  provider priority, then the provider's configured `models` order, then name;
  cheapest  input + output price per Mtok, then priority;
  fastest   observed time to first token (EWMA), unobserved last, then priority.
The same checks filter named candidates when a request gives both a model and
requirements. A caller's permissions are not judged here: `select(permitted=)` takes the
predicate the completion service (or SelectModel) was given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from broker import errors
from broker.breaker import BreakerState
from broker.registry import Registry, Target
from broker.types import Capability, Requirements

_MISSING = {
    Capability.VISION: "no vision",
    Capability.TOOLS: "no tools",
    Capability.JSON_MODE: "no JSON mode",
}
# How many exclusions an error message lists before "and N more".
_MESSAGE_EXCLUSIONS = 6


@dataclass(frozen=True, slots=True)
class Excluded:
    model_id: str
    reason: str
    # Only the provider's state excluded it (breaker, health): it may qualify again soon.
    transient: bool = False


@dataclass(slots=True)
class Selection:
    ranked: list[Target]
    excluded: list[Excluded]

    def error(self) -> errors.BrokerError:
        """Why nothing qualified: UNAVAILABLE if a match exists but its provider is down, else FAILED_PRECONDITION."""
        if not self.excluded:
            return errors.NoModelMatches("no model meets the requirements: no models are known")
        shown = "; ".join(f"{e.model_id}: {e.reason}" for e in self.excluded[:_MESSAGE_EXCLUSIONS])
        more = len(self.excluded) - _MESSAGE_EXCLUSIONS
        if more > 0:
            shown += f"; and {more} more (SelectModel lists them all)"
        if any(e.transient for e in self.excluded):
            # Some model meets the requirements; only its provider's state is in the way.
            return errors.NoHealthyProvider(
                f"no serving provider has a model that meets the requirements: {shown}"
            )
        return errors.NoModelMatches(f"no model meets the requirements: {shown}")


class LatencyTracker:
    """Observed time to first token per `provider/model`, as an exponentially weighted mean."""

    ALPHA = 0.3  # weight of the newest observation: recent enough to follow a slowdown, not jumpy

    def __init__(self) -> None:
        self._ttft: dict[str, float] = {}

    def observe(self, model_id: str, seconds: float) -> None:
        old = self._ttft.get(model_id)
        self._ttft[model_id] = seconds if old is None else old + self.ALPHA * (seconds - old)

    def get(self, model_id: str) -> float | None:
        return self._ttft.get(model_id)


def usd(micro: int) -> str:
    return f"{micro / 1_000_000:.2f}"


class Router:
    def __init__(self, registry: Registry, latency: LatencyTracker | None = None) -> None:
        self.registry = registry
        self.latency = latency or LatencyTracker()

    def validate(self, req: Requirements, path: str = "requirements") -> None:
        """Provider names in allow/exclude must exist: a typo would silently match nothing."""
        v: list[tuple[str, str]] = []
        for key, names in (
            ("allow_providers", req.allow_providers),
            ("exclude_providers", req.exclude_providers),
        ):
            for i, name in enumerate(names):
                if name not in self.registry.by_name:
                    known = ", ".join(self.registry.by_name) or "none configured"
                    v.append((f"{path}.{key}[{i}]", f"no provider named {name!r} (known: {known})"))
        if v:
            raise errors.InvalidRequest(v)

    def universe(self) -> list[Target]:
        """Every (provider, model) the registry knows, providers in priority order."""
        out: list[Target] = []
        for s in self.registry.providers:
            out.extend(Target(s, spec.name, spec) for spec in self.registry.list_models(s.name))
        return out

    def select(
        self,
        req: Requirements,
        *,
        needed: Iterable[Capability] = (),
        min_context: int = 0,
        permitted: Callable[[str, str], bool] | None = None,
    ) -> Selection:
        """Rank every known model against the requirements (plus what the request itself needs).

        `permitted(provider, model)`: the caller's allow-list; others are left out silently
        (not even listed as excluded: a caller learns nothing about models it may not use).
        """
        universe = self.universe()
        if permitted is not None:
            universe = [t for t in universe if permitted(t.state.name, t.model)]
        return self._sort(universe, req, needed, min_context)

    def filter(self, targets: Sequence[Target], req: Requirements) -> Selection:
        """Named candidates that meet the requirements, in their given order (the caller chose it).

        What the request itself needs is not judged here: each candidate's capabilities and
        context window are checked when its turn comes (completion.check_capabilities, check_fits)."""
        ranked: list[Target] = []
        excluded: list[Excluded] = []
        for t in targets:
            reasons = self.reasons(t, req, set(), 0, kind=req.kind)
            if reasons:
                excluded.append(Excluded(t.spec.id, "; ".join(reasons)))
            else:
                ranked.append(t)
        return Selection(ranked, excluded)

    def reasons(
        self,
        t: Target,
        req: Requirements,
        needed: set[Capability],
        min_context: int,
        *,
        kind: str | None = None,
    ) -> list[str]:
        """Why `t` does not meet the requirements (empty: it does). Provider state is not judged here.

        `kind`: the kind of model wanted ("chat" or "embedding"; unknown counts as chat);
        selection always judges it (req.kind or chat), a named model only when the caller
        asked (otherwise its own kind check gives the clearer CAPABILITY_MISSING)."""
        spec, out = t.spec, []
        if kind is None:
            kind = req.kind or "chat"
        if kind and (spec.kind or "chat") != kind:
            return [f"{spec.kind or 'chat'} model, not {kind}"]  # nothing else about it matters
        if req.min_dimensions:
            if spec.dimensions is None:
                out.append("dimensions unknown")
            elif spec.dimensions < req.min_dimensions:
                out.append(f"dimensions {spec.dimensions} < {req.min_dimensions}")
        if req.allow_providers and t.state.name not in req.allow_providers:
            out.append("provider not allowed")
        if t.state.name in req.exclude_providers:
            out.append("provider excluded")
        caps = set(req.capabilities) | needed
        if caps:
            if not spec.capabilities_known:
                out.append("capabilities unknown")
            else:
                out.extend(_MISSING[c] for c in sorted(caps - spec.capabilities))
        want_context = max(req.min_context_window, min_context)
        if want_context:
            if spec.context_window is None:
                out.append("context window unknown")
            elif spec.context_window < want_context:
                out.append(f"context {spec.context_window} < {want_context}")
        for label, ceiling, price in (
            (
                "input",
                req.max_input_price_micro_usd_per_mtok,
                spec.pricing.input_micro_usd_per_mtok if spec.pricing else None,
            ),
            (
                "output",
                req.max_output_price_micro_usd_per_mtok,
                spec.pricing.output_micro_usd_per_mtok if spec.pricing else None,
            ),
        ):
            if ceiling is None:
                continue
            if price is None:
                out.append(f"{label} price unknown")
            elif price > ceiling:
                out.append(f"{label} price {usd(price)} > {usd(ceiling)}")
        return out

    @staticmethod
    def state_reason(t: Target) -> str:
        """Why the provider cannot take requests right now (empty: it can)."""
        breaker = t.state.breaker
        if breaker.state is BreakerState.OPEN:
            return f"breaker open (retry in {breaker.retry_in():.0f}s)"
        if t.state.healthy is False:
            return "provider not serving (health check failing)"
        return ""

    def _sort(
        self,
        targets: Sequence[Target],
        req: Requirements,
        needed: Iterable[Capability],
        min_context: int,
    ) -> Selection:
        need = set(needed)
        ok: list[Target] = []
        excluded: list[Excluded] = []
        for t in targets:
            reasons = self.reasons(t, req, need, min_context)
            state = self.state_reason(t)
            if state:
                reasons.append(state)
            if reasons:
                excluded.append(Excluded(t.spec.id, "; ".join(reasons), transient=reasons == [state]))
            else:
                ok.append(t)
        return Selection(self.rank(ok, req.preference), excluded)

    def rank(self, targets: Sequence[Target], preference: str) -> list[Target]:
        order = {s.name: i for i, s in enumerate(self.registry.providers)}

        def priority(t: Target) -> tuple[int, int, str]:
            listed = t.state.config.models
            pos = listed.index(t.model) if t.model in listed else len(listed)
            return (order.get(t.state.name, len(order)), pos, t.model)

        if preference == "cheapest":

            def cheapest(t: Target) -> tuple[bool, int, tuple[int, int, str]]:
                p = t.spec.pricing
                total = p.input_micro_usd_per_mtok + p.output_micro_usd_per_mtok if p else 0
                return (p is None, total, priority(t))

            return sorted(targets, key=cheapest)
        if preference == "fastest":

            def fastest(t: Target) -> tuple[bool, float, tuple[int, int, str]]:
                seen = self.latency.get(t.spec.id)
                return (seen is None, seen or 0.0, priority(t))

            return sorted(targets, key=fastest)
        return sorted(targets, key=priority)
