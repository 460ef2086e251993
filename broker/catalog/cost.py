"""Money: exact conversions and the cost of one request, in integer micro-USD.

Nothing here touches a float after parsing: prices are integer micro-USD per million tokens,
token counts are integers, and the one division rounds half-up at the end.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from broker.types import Cost, Pricing, Usage

MICRO_USD_PER_USD = 1_000_000
TOKENS_PER_MTOK = 1_000_000


def micro_usd_from_usd(usd: float | Decimal | str) -> int:
    """USD (per million tokens, say) -> integer micro-USD, exactly.

    A float goes through its shortest repr (`str(0.15)` is "0.15"), so 0.15 becomes 150000
    and not 149999 from 0.15 * 1e6 = 149999.99999999997. Sub-micro amounts round half-up.
    """
    value = Decimal(str(usd)) if isinstance(usd, float) else Decimal(usd)
    if not value.is_finite() or value < 0:
        raise ValueError(f"a price must be a finite amount >= 0, got {usd!r}")
    return int((value * MICRO_USD_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _div_half_up(numerator: int, denominator: int) -> int:
    # Non-negative operands only (clamped by the caller), so floor division is exact here.
    return (2 * numerator + denominator) // (2 * denominator)


def compute_cost(pricing: Pricing | None, usage: Usage, *, local: bool = False) -> Cost:
    """The cost of one request from its usage.

    Usage convention (the providers': see anthropic_wire.usage_from): input_tokens counts every
    input token, including cache reads (cached_input_tokens) and cache writes. So:
        input  = (input - cached) * input_price + cached * cached_price   [cached_price defaults
                                                                            to input_price]
        output = output * output_price
    each / 1_000_000 tokens-per-Mtok, rounded half-up once. Cache writes (also counted in
    input) are billed at the cache-write price where one is known (Anthropic: 1.25x input),
    else at the input price; those written with a one-hour TTL (cache_write_1h_input_tokens,
    a part of the writes) at the 1h price (Anthropic: 2x input, the default when the
    catalogue has none). Reasoning tokens are part of output_tokens: billed once, as output.

    No pricing: unknown (known=False, never a silent 0) unless `local`, where no price means
    free. A local model with a price (config can set one, e.g. for internal chargeback) is
    billed at that price; the catalogue's local entries are priced 0.
    """
    if pricing is None:
        return Cost(known=local)
    total_in = max(usage.input_tokens, 0)
    # Clamp: a provider that reports more cached tokens than input must not make cost negative.
    cached = min(max(usage.cached_input_tokens, 0), total_in)
    cached_price = pricing.cached_input_micro_usd_per_mtok
    if cached_price is None:
        cached_price = pricing.input_micro_usd_per_mtok
    written = min(max(usage.cache_write_input_tokens, 0), total_in - cached)
    write_price = pricing.cache_write_input_micro_usd_per_mtok
    if write_price is None:
        write_price = pricing.input_micro_usd_per_mtok
    written_1h = min(max(usage.cache_write_1h_input_tokens, 0), written)
    write_1h_price = pricing.cache_write_1h_input_micro_usd_per_mtok
    if write_1h_price is None:
        write_1h_price = 2 * pricing.input_micro_usd_per_mtok
    input_scaled = (
        (total_in - cached - written) * pricing.input_micro_usd_per_mtok
        + cached * cached_price
        + (written - written_1h) * write_price
        + written_1h * write_1h_price
    )
    output_scaled = max(usage.output_tokens, 0) * pricing.output_micro_usd_per_mtok
    return Cost(
        known=True,
        input_micro_usd=_div_half_up(input_scaled, TOKENS_PER_MTOK),
        output_micro_usd=_div_half_up(output_scaled, TOKENS_PER_MTOK),
    )
