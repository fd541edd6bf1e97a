"""Which fal endpoint trains which model, what it costs, and the money guards (pure).

Prices are fal's published per-step prices when this table was written (fal.ai/models/<endpoint>,
"Pricing"); they change. `[engines.fal] price_per_step_usd` overrides the table, and the README
tells the user to compare the first real invoice with lorad's estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.fal.endpoints import ENDPOINTS, SCHEMAS

__all__ = ["ENDPOINTS", "PRICES", "Price", "estimate_usd"]


@dataclass(frozen=True)
class Price:
    usd_per_step: float
    min_steps: int = 0  # fal charges at least this many steps
    default_steps: int = 1000  # what the endpoint trains when not told


PRICES: dict[str, Price] = {
    endpoint: Price(schema.usd_per_step, schema.min_steps, schema.fields[schema.role("steps") or ""].default)
    for endpoint, schema in SCHEMAS.items()
    if schema.usd_per_step is not None and schema.role("steps")
}
# An endpoint not in PRICES (set in [engines.fal] endpoints) is estimated at this, so the guard
# never reads "$0" for something unknown; the plan warns.
UNKNOWN_PRICE = Price(usd_per_step=0.004)


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
    """What one training of `steps` steps costs at `endpoint` (dollars, with the endpoint's
    minimum billed steps), and the price used."""
    price = (prices or PRICES).get(endpoint, UNKNOWN_PRICE)
    if price_override > 0:
        price = Price(
            usd_per_step=price_override, min_steps=price.min_steps, default_steps=price.default_steps
        )
    return round(max(steps, price.min_steps) * price.usd_per_step, 4), price


def cost_problem(estimate: float, max_cost: float, steps: int, price: Price, endpoint: str) -> str | None:
    """Why the job may not be sent (its estimate is above the guard), with the numbers; None: fine."""
    if estimate <= max_cost:
        return None
    return (
        f"the cloud training would cost about ${estimate:.2f} ({steps} steps x ${price.usd_per_step:g}/step at {endpoint}), "
        f"above max_cost_usd = ${max_cost:.2f}; raise max_cost_usd in lora.toml (or [engines.fal] in lorad.toml) "
        f"or train fewer steps"
    )


def daily_problem(submitted_last_day: int, limit: int) -> str | None:
    """Why one more cloud job may not start today (cloud_daily_jobs); None: fine."""
    if limit <= 0 or submitted_last_day < limit:
        return None
    return (
        f"cloud_daily_jobs = {limit} cloud trainings were already sent in the last 24 hours; "
        f"the job was not sent. Raise cloud_daily_jobs in lorad.toml or retry tomorrow (lorad retry <job>)"
    )
