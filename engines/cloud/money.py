"""What a cloud training costs and the money guards every cloud engine applies (pure).

A cloud's own table says what one step costs at each of its endpoints (fal: published per-step
prices; Replicate: seconds per step x hardware price); these functions turn it into an
estimate and refuse what the guards (`max_cost_usd`, `cloud_daily_jobs`) do not allow.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    usd_per_step: float
    min_steps: int = 0  # the cloud charges at least this many steps
    default_steps: int = 1000  # what the endpoint trains when not told


# An endpoint missing from a cloud's table is estimated at this, so the guard never reads "$0"
# for something unknown; the plan warns.
UNKNOWN_PRICE = Price(usd_per_step=0.004)


def estimate_usd(
    endpoint: str, steps: int, price_override: float, prices: dict[str, Price]
) -> tuple[float, Price]:
    """What one training of `steps` steps costs at `endpoint` (dollars, with the endpoint's
    minimum billed steps), and the price used."""
    price = prices.get(endpoint, UNKNOWN_PRICE)
    if price_override > 0:
        price = Price(
            usd_per_step=price_override, min_steps=price.min_steps, default_steps=price.default_steps
        )
    return round(max(steps, price.min_steps) * price.usd_per_step, 4), price


def cost_problem(
    estimate: float, max_cost: float, steps: int, price: Price, endpoint: str, cloud: str = "fal"
) -> str | None:
    """Why the job may not be sent (its estimate is above the guard), with the numbers; None: fine.
    `cloud`: the engine whose lorad.toml section holds the default guard."""
    if estimate <= max_cost:
        return None
    return (
        f"the cloud training would cost about ${estimate:.2f} ({steps} steps x ${price.usd_per_step:g}/step at {endpoint}), "
        f"above max_cost_usd = ${max_cost:.2f}; raise max_cost_usd in lora.toml (or [engines.{cloud}] in lorad.toml) "
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
