"""The engine contract: the one module of engines/ that daemon/ imports (a test checks this).

An engine plans a job for this machine, trains it (with stop and resume) and owns everything
that depends on its trainer: the plan's engine-specific part (an opaque `config`), its saved
state, the files of its report, the adapter's metadata keys, its intake limits, its `lorad
doctor` checks and its settings section (`[engines.<name>]` in lorad.toml). `Engine` is a base
class with defaults: a new engine implements `REQUIRED` (docs/ARCHITECTURE.md "adding an
engine"), so a DGX or cloud engine is one new module plus one `register` line. The test render
is a seam of its own (`Renderer`): an engine that renders implements it; for one that does not
(a cloud), the daemon renders the LoRA here with `local_renderer` (daemon/engine_host.py).

Engines run their ML stack in a child process: importing an engine module must never import
mlx, mflux, torch or PIL (the daemon stays lean; a test checks `sys.modules`).
"""

from __future__ import annotations

import abc
import enum
import importlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

# -- what the daemon hands an engine ---------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What the daemon measures without ML imports (psutil). An engine whose training is limited
    by other memory (a CUDA GPU) probes that itself, in a child."""

    total_gb: float
    available_gb: float
    platform: str  # sys.platform
    apple_silicon: bool
    memory_override_gb: float | None = None  # `ram_gb` / `lorad plan --ram-gb`: plan as if this much


def machine_now(memory_override_gb: float | None = None) -> Machine:
    """The memory and platform now (psutil, imported here: `lorad status` imports this module)."""
    import platform
    import sys

    import psutil

    mem = psutil.virtual_memory()
    gb = 1024**3
    return Machine(
        total_gb=mem.total / gb,
        available_gb=mem.available / gb,
        platform=sys.platform,
        apple_silicon=sys.platform == "darwin" and platform.machine() == "arm64",
        memory_override_gb=memory_override_gb,
    )


@dataclass(frozen=True)
class JobInput:
    """What an engine needs to know about a job (from the snapshot manifest and the job row)."""

    job_id: str
    name: str
    trigger: str
    model: str
    image_count: int
    max_side: int
    options: dict[str, Any]
    data_dir: Path
    preview_prompt: str


@dataclass(frozen=True)
class EngineContext:
    """What every engine gets at construction: lorad's generic settings and its own section."""

    state_dir: Path
    stop_timeout_s: float = 60.0
    # Raw `[engines.<name>]` values; what is engine-specific (the cloud's daily cap, keeping the
    # Mac awake for a child) is an option of that engine, not a field here.
    options: Mapping[str, object] = field(default_factory=dict)
    # false: the engine's children run with the Hub offline (HF_HUB_OFFLINE=1), nothing fetched unasked.
    download_models: bool = False


# -- plans -----------------------------------------------------------------------------------


@dataclass
class TrainingPlan:
    """Generic fields the daemon reads and shows; `config` is the engine's own, opaque to it."""

    engine: str
    model: str
    backend: str  # where training runs: metal | cuda | cpu | <service>
    tier: str  # the plan's resource level; step_down goes to a lower one
    reason: str
    total_steps: int
    summary: list[str] = field(default_factory=list)  # "label  value" lines for `lorad plan`
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    step_downs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingPlan:
        """Tolerant of plans saved by older versions: unknown keys are dropped, missing ones defaulted."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values.setdefault("backend", "unknown")
        values.setdefault("tier", "")
        values.setdefault("reason", "")
        values.setdefault("total_steps", 0)
        return cls(**values)


class PlanError(Exception):
    """The job cannot run on this machine (e.g. not enough memory); the message says why.
    `needs_gb`/`has_gb`, when the engine knows them, let a coordinator say which worker would fit."""

    def __init__(self, message: str, *, needs_gb: float | None = None, has_gb: float | None = None):
        super().__init__(message)
        self.needs_gb, self.has_gb = needs_gb, has_gb


class MemoryPlanError(PlanError):
    """No plan fits this machine's memory: another machine (`cloud_fallback`: the cloud) could train it."""


