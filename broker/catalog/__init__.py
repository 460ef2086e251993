"""The model catalogue (capabilities, context, prices as data) and request cost.

models.json is derived from LiteLLM's price list by scripts/derive_catalog.py (see its
docstring for the schema); catalog.py explains how catalogue, discovered and config facts
merge; cost.py turns usage into integer micro-USD.
"""

from broker.catalog.catalog import Catalog, CatalogEntry, parse_entries
from broker.catalog.cost import compute_cost, micro_usd_from_usd

__all__ = ["Catalog", "CatalogEntry", "compute_cost", "micro_usd_from_usd", "parse_entries"]
