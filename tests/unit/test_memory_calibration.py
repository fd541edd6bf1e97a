"""The memory plan calibrated to the P12 measurements (issue 23): pure table tests, no mlx.

- the planner's measured peaks are the ones in bench/results/p12_memory.json, and each measured tier's
  budget holds its peak with peak/planned between 0.6 and 1.0;
- what a 16, 24, 32, 64 and 128 GB machine gets for 20 images (`lorad plan --ram-gb N --images 20`) is
  pinned here and is what the README's table says.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from engines.mflux.memory_plan import (
    BF16_CHECKPOINTED,
    BUDGET_MARGIN,
    MEASURED_PEAK_GB,
    PEAK_MODEL,
    TIERS,
    plan_memory,
    tier_budget_gb,
)

ROOT = Path(__file__).resolve().parents[2]
P12 = ROOT / "bench" / "results" / "p12_memory.json"


def _p12() -> dict:
    return json.loads(P12.read_text())


def test_p12_holds_two_full_width_z_image_turbo_tiers_within_the_fit_error():
    rows = [m for m in _p12()["measurements"] if m["model"] == "z-image-turbo" and m["full_width"]]
    assert len({m["tier"] for m in rows}) >= 2
    for m in rows:
        assert m["method"] in ("measured", "extrapolated")
        if m["method"] == "extrapolated":
            assert m["fit_error"] is not None and m["fit_error"] < 0.10, m
        assert set(m) >= {"resolution", "batch", "backend", "blocks_measured", "peak_gb", "planned_gb"}
        assert "seconds_per_step" in m
    assert _p12()["machine"]


def test_measured_peaks_are_the_planners_and_fit_their_budgets():
    for m in _p12()["measurements"]:
        assert MEASURED_PEAK_GB[m["tier"]] == m["peak_gb"]
        assert m["planned_gb"] == tier_budget_gb(m["tier"])
        assert 0.6 <= m["peak_gb"] / m["planned_gb"] <= 1.0, m


def test_unmeasured_tiers_are_derived_from_the_fitted_model():
    assert _p12()["planner_model"] == dataclasses.asdict(PEAK_MODEL)
    for tier in (*TIERS, BF16_CHECKPOINTED):
        expected = "measured" if tier.name in MEASURED_PEAK_GB else "derived"
        assert tier.source == expected
        if expected == "derived":
            peak = PEAK_MODEL.peak_gb(tier.quantize, tier.gradient_checkpointing, tier.max_resolution, 1)
            assert tier.need_gb == pytest.approx(peak * BUDGET_MARGIN, abs=0.06)
        if tier.batch2_need_gb is not None:  # batch 2 is never measured: always derived
            peak = PEAK_MODEL.peak_gb(tier.quantize, tier.gradient_checkpointing, tier.max_resolution, 2)
            assert tier.batch2_need_gb == pytest.approx(peak * BUDGET_MARGIN, abs=0.06)


# RAM (GB) -> tier, quantize, batch, max resolution, budget source: `lorad plan --ram-gb N --images 20`.
MACHINES = [
    (16, "q4-minimal", 4, 1, 512, "measured"),
    (24, "q4-lowram", 4, 1, 768, "derived"),
    (32, "q8-checkpointed", 8, 1, 1024, "measured"),
    (64, "q8-checkpointed", 8, 1, 1024, "measured"),  # q8 without checkpointing: ~150 GB (derived)
    (128, "q8-checkpointed", 8, 1, 1024, "measured"),  # bf16 without checkpointing: ~162 GB (derived)
]


@pytest.mark.parametrize("ram, tier, quantize, batch, resolution, source", MACHINES)
def test_plan_per_machine_size(ram, tier, quantize, batch, resolution, source):
    plan = plan_memory(model="z-image-turbo", total_gb=ram, available_gb=ram, image_count=20, max_side=1024)
    assert (plan.tier, plan.quantize, plan.batch_size, plan.max_resolution) == (
        tier,
        quantize,
        batch,
        resolution,
    )
    assert plan.reason.startswith(tier) and f"({source})" in plan.reason


def test_readme_table_matches_the_plan():
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- p12-table -->")
    rows = re.findall(
        r"^\| (\d+) GB \| `([\w-]+)` \| (\w+) \| (\d+) px \| (\d+) \|", text[start:], re.MULTILINE
    )
    assert [int(r[0]) for r in rows] == [m[0] for m in MACHINES]
    for (ram, tier, quantize, resolution, batch), machine in zip(rows, MACHINES):
        assert (tier, quantize, int(resolution), int(batch)) == (
            machine[1],
            "bf16" if machine[2] is None else f"q{machine[2]}",
            machine[4],
            machine[3],
        )