# -- results ---------------------------------------------------------------------------------


@dataclass
class Progress:
    step: int
    total: int
    loss: float | None = None
    eta_s: float | None = None
    # A remote engine's word on where the job is ("fal.ai queue, position 3", "waiting: fal.ai
    # unreachable ..."): the daemon shows it in status and the marker.
    note: str | None = None
    # Where the job runs remotely ({"engine", "endpoint", "request_id", ...}): stored in the job row
    # as soon as it is reported (the engine has already written it to its workdir, which is what a
    # restart re-attaches from); never a secret.
    remote: dict[str, Any] | None = None


class TrainStatus(enum.Enum):
    COMPLETED = "completed"
    STOPPED = "stopped"  # by a StopToken (shutdown or cancel); resumable
    FAILED = "failed"


class Failure(enum.Enum):
    """Why training failed, as far as a lower plan could help."""

    MEMORY = "memory"  # killed or allocation failed: a lower memory tier may fit
    UNSUPPORTED = "unsupported"  # the backend lacks a kernel for this plan (e.g. a quantized shape)
    SUBMISSION_UNCERTAIN = "submission_uncertain"  # a paid cloud submit whose outcome is unknown
    OTHER = "other"


# A paid cloud submission whose outcome is unknown leaves UNCERTAIN_FILE in the job's workdir;
# `lorad retry` refuses such a job unless told `--resubmit`, which writes RESUBMIT_FILE: the one
# permission for the engine's next attempt to pay again (engines/cloud/submission.py).
UNCERTAIN_FILE = "SUBMISSION_UNCERTAIN.json"
RESUBMIT_FILE = "resubmit.allowed"


def submission_uncertain(workdir: Path) -> bool:
    return (Path(workdir) / UNCERTAIN_FILE).is_file()


# What a cloud did with a cancel (engines/fal: `fal.cancel_outcome`): "stopped", "finished_anyway"
# (paid for; its LoRA is in the job's folder and `lorad retry` publishes it without paying) or
# "still_pending". `lorad cancel` waits a bounded time for this file and says which.
CANCEL_OUTCOME_FILE = "CANCEL_OUTCOME.json"
CANCEL_WORDS = {
    "stopped": "the training on the cloud stopped",
    "finished_anyway": "the training on the cloud finished anyway (and was paid for): its LoRA is in the "
    "job's folder; lorad retry JOB publishes it without paying again",
    "still_pending": "the cloud has not confirmed the stop yet; lorad keeps the request on record "
    "(lorad retry JOB re-attaches to it and reports what happened)",
}


def write_cancel_outcome(workdir: Path, outcome: str, request_id: str) -> None:
    import json

    (Path(workdir) / CANCEL_OUTCOME_FILE).write_text(
        json.dumps({"outcome": outcome, "request_id": request_id, "at": time.time()}), encoding="utf-8"
    )


