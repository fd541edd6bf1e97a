"""P12: peak memory of a full-size Z-Image LoRA training step per memory tier, measured at full width.

Run (background, resumable; each finished point is cached under bench/results/p12_points/):
    nohup nice -n 19 uv run python bench/p12_memory.py > bench/results/p12_work/run.log 2>&1 &
    uv run python bench/p12_memory.py --report     # fit + JSON + table from the cached points only

Why this shape: MLX's CPU matmul runs at ~2-5 GFLOPS here (and this process gets a niced share of two
shared cores), so a full 30-block step is hours. Memory is what we want, and it is linear in depth
(weights, LoRA, its gradient and AdamW state, the checkpointed block inputs all grow per block) and, with
the attention computed one block at a time, linear in tokens. So the model is measured at full width (dim
3840, the real block, the real refiners and embedders) with 1-3 blocks at two small resolutions, fitted
(see fit_model: the depth terms are counted exactly, two terms are fitted, every other point is held out)
and extrapolated to 30 blocks at each tier's resolution. What runs and what stands in: bench/_p12_probe.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engines.mflux.memory_plan import tier_budget_gb  # noqa: E402

RESULTS = ROOT / "bench" / "results"
POINTS = RESULTS / "p12_points"
WORK = RESULTS / "p12_work"
OUT = RESULTS / "p12_memory.json"
REAL_BLOCKS = 30
CAPTION_TOKENS = 64  # the caption length the extrapolation assumes (a lorad caption is ~30-60 Qwen3 tokens)
# (tier, blocks, resolution px, caption tokens, steps), in the order they run. On this shared CPU a
# full-width block-step costs minutes, so the per-token term comes from 64 and 128 px, each point runs one
# step (the optimizer state it creates is then added: see effective_peak_gb), and only the 1-block points
# of the reference tier are fitted: every other point is a held-out check.
GRID = (
    ("q4-minimal", 1, 64, 32, 1),
    ("q8-checkpointed", 2, 64, 32, 1),
    ("q4-minimal", 1, 128, 64, 1),
    ("q4-minimal", 2, 64, 32, 1),
    ("q8-checkpointed", 1, 64, 32, 1),
    ("q4-minimal", 3, 64, 32, 1),
    ("q8-checkpointed", 3, 64, 32, 1),
)
# With gradient checkpointing every block keeps its input (tokens x dim, bfloat16) for the backward.
CHECKPOINT_GB_PER_BLOCK_TOKEN = 3840 * 2 / 1e9
# Used only until two sizes are measured: one block's activations saved for its backward (norms, q/k/v
# and their normed and rotated forms, the attention output and projections, the gates; the feed-forward's
# w1, w3, SiLU and product), ~15 x 3840 + 4 x 10240 bf16 values a token, live with their gradients.
ONE_BLOCK_GB_PER_TOKEN = 2 * (15 * 3840 + 4 * 10240) * 2 / 1e9
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
# Per block, lorad's LoRA (rank 16, float32 factors) + its gradient + AdamW's two moments: 16 bytes a parameter.
LORA_TRAINING_GB_PER_BLOCK = LORA_PARAMS_PER_RANK_PER_BLOCK * 16 * 16 / 1e9


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
    """The cached training points (attention.json is the attention probe's, not a point)."""
    files = sorted(p for p in POINTS.glob("*.json") if p.name != "attention.json") if POINTS.exists() else []
    return [json.loads(p.read_text()) for p in files]


def _lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    import numpy as np

    coef, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(ys, dtype=float), rcond=None)
    return [float(c) for c in coef]


@functools.cache
def resident_gb(bits: int | None, blocks: int) -> float:
    """The full-size model's weights at `bits` with `blocks` main blocks (exact: mflux's quantizer on lazily
    built modules; linear in blocks, so two depths give all)."""
    from _p12_probe import resident_bytes

    one, two = resident_bytes(bits, 1) / 1e9, resident_bytes(bits, 2) / 1e9
    return one + (two - one) * (blocks - 1)


def _bits(p: dict) -> int | None:
    return p["cfg"].get("quantize")


def fit_model(points: list[dict]) -> dict | None:
    """One model for every tier: peak_gb = W(bits, n) + e0 + e1*n + c*T + d*n*T.

    The depth terms are counted, not guessed: W is the tier's exact weight bytes at n blocks, e1 the
    per-block LoRA (rank 16, float32) with its gradient and AdamW's two moments, d the checkpointed
    block input. e0 (what does not grow with depth or tokens) and c (one block's per-token working set
    plus the per-token tensors outside the blocks) are fitted on the reference tier's 1-block points at
    two sizes. Every other point (2 and 3 blocks, the other tier) is held out: it tests the depth and
    quantization terms the 30-block extrapolation rests on."""
    reference = MEASURED_ORDER[0]
    fit = [p for p in points if p["cfg"]["tier"] == reference and p["cfg"]["blocks"] == 1]
    if not fit:
        return None
    e1, d, a2 = LORA_TRAINING_GB_PER_BLOCK, CHECKPOINT_GB_PER_BLOCK_TOKEN, attention_gb_per_token2()
    ys = [  # n = 1
        effective_peak_gb(p) - resident_gb(_bits(p), 1) - e1 - d * point_tokens(p) - a2 * point_tokens(p) ** 2
        for p in fit
    ]
    if len({point_tokens(p) for p in fit}) >= 2:
        e0, c = _lstsq([[1.0, point_tokens(p)] for p in fit], ys)
        c_source = "fitted"
    else:  # one size measured: the per-token term is counted, e0 fitted
        c = ONE_BLOCK_GB_PER_TOKEN
        e0 = sum(y - c * point_tokens(p) for y, p in zip(ys, fit)) / len(fit)
        c_source = "counted (one block's saved activations and their gradients)"
    return {
        "coef": [e0, e1, c, d],
        "a2": a2,
        "c_source": c_source,
        "reference": reference,
        "fit_points": sorted({(1, point_tokens(p)) for p in fit}),
    }


