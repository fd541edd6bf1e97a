"""Which fal endpoint trains which model and what it costs (pure); the guards are engines/cloud/money.py.

Prices are fal's published per-step prices when this table was written (fal.ai/models/<endpoint>,
"Pricing"); they change. `[engines.fal] price_per_step_usd` overrides the table, and the README
tells the user to compare the first real invoice with lorad's estimate.
"""

from __future__ import annotations

from engines.cloud import money
from engines.cloud.money import UNKNOWN_PRICE, Price, cost_problem, daily_problem
from engines.fal.endpoints import ENDPOINTS, SCHEMAS

# Price, the guards and the estimate are every cloud's (engines/cloud/money.py); kept here too.
__all__ = ["ENDPOINTS", "PRICES", "UNKNOWN_PRICE", "Price", "cost_problem", "daily_problem", "estimate_usd"]


PRICES: dict[str, Price] = {
    endpoint: Price(schema.usd_per_step, schema.min_steps, schema.fields[schema.role("steps") or ""].default)
    for endpoint, schema in SCHEMAS.items()
    if schema.usd_per_step is not None and schema.role("steps")
}


def endpoint_for(model: str, overrides: dict[str, str]) -> str | None:
    """The endpoint that trains `model`: `[engines.fal] endpoints` first, then the table."""
    return overrides.get(model) or ENDPOINTS.get(model)


def parse_endpoints(text: str) -> dict[str, str]:
    """`[engines.fal] endpoints = "model=owner/app, model2=owner/app2"` -> dict; ValueError says what is wrong."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        model, sep, endpoint = (s.strip() for s in part.partition("="))
        if not sep or not model or endpoint.count("/") < 1:
            raise ValueError(f"{part!r}: write model=owner/app, e.g. z-image-turbo=fal-ai/z-image-trainer")
        out[model] = endpoint
    return out


def estimate_usd(
    endpoint: str, steps: int, price_override: float = 0.0, prices: dict[str, Price] | None = None
) -> tuple[float, Price]:
    """What one training of `steps` steps costs at `endpoint`, by fal's table unless told."""
    return money.estimate_usd(endpoint, steps, price_override, prices or PRICES)
