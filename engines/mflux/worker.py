"""The training/render child for MFluxEngine: `python -m engines.mflux.worker train|render ...`.

Runs mflux's real `TrainingRunner` with CWD = the job's work dir. mflux 0.24 has no signal
handling, so a stop (SIGTERM/SIGINT, or the daemon gone) raises mflux's own
`StopTrainingException` at the next step boundary, which makes mflux save a checkpoint at the
current step before it returns. Progress (step, total, loss, ETA) goes to the daemon as JSON
lines on --progress-fd, read from mflux's state rather than scraped from tqdm.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from engines.process.pause_hook import hold_at_step
from engines.process.worker_common import Reporter, StopFlag, worker_main
from lorad_base.workdir import WorkDir


def _hook_training(reporter: Reporter, stop: StopFlag, overrides: dict) -> None:
    """Install the per-step hook (progress + stop) and the plan's overrides on resume."""
    from mflux.models.common.training.state.training_spec import TrainingSpec
    from mflux.models.common.training.state.training_state import TrainingState
    from mflux.utils.exceptions import StopTrainingException

    original_should_save = TrainingState.should_save

    def should_save(self, training_spec):  # called once after every optimizer step
        stop.training_started = True
        step = self.iterator.num_iterations
        total = self.iterator.total_number_of_steps()
        loss = self.statistics.losses[-1] if self.statistics.losses else None
        reporter.step(step, total, loss)
        hold_at_step(step, stop)  # tests only: stop exactly at a given step (engines/process/pause_hook.py)
        if stop.is_set() and step < total:
            raise StopTrainingException(f"stopped at step {step}/{total} ({stop.reason})")
        return original_should_save(self, training_spec)

    TrainingState.should_save = should_save

    original_save = TrainingState.save

    def save(self, adapter, training_spec):
        original_save(self, adapter, training_spec)
        path = (
            Path(training_spec.checkpoint.output_path)
            / "checkpoints"
            / f"{self.iterator.num_iterations:07d}_checkpoint.zip"
        )
        reporter.emit("checkpoint", step=self.iterator.num_iterations, path=str(path))

    TrainingState.save = save

    if overrides:
        original_resolve = TrainingSpec.resolve

        def resolve(config_path, resume_path, *, create_output_dir=True):
            spec = original_resolve(config_path, resume_path, create_output_dir=create_output_dir)
            for key in ("quantize", "low_ram", "gradient_checkpointing", "cache_limit_gb", "max_resolution"):
                if key in overrides:
                    setattr(spec, key, overrides[key])
            return spec

        TrainingSpec.resolve = staticmethod(resolve)


def _hook_samples(job_dir: Path, reporter: Reporter) -> None:
    """Copy each of mflux's previews (its own preview mechanism, data/preview*.txt) into the job's
    samples/ folder as <step>_<prompt number>.png, beside prompts.json: the dashboard's grid."""
    import shutil

    from mflux.models.common.training.trainer import TrainingTrainer

    original = TrainingTrainer._generate_previews

    def generate_previews(adapter, training_spec, training_state, *args, **kwargs):
        result = original(adapter, training_spec, training_state, *args, **kwargs)
        monitoring = training_spec.monitoring
        if monitoring is None:
            return result
        samples = WorkDir(job_dir).samples  # <step:07d>_<prompt number>.png + prompts.json
        samples.mkdir(exist_ok=True)
        prompts = samples / "prompts.json"
        if not prompts.is_file():
            prompts.write_text(json.dumps(list(monitoring.preview_prompts)), encoding="utf-8")
        step = training_state.iterator.num_iterations
        names = monitoring.preview_prompt_names
        for idx in range(len(monitoring.preview_prompts)):
            src = training_state.get_current_preview_image_path(
                training_spec, preview_index=idx, preview_name=names[idx] if idx < len(names) else None
            )
            if src.is_file():
                tmp = samples / f".{step:07d}_{idx + 1}.png.tmp"
                shutil.copyfile(src, tmp)
                tmp.replace(samples / f"{step:07d}_{idx + 1}.png")
        reporter.emit("sample", step=step)
        return result

    TrainingTrainer._generate_previews = staticmethod(generate_previews)


def _prepare_model(plan: dict) -> None:
    if plan["model"] == "tiny-z-image":
        from engines.mflux import tiny_model

        model_path = plan["config"]["model_path"]
        tiny_model.install_patch(Path(model_path))
    _use_local_extras(plan["model"])


