"""P12: peak memory of a full-size Z-Image LoRA training step per memory tier, measured at full width.

Run (background, resumable; each finished point is cached under bench/results/p12_points/):
    nohup nice -n 19 uv run python bench/p12_memory.py > bench/results/p12_work/run.log 2>&1 &
    uv run python bench/p12_memory.py --report     # fit + JSON + table from the cached points only

Why this shape: MLX's CPU matmul runs at ~5 GFLOPS here, so a full 30-block step is hours. Memory is what
we want, and it is linear in depth (weights, LoRA, optimizer state and checkpointed block inputs all grow per
block) and, with the attention fused or recomputed per block, linear in tokens. So each tier is measured at
full width (dim 3840, the real block, the real refiners and embedders) with 1 and 2 blocks at two small
resolutions (the fit: peak = a + b*n + c*T + d*n*T, n blocks, T tokens), checked on 3 blocks (held out), and
extrapolated to 30 blocks at the tier's resolution. What runs and what stands in: bench/_p12_probe.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines.mflux.memory_plan import tier_budget_gb  # noqa: E402

RESULTS = ROOT / "bench" / "results"
POINTS = RESULTS / "p12_points"
WORK = RESULTS / "p12_work"
OUT = RESULTS / "p12_memory.json"
REAL_BLOCKS = 30
CAPTION_TOKENS = 64  # the caption length the extrapolation assumes (a lorad caption is ~30-60 Qwen3 tokens)
FIT_BLOCKS = (1, 2)
HELD_OUT_BLOCKS = (3,)
# (tier, blocks, resolution px, caption tokens, steps), in the order they run. On this shared CPU a
# full-width block-step costs minutes, so the per-token term comes from 64 and 128 px; the points after the
# first run one step (the optimizer state it creates is then added to the peak: see effective_peak_gb), and
# the second tier borrows the first one's per-token term until it has its own second size.
GRID = (
    ("q4-minimal", 1, 128, 64, 2),
    ("q4-minimal", 1, 64, 32, 1),
    ("q4-minimal", 2, 64, 32, 1),
    ("q4-minimal", 3, 64, 32, 1),
    ("q8-checkpointed", 1, 64, 32, 1),
    ("q8-checkpointed", 2, 64, 32, 1),
    ("q8-checkpointed", 3, 64, 32, 1),
    ("q8-checkpointed", 1, 128, 64, 1),
    ("q4-minimal", 2, 128, 64, 1),
    ("q8-checkpointed", 2, 128, 64, 1),
)
# With gradient checkpointing every block keeps its input (tokens x dim, bfloat16) for the backward:
# the depth x tokens term, used when the grid has not measured it (no 2-block point at a second size).
CHECKPOINT_GB_PER_BLOCK_TOKEN = 3840 * 2 / 1e9
POINT_TIMEOUT_S = 3 * 3600

# The planner's tiers as measured here: the settings engines.mflux.memory_plan gives them.
TIER_SETTINGS = {
    "q4-minimal": {"quantize": 4, "gc": True, "low_ram": True, "cache_limit_gb": 2, "plan_res": 512},
    "q8-checkpointed": {"quantize": 8, "gc": True, "low_ram": False, "cache_limit_gb": 8, "plan_res": 1024},
}
MEASURED_ORDER = ("q4-minimal", "q8-checkpointed")
# z-image-turbo adds mflux's assistant training adapter (a LoRA, downloaded at run time, so not loaded
# here): counted as a rank-64 LoRA on the 7 trained modules of 30 blocks kept in float32, a deliberate
# over-estimate (the file is not available offline to weigh).
LORA_PARAMS_PER_RANK_PER_BLOCK = 4 * (3840 + 3840) + 2 * (3840 + 10240) + (10240 + 3840)
TURBO_ADAPTER_GB = LORA_PARAMS_PER_RANK_PER_BLOCK * 64 * REAL_BLOCKS * 4 / 1e9


def tokens(res: int, caption: int = CAPTION_TOKENS) -> int:
    """Sequence length of the unified stream: image patches (res/16)^2 plus the caption, each padded to 32."""
    pad = lambda n: n + (-n) % 32  # noqa: E731
    return pad((res // 16) ** 2) + pad(caption)


def point_tokens(p: dict) -> int:
    return tokens(p["cfg"]["res"], int(p["cfg"].get("caption_tokens", CAPTION_TOKENS)))


def effective_peak_gb(p: dict) -> float:
    """The training peak with the optimizer state resident. A 2-step point measured it; a 1-step point
    saw the state created in its update but not a backward with it resident: its bytes are added."""
    peak = p["peak_bytes"]
    if p.get("steps_done", 0) < 2:
        peak += p.get("optimizer_state_bytes") or 0
    return peak / 1e9


def grid() -> list[dict]:
    """Every point, in the order they run."""
    points = []
    for tier, blocks, res, caption, steps in GRID:
        s = TIER_SETTINGS[tier]
        points.append(
            {
                "tier": tier,
                "quantize": s["quantize"],
                "gc": s["gc"],
                "low_ram": s["low_ram"],
                "cache_limit_gb": s["cache_limit_gb"],
                "blocks": blocks,
                "res": res,
                "caption_tokens": caption,
                "batch": 1,
                "steps": steps,
            }
        )
    return points


def point_key(p: dict) -> str:
    return f"{p['tier']}-b{p['blocks']}-r{p['res']}-c{p.get('caption_tokens', CAPTION_TOKENS)}-n{p['batch']}"


def measure(point: dict) -> dict | None:
    """Run one point in a child (its own process: a clean peak counter and memory), cache the result."""
    cached = POINTS / f"{point_key(point)}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / f"{point_key(point)}.log"
    cmd = [
        "nice",
        "-n",
        "19",
        sys.executable,
        str(ROOT / "bench" / "_p12_probe.py"),
        json.dumps(point),
        str(WORK),
    ]
    print(f"P12 measuring {point_key(point)}", flush=True)
    with log.open("w") as sink:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=sink, text=True, timeout=POINT_TIMEOUT_S)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("P12POINT ")]
    if proc.returncode != 0 or not lines:
        print(f"P12 point {point_key(point)} failed (exit {proc.returncode}); see {log}", flush=True)
        return None
    return cache_point(lines[-1])


def cache_point(line: str) -> dict:
    data = json.loads(line[len("P12POINT ") :])
    POINTS.mkdir(parents=True, exist_ok=True)
    (POINTS / f"{point_key(data['cfg'])}.json").write_text(json.dumps(data, indent=1))
    print(f"P12 done {point_key(data['cfg'])}: {effective_peak_gb(data):.2f} GB", flush=True)
    return data


def load_points() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(POINTS.glob("*.json"))] if POINTS.exists() else []


def _lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    import numpy as np

    coef, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(ys, dtype=float), rcond=None)
    return [float(c) for c in coef]


def fit_tier(points: list[dict], borrowed_c: float | None = None) -> dict | None:
    """peak_gb = a + b*n + c*T + d*n*T (n blocks, T tokens) on the 1- and 2-block points.
    d is fitted when both depths were measured at two sizes, else it is the checkpointed block input
    (CHECKPOINT_GB_PER_BLOCK_TOKEN); c is fitted when the points have two sizes, else borrowed from a tier
    that has them (activations are bfloat16 whatever the weights' quantization).
    fit_error: the worst relative error on the held-out (3-block) points."""
    fit = [p for p in points if p["cfg"]["blocks"] in FIT_BLOCKS]
    held = [p for p in points if p["cfg"]["blocks"] in HELD_OUT_BLOCKS]
    shapes = [(p["cfg"]["blocks"], point_tokens(p)) for p in fit]
    depths, sizes = {n for n, _ in shapes}, {t for _, t in shapes}
    if len(depths) < 2 or (len(sizes) < 2 and borrowed_c is None):
        return None
    ys = [effective_peak_gb(p) for p in fit]
    both = all(len({t for n, t in shapes if n == depth}) >= 2 for depth in FIT_BLOCKS)
    d, c_source, d_source = (
        CHECKPOINT_GB_PER_BLOCK_TOKEN,
        "fitted",
        "checkpointed block input (tokens x 3840 bf16)",
    )
    if both:
        coef = _lstsq([[1.0, n, t, n * t] for n, t in shapes], ys)
        d_source = "fitted"
    elif len(sizes) >= 2:
        coef = _lstsq([[1.0, n, t] for n, t in shapes], [y - d * n * t for y, (n, t) in zip(ys, shapes)]) + [
            d
        ]
    else:
        c = float(borrowed_c)  # type: ignore[arg-type]
        rows = [[1.0, n] for n, t in shapes]
        coef = _lstsq(rows, [y - c * t - d * n * t for y, (n, t) in zip(ys, shapes)]) + [c, d]
        c_source = "borrowed"

    def predict(n: int, t: int) -> float:
        return coef[0] + coef[1] * n + coef[2] * t + coef[3] * n * t

    errors = [
        abs(predict(p["cfg"]["blocks"], point_tokens(p)) - effective_peak_gb(p)) / effective_peak_gb(p)
        for p in held
    ]
    return {
        "coef": coef,
        "c_source": c_source,
        "d_source": d_source,
        "predict": predict,
        "fit_error": max(errors) if errors else None,
        "fit_points": sorted(set(shapes)),
        "held_out": sorted((p["cfg"]["blocks"], point_tokens(p)) for p in held),
        "blocks_measured": sorted({p["cfg"]["blocks"] for p in points}),
        "step_seconds": _step_seconds_fit(points),
    }


def _step_seconds_fit(points: list[dict]):
    """CPU seconds per step ~ e + f * blocks * tokens (the matmuls), from each point's last step."""
    rows, ys = [], []
    for p in points:
        secs = p.get("step_seconds") or []
        if secs:
            rows.append([1.0, p["cfg"]["blocks"] * point_tokens(p)])
            ys.append(secs[-1])
    if len({r[1] for r in rows}) < 2:
        return None
    return _lstsq(rows, ys)


def seconds_at(step_fit, blocks: int, toks: int) -> float | None:
    return None if step_fit is None else step_fit[0] + step_fit[1] * blocks * toks


def machine() -> dict:
    import mlx.core as mx

    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "ram_gb": round(mem_gb, 1),
        "mlx": getattr(mx, "__version__", "?"),
        "device": str(mx.default_device()),
        "note": "shared machine (2 cores, ~8 engineers); MLX CPU backend; runs under nice 19",
    }