def read_cancel_outcome(workdir: Path) -> str | None:
    import json

    try:
        outcome = json.loads((Path(workdir) / CANCEL_OUTCOME_FILE).read_text(encoding="utf-8"))["outcome"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return outcome if outcome in CANCEL_WORDS else None


def allow_resubmit(workdir: Path) -> None:
    """`lorad retry JOB --resubmit`: the next attempt may send a new paid request."""
    (Path(workdir) / RESUBMIT_FILE).write_text(f"{time.time()}\n", encoding="utf-8")


@dataclass
class TrainResult:
    status: TrainStatus
    error: str | None = None
    failure: Failure | None = None
    adapter: Path | None = None  # the trained LoRA (COMPLETED)
    step: int | None = None  # the step the saved state holds (STOPPED)
    artifacts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderResult:
    with_lora: Path
    base: Path
    compare: Path


@dataclass(frozen=True)
class RenderFailed:
    error: str


@dataclass(frozen=True)
class RenderStopped:
    reason: str | None = None


RenderOutcome = RenderResult | RenderFailed | RenderStopped


class CheckStatus(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One `lorad doctor` line."""

    name: str
    status: CheckStatus
    detail: str


@dataclass(frozen=True)
class IntakeLimits:
    """What the engine's trainer can use of a dataset (intake warns past these)."""

    max_caption_tokens: int | None = None
    # Lower-case stem prefixes of images the trainer treats specially, refused at intake. The
    # default keeps lorad's own rule for every engine: preview*.txt files are the dataset's sample
    # prompts, so an image named preview* could not have its caption (mflux sets it explicitly:
    # its own loader also reserves preview* images for edit training).
    reserved_image_prefixes: tuple[str, ...] = ("preview",)


# -- stopping --------------------------------------------------------------------------------


class StopToken:
    """Why the running job should stop: 'shutdown' (daemon stopping) or 'cancel' (user)."""

    def __init__(self, check_cancel: Callable[[], bool] | None = None, poll_s: float = 1.0):
        self._event = threading.Event()
        self.reason: str | None = None
        self._check_cancel = check_cancel
        self._poll_s = poll_s
        self._last_poll = 0.0

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def requested(self) -> bool:
        if not self._event.is_set() and self._check_cancel is not None:
            now = time.monotonic()
            if now - self._last_poll >= self._poll_s:
                self._last_poll = now
                if self._check_cancel():
                    self.stop("cancel")
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout) or self.requested()


# -- settings of an engine -------------------------------------------------------------------


class EngineSettingsError(ValueError):
    """A bad `[engines.<name>]` value or an unknown engine; the daemon reports it as a settings error."""


@dataclass(frozen=True)
class Option:
    """One key of an engine's settings section."""

    name: str
    kind: type  # bool, int, float or str
    default: object
    help: str = ""
    minimum: float | None = None


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def coerce_option(engine: str, option: Option, value: object) -> object:
    """A raw TOML or environment value as the option's type, or EngineSettingsError naming it."""
    where = f"setting '{option.name}' in [engines.{engine}]"
    if option.kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise EngineSettingsError(f"{where}: expected true or false, got {value!r}")
    if option.kind in (int, float):
        if isinstance(value, bool):
            raise EngineSettingsError(f"{where}: expected a number, got {value!r}")
        try:
            number = int(str(value)) if option.kind is int else float(str(value))
        except ValueError:
            raise EngineSettingsError(
                f"{where}: expected {'an integer' if option.kind is int else 'a number'}, got {value!r}"
            ) from None
        if option.minimum is not None and number < option.minimum:
            raise EngineSettingsError(f"{where}: must be at least {option.minimum:g}, got {value!r}")
        return number
    if not isinstance(value, str) or not value.strip():
        raise EngineSettingsError(f"{where}: expected a non-empty string, got {value!r}")
    return value.strip()


class Options(dict[str, object]):
    """An engine's coerced settings with typed reads (no `type: ignore` at the reader): each
    accessor checks the value has the type its `Option` declared."""

    def _typed(self, name: str, kinds: tuple[type, ...]) -> object:
        value = self[name]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise TypeError(f"option {name!r} is {type(value).__name__}, not {kinds[0].__name__}")
        return value

    def integer(self, name: str) -> int:
        value = self._typed(name, (int,))
        assert isinstance(value, int)
        return value

    def number(self, name: str) -> float:
        value = self._typed(name, (float, int))
        assert isinstance(value, (float, int))
        return float(value)

    def flag(self, name: str) -> bool:
        value = self._typed(name, (bool,))
        return value is True

    def text(self, name: str) -> str:
        value = self._typed(name, (str,))
        assert isinstance(value, str)
        return value


def coerce_options(engine: str, options: tuple[Option, ...], raw: Mapping[str, object]) -> Options:
    """The engine's settings: defaults overlaid with `raw`; unknown keys are errors that list the known."""
    known = {o.name: o for o in options}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        listing = ", ".join(sorted(known)) or "none"
        raise EngineSettingsError(f"unknown setting '{unknown[0]}' in [engines.{engine}]; known: {listing}")
    values = Options({o.name: o.default for o in options})
    for key, value in raw.items():
        values[key] = coerce_option(engine, known[key], value)
    return values


# Options lorad's generic settings fill in for an engine that declares them (its own section
# wins): `keep_awake` (macOS: caffeinate while a child trains or renders).
GENERIC_OPTIONS = ("keep_awake",)
KEEP_AWAKE = Option("keep_awake", bool, True, "macOS: keep the Mac awake while a child runs (caffeinate)")


@dataclass(frozen=True)
class SavedState:
    """The newest good saved training state of a work dir, read in one look at the disk: the step
    it holds and the files that hold it (relative to the work dir they travel as is)."""

    step: int
    files: tuple[Path, ...]


# -- the contract ----------------------------------------------------------------------------

# What a new engine must define (docs/ARCHITECTURE.md "adding an engine"; tests/e2e/test_engine_contract.py
# keeps this list, the abstract methods and the docs equal). Everything else has a default.
REQUIRED_ATTRIBUTES = ("name", "models")
REQUIRED_METHODS = ("plan", "train", "model_check", "saved_state")
REQUIRED = REQUIRED_ATTRIBUTES + REQUIRED_METHODS
OVERRIDABLE = (
    "options",
    "label",
    "step_down",
    "report_files",
    "adapter_metadata",
    "intake_limits",
    "doctor_checks",
    "disk_needed",
)


class Engine(abc.ABC):
    """The engine contract: a trainer behind lorad. Methods taking more than one argument take
    them by keyword (a call reads as what it passes)."""

    name: ClassVar[str]  # `engine = "<name>"` in lorad.toml; the `[engines.<name>]` section
    models: ClassVar[tuple[str, ...]]  # the model ids it can train
    options: ClassVar[tuple[Option, ...]] = ()  # its settings section's keys
    label: ClassVar[str] = ""  # the engine in messages ("fal.ai"); empty: its name

    def __init__(self, context: EngineContext) -> None:
        self.context = context
        self.state_dir = Path(context.state_dir)
        self.stop_timeout_s = context.stop_timeout_s
        self.download_models = context.download_models
        self.values = coerce_options(self.name, self.options, context.options)

    # -- required ----------------------------------------------------------------------------

    @abc.abstractmethod
    def plan(self, *, job: JobInput, machine: Machine) -> TrainingPlan:
        """The plan for this job on this machine, or PlanError saying why it cannot run."""

    @abc.abstractmethod
    def train(
        self,
        *,
        plan: TrainingPlan,
        workdir: Path,
        progress: Callable[[Progress], None],
        stop: StopToken,
        on_spawn: Callable[[int], None] | None = None,
    ) -> TrainResult:
        """Train (or resume from the engine's own saved state in workdir) until done or stopped."""

    @abc.abstractmethod
    def model_check(self, model: str) -> Check:
        """Fast (no ML imports, no download): can this engine train `model` here? `lorad run`
        says it at start, so a missing model is known before the first job fails on it."""

    @abc.abstractmethod
    def saved_state(self, workdir: Path) -> SavedState | None:
        """The newest good saved training state under workdir (None: nothing saved), step and files
        from one look at the disk: where a re-adopted job resumes (its marker and status), and,
        copied to the same relative paths under another work dir holding the same snapshot, what
        `train` resumes from there (how a checkpoint travels between machines: scale-out)."""

    # -- defaults ----------------------------------------------------------------------------

    def step_down(
        self, *, plan: TrainingPlan, job: JobInput, machine: Machine, failed: TrainResult
    ) -> TrainingPlan | None:
        """A lower plan after `failed`; None when no lower plan would help (the job fails with
        `failed.error`); PlanError when one would but none exists (the message says why)."""
        return None

    def report_files(self, workdir: Path) -> list[Path]:
        """Files of the training report to publish beside the LoRA (loss plot, preview, ...); a
        folder named `samples` (samples during training) is published as that folder."""
        return []

    def adapter_metadata(self, plan: TrainingPlan) -> dict[str, str]:
        """Engine-specific safetensors metadata keys (e.g. ss_network_dim, ss_network_alpha)."""
        return {}

    def intake_limits(self) -> IntakeLimits:
        return IntakeLimits()

    def doctor_checks(self, *, model: str, machine: Machine) -> list[Check]:
        """`lorad doctor` lines for this engine: its stack, its device, the model's weights."""
        return [self.model_check(model)]

    def disk_needed(self, *, plan: TrainingPlan, workdir: Path) -> int:
        """Bytes training this plan will still write under workdir (checkpoints, adapter), what is
        already there deducted: the daemon refuses a job early when they do not fit."""
        return 0


@runtime_checkable
class Renderer(Protocol):
    """Makes a job's test render: the prompt with and without the LoRA (same seed) and their
    comparison. An engine that renders implements it; the daemon picks one (engine_host.renderer_for)."""

    def render(
        self,
        *,
        plan: TrainingPlan,
        workdir: Path,
        lora: Path,
        prompt: str,
        out_dir: Path,
        stop: StopToken,
        seed: int = 42,
    ) -> RenderOutcome: ...


LOCAL_RENDERER = "engines.mflux.render:LocalRenderer"


def local_renderer(context: EngineContext, *, trained_on: str, folder: str) -> Renderer:
    """The test render of a LoRA trained elsewhere (`trained_on`, e.g. "fal.ai"), made on this
    machine by the mflux engine; its render plan and log go under `<workdir>/<folder>/local`."""
    module_name, _, class_name = LOCAL_RENDERER.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    renderer: Renderer = cls(context, trained_on=trained_on, folder=folder)
    return renderer


# -- the registry ----------------------------------------------------------------------------

# name -> "module:Class". Modules are imported only when the engine is used, so `lorad status`
# and the daemon never load an engine they do not run.
_REGISTRY: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Make an engine selectable as `engine = "<name>"`; target is "package.module:ClassName"."""
    if ":" not in target:
        raise ValueError(f"engine target {target!r} must look like 'package.module:ClassName'")
    _REGISTRY[name] = target


def known_engines() -> list[str]:
    return sorted(_REGISTRY)


def engine_class(name: str) -> type[Engine]:
    target = _REGISTRY.get(name)
    if target is None:
        raise EngineSettingsError(f"unknown engine {name!r}; known engines: {', '.join(known_engines())}")
    module_name, _, class_name = target.partition(":")
    cls: type[Engine] = getattr(importlib.import_module(module_name), class_name)
    missing = [a for a in REQUIRED_ATTRIBUTES if not getattr(cls, a, None)]
    if missing:
        raise TypeError(f"engine {name!r} ({target}) does not set {', '.join(missing)}")
    return cls


def get_engine(name: str, context: EngineContext) -> Engine:
    """The engine named `name`, built with its settings section; EngineSettingsError if either is bad."""
    return engine_class(name)(context)


register("mflux", "engines.mflux.engine:MFluxEngine")
register("scripted", "engines.scripted.engine:ScriptedEngine")
register("fal", "engines.fal.engine:FalEngine")
register("replicate", "engines.replicate.engine:ReplicateEngine")


# -- captioning (missing_captions = "vlm") ---------------------------------------------------


@dataclass
class CaptionOutcome:
    """What a captioning child produced: raw captions by key (an image's hash), and how it ended."""

    captions: dict[str, str]
    stopped: str | None = None  # the stop reason when stopped (cancel, shutdown)
    error: str | None = None
    peak_rss_bytes: int | None = None
    peak_mlx_bytes: int | None = None


def run_captioner(
    request: Mapping[str, Any],
    workdir: Path,
    stop: StopToken,
    on_event: Callable[[dict], None],
    *,
    stop_timeout_s: float,
    on_spawn: Callable[[int], None] | None = None,
) -> CaptionOutcome:
    """Caption images with a local vision-language model in a child process (mlx-vlm: the
    daemon never imports it). request: model, prompt, max_tokens, state_dir, images=[{key, path}]."""
    runner = importlib.import_module("engines.captioner.runner")
    outcome: CaptionOutcome = runner.run(
        request, workdir, stop, on_event, stop_timeout_s=stop_timeout_s, on_spawn=on_spawn
    )
    return outcome