def _use_local_extras(model: str) -> None:
    """Hand mflux the training adapter's local path (found in its cache or the Hugging Face
    cache), so it never resolves it on the Hub; when absent (download_models = true) mflux
    fetches it as usual."""
    from engines.mflux.weights import TRAINING_EXTRAS, find_extra

    for repo, filename in TRAINING_EXTRAS.get(model, ()):
        path = find_extra(repo, filename)
        if path is not None and f"{repo}:{filename}" == _runner_adapter():
            from mflux.models.common.training.runner import TrainingRunner

            TrainingRunner.ZIMAGE_TURBO_TRAINING_ADAPTER = str(path)


def _runner_adapter() -> str:
    from mflux.models.common.training.runner import TrainingRunner

    return TrainingRunner.ZIMAGE_TURBO_TRAINING_ADAPTER


def train(args, reporter: Reporter, stop: StopFlag) -> int:
    plan = json.loads(Path(args.plan).read_text())
    job_dir = Path(args.job_dir)
    os.chdir(job_dir)  # mflux resolves output_path against the CWD; ours are absolute anyway
    _prepare_model(plan)
    overrides = {}
    if args.resume:
        overrides = {
            k: plan["config"][k]
            for k in ("quantize", "low_ram", "gradient_checkpointing", "cache_limit_gb", "max_resolution")
        }
    _hook_training(reporter, stop, overrides)
    _hook_samples(job_dir, reporter)
    from mflux.models.common.training.runner import TrainingRunner
    from mflux.models.common.training.state.training_spec import TrainingSpec
    from mflux.utils.exceptions import StopTrainingException

    # mflux's own validation first (its --dry-run path: no weights loaded, nothing written), so a
    # bad config fails in a second with mflux's message instead of after loading the model.
    try:
        TrainingSpec.resolve(config_path=args.config, resume_path=args.resume, create_output_dir=False)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        message = f"mflux rejected the training config: {exc}"
        print(f"lorad-worker: {message}", file=sys.stderr, flush=True)
        reporter.emit("error", kind="config", message=message)
        return 1

    reporter.emit("started", resume=args.resume, total=plan.get("total_steps"))
    try:
        if args.resume:
            TrainingRunner.train(config_path=None, resume_path=args.resume)
        else:
            TrainingRunner.train(config_path=args.config, resume_path=None)
    except StopTrainingException as exc:
        print(f"lorad-worker: {exc}; checkpoint saved", flush=True)
        reporter.emit("stopped", message=str(exc), reason=stop.reason)
        return 0
    reporter.emit("done")
    return 0


def _render_model(config: dict, loras: list[str] | None, model_config):
    """The mflux model that renders: Z-Image, or FLUX.1 [dev] (Flux1) for a cloud-trained LoRA."""
    kwargs = {
        "quantize": config.get("quantize"),
        "model_path": config.get("model_path"),
        "lora_paths": loras,
        "lora_scales": [1.0] if loras else None,
        "model_config": model_config,
    }
    if config["model"] == "dev":
        from mflux.models.flux.variants.txt2img.flux import Flux1

        return Flux1(**kwargs)
    from mflux.models.z_image.variants.z_image import ZImage

    return ZImage(**kwargs)


def render(args, reporter: Reporter, stop: StopFlag) -> int:
    """Render the test prompt with and without the LoRA (same seed), then the comparison."""
    plan = json.loads(Path(args.plan).read_text())
    _prepare_model(plan)
    from mflux.models.common.config.model_config import ModelConfig

    config = plan["config"]
    size = 64 if plan["model"] == "tiny-z-image" else 1024
    steps = int(config["steps"])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = ModelConfig.from_name(config["model"])
    images = {}
    for label, loras in (("base", None), ("lora", [args.lora])):
        if stop.is_set():
            reporter.emit("stopped", reason=stop.reason)
            return 0
        model = _render_model(config, loras, model_config)
        extra = {"guidance": 3.5} if config["model"] == "dev" else {}
        image = model.generate_image(
            seed=int(args.seed),
            prompt=args.prompt,
            num_inference_steps=steps,
            height=size,
            width=size,
            **extra,
        )
        path = out_dir / f"{label}.png"
        image.image.save(path)
        images[label] = path
        reporter.emit("rendered", label=label, path=str(path))
        del model
    from engines.process.compare import side_by_side

    side_by_side(
        images["base"],
        images["lora"],
        out_dir / "compare.png",
        labels=("base", "with LoRA"),
        title=args.prompt,
    )
    reporter.emit(
        "done", base=str(images["base"]), lora=str(images["lora"]), compare=str(out_dir / "compare.png")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return worker_main("engines.mflux.worker", train, render, argv)


if __name__ == "__main__":
    sys.exit(main())