def report() -> dict:
    points = load_points()
    measurements = []
    borrowed_c = None
    for tier in MEASURED_ORDER:
        tier_points = [p for p in points if p["cfg"]["tier"] == tier]
        model = fit_tier(tier_points, borrowed_c)
        if model is None:
            continue
        if model["c_source"] == "fitted" and borrowed_c is None:
            borrowed_c = model["coef"][2]
        res = TIER_SETTINGS[tier]["plan_res"]
        peak = model["predict"](REAL_BLOCKS, tokens(res)) + TURBO_ADAPTER_GB
        secs = seconds_at(model["step_seconds"], REAL_BLOCKS, tokens(res))
        measurements.append(
            {
                "model": "z-image-turbo",
                "tier": tier,
                "resolution": res,
                "batch": 1,
                "backend": "cpu",
                "full_width": True,
                "blocks_measured": model["blocks_measured"],
                "method": "extrapolated",
                "fit_error": None if model["fit_error"] is None else round(model["fit_error"], 4),
                "peak_gb": round(peak, 2),
                "planned_gb": tier_budget_gb(tier),
                "seconds_per_step": None if secs is None else round(secs, 1),
                "fit": {
                    "formula": "peak_gb = a + b*blocks + c*tokens + d*blocks*tokens (+ turbo adapter)",
                    "coef": [round(c, 9) for c in model["coef"]],
                    "c_source": model["c_source"],
                    "d_source": model["d_source"],
                    "tokens": tokens(res),
                    "turbo_adapter_gb": round(TURBO_ADAPTER_GB, 3),
                    "fit_points_blocks_tokens": model["fit_points"],
                    "held_out_blocks_tokens": model["held_out"],
                },
            }
        )
    points_out = [
        {
            "tier": p["cfg"]["tier"],
            "blocks": p["cfg"]["blocks"],
            "resolution": p["cfg"]["res"],
            "tokens": point_tokens(p),
            "steps": p.get("steps_done"),
            "peak_gb": round(effective_peak_gb(p), 3),
            "mlx_peak_gb": round(p["mlx_peak_bytes"] / 1e9, 3),
            "step_peak_gb": [round(b / 1e9, 3) for b in p.get("step_peak_bytes") or []],
            "optimizer_state_gb": round((p.get("optimizer_state_bytes") or 0) / 1e9, 4),
            "weights_gb": round((p.get("weights_bytes") or 0) / 1e9, 3),
            "load_peak_gb": round((p.get("load_peak_bytes") or 0) / 1e9, 3),
            "step_seconds": p.get("step_seconds"),
        }
        for p in points
    ]
    doc = {
        "measurements": measurements,
        "planner_model": planner_model(measurements),
        "points": points_out,
        "machine": machine(),
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def planner_model(measurements: list[dict]) -> dict | None:
    """engines.mflux.memory_plan.PeakModel's fields from the measured tiers: resident GB at 30 blocks (the
    fit at zero tokens, adapter included) linear in the quantization bits; per-token GB at 30 blocks with
    checkpointing (the larger of the tiers'); one block's working set per token (the depth-independent c)."""
    bits = {"q4-minimal": 4, "q8-checkpointed": 8}
    rows = [(bits[m["tier"]], m["fit"]) for m in measurements if m["tier"] in bits]
    if len(rows) < 2:
        return None
    resident = [(b, f["coef"][0] + REAL_BLOCKS * f["coef"][1] + f["turbo_adapter_gb"]) for b, f in rows]
    (b1, r1), (b2, r2) = resident[:2]
    slope = (r2 - r1) / (b2 - b1)
    return {
        "resident_at_zero_bits_gb": round(r1 - slope * b1, 3),
        "resident_per_bit_gb": round(slope, 4),
        "per_token_checkpointed_gb": round(
            max(f["coef"][2] + REAL_BLOCKS * f["coef"][3] for _, f in rows), 7
        ),
        "per_token_block_gb": round(max(f["coef"][2] for _, f in rows), 7),
    }


def print_table(doc: dict) -> None:
    print(
        "| tier | resolution | batch | peak (GB, 30 blocks) | planned (GB) | peak/planned | held-out error | s/step (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m in doc["measurements"]:
        ratio = m["peak_gb"] / m["planned_gb"] if m["planned_gb"] else float("nan")
        err = "-" if m["fit_error"] is None else f"{m['fit_error'] * 100:.1f} %"
        print(
            f"| {m['tier']} | {m['resolution']} | {m['batch']} | {m['peak_gb']:.2f} | {m['planned_gb']:.1f} | "
            f"{ratio:.2f} | {err} | {m['seconds_per_step'] or '-'} |"
        )


def machine_table(doc: dict) -> None:
    """The README's table: what `lorad plan --ram-gb N --images 20` gives each machine size."""
    from engines.mflux.memory_plan import plan_memory

    secs = {m["tier"]: m["seconds_per_step"] for m in doc["measurements"]}
    print(
        "| RAM | tier | quantize | resolution | batch | budget (GB) | source | s/step (CPU, this machine) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for ram in (16, 24, 32, 64, 128):
        plan = plan_memory(
            model="z-image-turbo", total_gb=ram, available_gb=ram, image_count=20, max_side=1024
        )
        budget = plan.reason.split("budget ~")[1].split(" GB")[0]
        source = "measured" if "(measured)" in plan.reason else "derived"
        quantize = "bf16" if plan.quantize is None else f"q{plan.quantize}"
        print(
            f"| {ram} GB | `{plan.tier}` | {quantize} | {plan.max_resolution} px | {plan.batch_size} | {budget} | "
            f"{source} | {secs.get(plan.tier) or '-'} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--report", action="store_true", help="only fit and write the JSON from cached points"
    )
    parser.add_argument("--cache-line", help="cache a P12POINT line from a point run by hand")
    args = parser.parse_args()
    if args.cache_line:
        cache_point(Path(args.cache_line).read_text().splitlines()[-1])
    if not args.report and not args.cache_line:
        started = time.time()
        for point in grid():
            measure(point)
            print(f"P12 elapsed {time.time() - started:.0f} s", flush=True)
    doc = report()
    print_table(doc)
    print()
    machine_table(doc)


if __name__ == "__main__":
    main()