def predict_gb(model: dict, bits: int | None, blocks: int, toks: int) -> float:
    e0, e1, c, d = model["coef"]
    return resident_gb(bits, blocks) + e0 + e1 * blocks + c * toks + d * blocks * toks + model["a2"] * toks**2


def attention_gb_per_token2() -> float:
    """The attention's T^2 term (GB per token^2), from the attention probe's points (least squares through
    0). Run once: `python bench/_p12_probe.py attention 256 512` -> bench/results/p12_points/attention.json."""
    path = POINTS / "attention.json"
    if not path.exists():
        return 0.0
    rows = json.loads(path.read_text())
    return sum(r["extra_bytes"] * r["tokens"] ** 2 for r in rows) / sum(r["tokens"] ** 4 for r in rows) / 1e9


def held_out(model: dict, points: list[dict]) -> tuple[float | None, list]:
    """Worst relative error of the model on every point it was not fitted on. The model is one for all
    tiers (only the exact weight term differs), so its held-out error is each tier's extrapolation error."""
    fitted = {(model["reference"], 1)}
    held = [p for p in points if (p["cfg"]["tier"], p["cfg"]["blocks"]) not in fitted]
    errors = [
        abs(predict_gb(model, _bits(p), p["cfg"]["blocks"], point_tokens(p)) - effective_peak_gb(p))
        / effective_peak_gb(p)
        for p in held
    ]
    return (max(errors) if errors else None), sorted(
        (p["cfg"]["tier"], p["cfg"]["blocks"], point_tokens(p)) for p in held
    )


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
    model = fit_model(points)
    measurements = []
    for tier in MEASURED_ORDER if model else ():
        tier_points = [p for p in points if p["cfg"]["tier"] == tier]
        if not tier_points:
            continue
        bits, res = TIER_SETTINGS[tier]["quantize"], TIER_SETTINGS[tier]["plan_res"]
        peak = predict_gb(model, bits, REAL_BLOCKS, tokens(res)) + TURBO_ADAPTER_GB
        error, held = held_out(model, points)
        measurements.append(
            {
                "model": "z-image-turbo",
                "tier": tier,
                "resolution": res,
                "batch": 1,
                "backend": "cpu",
                "full_width": True,
                "blocks_measured": sorted({p["cfg"]["blocks"] for p in tier_points}),
                "method": "extrapolated",
                "fit_error": None if error is None else round(error, 4),
                "peak_gb": round(peak, 2),
                "planned_gb": tier_budget_gb(tier),
                # Not measured where it means something: this CPU share (nice 19 on 2 shared cores) says
                # nothing about a Mac or a GPU. The points keep their raw wall seconds per step.
                "seconds_per_step": None,
                "fit": {
                    "formula": "peak_gb = W(bits, blocks) + e0 + e1*blocks + c*tokens + d*blocks*tokens + a2*tokens^2 + adapter",
                    "a2_gb_per_token2": model["a2"],
                    "coef": [round(c, 9) for c in model["coef"]],
                    "fitted": "e0 (and c when two sizes are measured); e1: LoRA + grad + AdamW bytes per block; "
                    "d: checkpointed block input",
                    "c_source": model["c_source"],
                    "fitted_on": f"{model['reference']} at (blocks, tokens) {model['fit_points']}",
                    "held_out_tier_blocks_tokens": held,
                    "weights_gb_30_blocks": round(resident_gb(bits, REAL_BLOCKS), 3),
                    "tokens": tokens(res),
                    "turbo_adapter_gb": round(TURBO_ADAPTER_GB, 3),
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
        "planner_model": planner_model(model),
        "points": points_out,
        "machine": machine(),
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def planner_model(model: dict | None) -> dict | None:
    """engines.mflux.memory_plan.PeakModel's fields: the resident GB at 30 blocks per quantization (exact
    weights + the fitted LoRA/optimizer/fixed terms + the adapter), the per-token GB at 30 blocks with
    checkpointing, one block's per-token working set (c, the depth-independent per-token term) and the
    attention's per-token^2 term (one block's at a time)."""
    if model is None:
        return None
    e0, e1, c, d = model["coef"]

    def resident(bits: int | None) -> float:
        return round(resident_gb(bits, REAL_BLOCKS) + e0 + e1 * REAL_BLOCKS + TURBO_ADAPTER_GB, 2)

    return {
        "resident_q4_gb": resident(4),
        "resident_q8_gb": resident(8),
        "resident_bf16_gb": resident(None),
        "per_token_checkpointed_gb": round(c + REAL_BLOCKS * d, 7),
        "per_token_block_gb": round(c, 7),
        "attention_gb_per_token2": round(model["a2"], 12),
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


def points_table(doc: dict) -> None:
    """Every measured point: what the extrapolation stands on."""
    print(
        "| tier | blocks | px | tokens | steps | peak (GB, full text encoder counted) | of which MLX-measured | weights loaded (GB) | wall s/step (nice 19) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for p in doc["points"]:
        print(
            f"| {p['tier']} | {p['blocks']} | {p['resolution']} | {p['tokens']} | {p['steps']} | {p['peak_gb']:.3f} | "
            f"{p['mlx_peak_gb']:.3f} | {p['weights_gb']:.3f} | {', '.join(str(round(x)) for x in p['step_seconds'] or [])} |"
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
    points_table(doc)
    print()
    machine_table(doc)


if __name__ == "__main__":
    main()
