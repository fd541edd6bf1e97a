"""One `Settings` object: defaults <- lorad.toml <- the running daemon's settings <- environment
(LORAD_*) <- CLI flags. Each value remembers where it came from (`Settings.sources`).

The merge and validation are pure (`resolve`), so precedence and error messages are
table-tested; only `load` touches the file system and `os.environ`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_PREFIX = "LORAD_"
CONFIG_FILE_NAME = "lorad.toml"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
OBSERVERS = ("native", "polling")
MISSING_CAPTIONS = ("refuse", "trigger", "vlm")  # the same values as lora.toml's key (intake/options.py)


class SettingsError(ValueError):
    """A bad key or value; the message names the key and where it came from (exit code 2)."""


# name -> (type, default). A plain class rather than a dataclass: `dataclasses` pulls in
# `inspect`, which alone costs more start-up time than `lorad status` may spend in total.
FIELDS: dict[str, tuple[str, object]] = {
    "assets": ("Path", Path("assets")),
    # None: <assets>/.lorad
    "state_dir": ("Path | None", None),
    "model": ("str", "z-image-turbo"),
    "registry": ("Path", Path("config.json")),
    "log_level": ("str", "INFO"),
    "engine": ("str", "mflux"),
    # watchdog's PollingObserver for SMB/NFS folders, where native events do not arrive.
    "observer": ("str", "native"),
    # Periodic rescan for READY files whose events were dropped (FSEvents coalescing, network volumes).
    "rescan_interval_s": ("float", 180.0),
    # Gap between the two stats that prove a dataset folder is no longer being copied into.
    "settle_s": ("float", 0.05),
    # How long SIGTERM waits for the trainer to checkpoint; launchd's ExitTimeOut is set above it.
    "stop_timeout_s": ("float", 60.0),
    # Minimum gap between TRAINING marker refreshes (a progress change shows within this).
    "marker_refresh_s": ("float", 5.0),
    "log_max_bytes": ("int", 10_000_000),
    "log_backups": ("int", 5),
    # macOS: keep the Mac awake while training (caffeinate -i -w <pid>).
    "keep_awake": ("bool", True),
    # Override the memory the plan sees (GB); None: the engine measures the memory that limits
    # training (unified RAM on a Mac, GPU memory on CUDA).
    "ram_gb": ("float | None", None),
    # Wake the queue worker on enqueue. false = huey's stock polling consumer (the bench baseline).
    "queue_wake": ("bool", True),
    # Longest wait for the registry lock (held by another program) before the job fails; retry
    # then writes only the registry entry.
    "lock_timeout_s": ("float", 30.0),
    # Intake refuses larger files before reading them (a 40 GB sparse "image" must not be read).
    "max_image_bytes": ("int", 100_000_000),
    "max_caption_bytes": ("int", 64 * 1024),
    # An image without a caption: "refuse" (the dataset), "trigger" (the trigger word alone) or
    # "vlm" (captioned by caption_model in a child process before training). lora.toml may override.
    "missing_captions": ("str", "refuse"),
    # The vision-language model that captions for missing_captions = "vlm" (a Hugging Face repo id,
    # a local folder, or "tiny-vlm": random weights for tests). Never downloaded unasked.
    "caption_model": ("str", "mlx-community/Qwen3-VL-8B-Instruct-4bit"),
    # Generated captions also written beside the images as .txt sidecars (never overwriting one).
    "write_captions": ("bool", False),
    # Scale-out (docs/ARCHITECTURE.md "Several machines"): "sqlite" = the embedded queue (one
    # process); a redis:// or rediss:// URL makes `lorad run` the coordinator of remote workers.
    "queue": ("str", "sqlite"),
    # With a Redis queue: also train on this machine (false: the coordinator only dispatches).
    "local_worker": ("bool", True),
    # A worker holds its job by a heartbeat with this TTL; when it lapses the job is re-queued.
    "lease_ttl_s": ("float", 30.0),
    # A job no live worker can fit waits this long (with the reason in `lorad status`), then fails.
    "wait_timeout_s": ("float", 86400.0),
    # A worker never starts a model download unasked; true lets its engine fetch missing weights.
    "download_models": ("bool", False),
    # The dashboard (daemon/ui/): "host:port" it listens on; None (`ui = false`) turns it off.
    "ui": ("str | None", "127.0.0.1:8765"),
    # Required to bind the dashboard to a non-loopback address; checked on every request.
    "ui_token": ("str | None", None),
    # A job whose local plan fails for memory goes to a cloud engine instead of failing: true
    # (fal, the default cloud), or the cloud engine's name ("fal", "replicate"); false: off.
    "cloud_fallback": ("str | None", None),
    # Each engine's own settings, raw: {"mflux": {"checkpoint_every": 5}} from `[engines.mflux]` or
    # LORAD_ENGINES_MFLUX_CHECKPOINT_EVERY; the engine validates them when the daemon starts.
    "engines": ("dict", None),
    # Notification targets, one apprise URL each (ntfy://, macosx://, json://, slack://, ...);
    # LORAD_NOTIFY: comma-separated. Delivered off the job path (daemon/notify.py).
    "notify": ("list", ()),
    # The job states that send a notification (validated against the job states).
    "notify_on": ("list", ("done", "failed", "interrupted")),
    # Longest wait for one delivery attempt to one target.
    "notify_timeout_s": ("float", 10.0),
    # Samples during training (a dataset's lora.toml / READY may set its own): render the preview
    # prompts every sample_every steps (None: about four times a run) ...
    "sample_every": ("int | None", None),
    # ... with these prompts (empty: the dataset's preview prompt). LORAD_PREVIEW_PROMPTS: "|"-separated.
    "preview_prompts": ("list", ()),
    # Retention (daemon/retention.py): the newest this many finished jobs are listed; older ones
    # are pruned (hidden rows that keep their fingerprints, work dirs removed).
    "keep_jobs": ("int", 50),
    # A finished job's work dir is pruned to what the dashboard shows after this many days (a
    # failed or cancelled job keeps what `lorad retry` needs until then).
    "keep_workdirs_days": ("float", 7.0),
    # Messages about deprecated keys that were used (logged when the daemon starts).
    "deprecations": ("tuple", ()),
    # Where each setting came from: "default", a lorad.toml path, "LORAD_MODEL", "--model", or
    # "daemon: <its source>" (the running daemon's settings). Filled by resolve.
    "sources": ("dict", None),
}

# Old top-level keys that moved into engines' sections: key -> (the engines, the key there).
# `cloud_daily_jobs` was the cap of every paid cloud: each cloud's section has its own now.
DEPRECATED_ALIASES: dict[str, tuple[tuple[str, ...], str]] = {
    "metal_timeout_workaround": (("mflux",), "metal_timeout_workaround"),
    "checkpoint_every": (("mflux",), "checkpoint_every"),
    "cloud_daily_jobs": (("fal", "replicate"), "daily_jobs"),
}
ENGINES_ENV_PREFIX = ENV_PREFIX + "ENGINES_"


class Settings:
    __slots__ = tuple(FIELDS)
    # For the type checker (strings only, nothing at run time); a test keeps them equal to FIELDS.
    assets: Path
    state_dir: Path | None
    model: str
    registry: Path
    log_level: str
    engine: str
    observer: str
    rescan_interval_s: float
    settle_s: float
    stop_timeout_s: float
    marker_refresh_s: float
    log_max_bytes: int
    log_backups: int
    keep_awake: bool
    ram_gb: float | None
    queue_wake: bool
    lock_timeout_s: float
    max_image_bytes: int
    max_caption_bytes: int
    missing_captions: str
    caption_model: str
    write_captions: bool
    queue: str
    local_worker: bool
    lease_ttl_s: float
    wait_timeout_s: float
    download_models: bool
    ui: str | None
    ui_token: str | None
    cloud_fallback: str | None  # the cloud engine's name, None: off
    engines: dict[str, dict[str, object]]
    notify: tuple[str, ...]
    notify_on: tuple[str, ...]
    notify_timeout_s: float
    sample_every: int | None
    preview_prompts: tuple[str, ...]
    keep_jobs: int
    keep_workdirs_days: float
    deprecations: tuple[str, ...]
    sources: dict[str, str]

    def __init__(self, **values):
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        for name, (_kind, default) in FIELDS.items():
            object.__setattr__(self, name, values.get(name, default))
        if values.get("engines") is None:
            object.__setattr__(self, "engines", {})
        if values.get("sources") is None:
            object.__setattr__(self, "sources", {})

    def __setattr__(self, name, value):
        raise AttributeError("Settings are read-only")

    def __eq__(self, other) -> bool:
        return isinstance(other, Settings) and all(
            getattr(self, n) == getattr(other, n) for n in FIELDS if n != "sources"
        )

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in FIELDS) + ")"

    @property
    def state(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.assets / ".lorad"

    @property
    def training_data(self) -> Path:
        return self.assets / "training_data"

    @property
    def loras(self) -> Path:
        return self.assets / "loras"

    @property
    def log_file(self) -> Path:
        return self.state / "logs" / "lorad.jsonl"

    @property
    def jobs_db(self) -> Path:
        return self.state / "jobs.db"

    @property
    def queue_db(self) -> Path:
        return self.state / "queue.db"

    @property
    def jobs_dir(self) -> Path:
        return self.state / "jobs"

    @property
    def scale_out(self) -> bool:
        """True when jobs go through a Redis queue to workers (`queue` is a redis URL)."""
        return self.queue != "sqlite"


# What a user sets as a plain key (the engines' sections and the notes are filled by resolve).
KEYS = {k: v for k, v in FIELDS.items() if k not in ("engines", "deprecations", "sources")}
DEFAULT_SOURCE = "default"
DAEMON_SOURCE = "daemon: "
_PATH_KEYS = {"assets", "state_dir", "registry"}
_OPTIONAL = {"state_dir", "ram_gb", "ui_token", "sample_every"}
UI_TOKEN_MIN_CHARS = 16  # the dashboard's token is its only lock off loopback
_OFF = ("0", "false", "no", "off")


def parse_ui_address(value: str) -> tuple[str, int]:
    """("host", port) of a `ui` setting like "127.0.0.1:8765" or "[::1]:8765" (pure); ValueError
    says what is wrong."""
    host, sep, port_text = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:8765) or false, got {value!r}")
    return host, int(port_text)


def _coerce_ui(value: object, where: str) -> str | None:
    """`ui`: false/"off" turns the dashboard off, true means the default address."""
    if value is False or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    if value is True:
        return str(FIELDS["ui"][1])
    if not isinstance(value, str):
        raise SettingsError(f'{where}: expected "host:port" or false, got {value!r}')
    try:
        parse_ui_address(value)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    return value.strip()


CLOUD_ENGINES = ("fal", "replicate")  # the engines `cloud_fallback` may name


def _coerce_cloud_fallback(value: object, where: str) -> str | None:
    """`cloud_fallback`: false/off -> None; true -> "fal" (the default cloud); or a cloud engine's name."""
    if value is None or value is False:
        return None
    if value is True:
        return "fal"
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in _OFF or text == "":
        return None
    if text in ("1", "true", "yes", "on"):
        return "fal"
    if text in CLOUD_ENGINES:
        return text
    raise SettingsError(
        f"{where}: expected true, false or a cloud engine ({', '.join(CLOUD_ENGINES)}), got {value!r}"
    )


def _coerce(key: str, value: object, source: str, base: Path) -> object:
    """Turn a raw value (TOML value or env string) into the typed setting, or raise SettingsError."""
    where = f"setting '{key}' from {source}"
    kind = KEYS[key][0]
    if key == "ui":
        return _coerce_ui(value, where)
    if key == "cloud_fallback":
        return _coerce_cloud_fallback(value, where)
    if value is None or (isinstance(value, str) and value == "" and key in _OPTIONAL):
        if key in _OPTIONAL:
            return None
        raise SettingsError(f"{where}: a value is required")
    if key in _PATH_KEYS:
        if not isinstance(value, (str, os.PathLike)) or str(value) == "":
            raise SettingsError(f"{where}: expected a path, got {value!r}")
        path = Path(os.path.expanduser(str(value)))
        return path if path.is_absolute() else (base / path)
    if kind == "list":
        return _coerce_list(key, value, where)
    if "bool" in str(kind):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{where}: expected true or false, got {value!r}")
    if "float" in str(kind) or "int" in str(kind):
        want_int = "int" in str(kind) and "float" not in str(kind)
        if isinstance(value, bool):
            raise SettingsError(f"{where}: expected a number, got {value!r}")
        try:
            number = int(value) if want_int else float(value)  # type: ignore[call-overload, arg-type]
        except (TypeError, ValueError):
            raise SettingsError(
                f"{where}: expected {'an integer' if want_int else 'a number'}, got {value!r}"
            ) from None
        if number < 0 or (
            number == 0 and key not in ("settle_s", "log_backups", "keep_jobs", "keep_workdirs_days")
        ):
            raise SettingsError(f"{where}: must be greater than 0, got {value!r}")
        return number
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{where}: expected a non-empty string, got {value!r}")
    value = value.strip()
    if key == "log_level":
        if value.upper() not in LOG_LEVELS:
            raise SettingsError(f"{where}: must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return value.upper()
    if key == "missing_captions" and value not in MISSING_CAPTIONS:
        raise SettingsError(f"{where}: must be one of {', '.join(MISSING_CAPTIONS)}, got {value!r}")
    if key == "observer" and value not in OBSERVERS:
        raise SettingsError(f"{where}: must be one of {', '.join(OBSERVERS)}, got {value!r}")
    if key == "ui_token" and len(value) < UI_TOKEN_MIN_CHARS:
        raise SettingsError(
            f"{where}: ui_token must be at least {UI_TOKEN_MIN_CHARS} characters (got {len(value)}); "
            f"a short token can be guessed: use a long random string, e.g. `openssl rand -base64 24`"
        )
    if key == "queue" and value != "sqlite" and not value.startswith(("redis://", "rediss://")):
        shown = value.split("@", 1)[-1] if "@" in value else value  # never echo a password
        raise SettingsError(f'{where}: expected "sqlite" or a redis:// / rediss:// URL, got {shown!r}')
    return value


# An apprise URL may hold commas (mailto://...?to=a@x,b@y): LORAD_NOTIFY splits only at a comma
# that starts the next URL (`scheme://`).
_URL_SPLIT = r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)"


def split_list(key: str, text: str) -> list[str]:
    """A comma-separated setting (an environment variable) -> its items (pure)."""
    import re

    if key == "preview_prompts":  # a prompt holds commas ("ohwx, portrait photo")
        parts = text.split("|")
    else:
        parts = re.split(_URL_SPLIT, text) if key == "notify" else text.split(",")
    return [p.strip() for p in parts if p.strip()]


def _coerce_list(key: str, value: object, where: str) -> tuple[str, ...]:
    """A TOML list of strings, or a comma-separated string (environment) -> a tuple of strings."""
    if isinstance(value, str):
        items = split_list(key, value)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value if v.strip()]
    else:
        raise SettingsError(f'{where}: expected a list of strings like ["a", "b"], got {value!r}')
    if key == "notify_on":
        from daemon.states import TRANSITIONS  # the job states (pure; no jobs table)

        bad = [v for v in items if v not in TRANSITIONS]
        if bad:
            raise SettingsError(
                f"{where}: unknown job state {', '.join(map(repr, bad))}; known: {', '.join(TRANSITIONS)}"
            )
    return tuple(dict.fromkeys(items))


def resolve(
    *,
    file_values: Mapping[str, object] | None = None,
    file_source: str = CONFIG_FILE_NAME,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
    base: Path = Path("."),
    project_root: Path | None = None,
    daemon_values: Mapping[str, tuple[object, str]] | None = None,
) -> Settings:
    """Pure merge: defaults <- file <- the running daemon's settings <- env <- flags.

    Relative paths in the file resolve against `project_root` (the file's folder); defaults too
    (`./assets`, `config.json` sit at the project root); env and flags resolve against `base` (CWD).
    `daemon_values` maps a key to (its value, where the daemon got it) (daemon/effective.py).
    """
    root = project_root if project_root is not None else base
    merged: dict[str, object] = {}
    sources: dict[str, str] = {}
    file_values = file_values or {}
    rest, file_engines, notes = _engine_sections(file_values, {}, file_source, sources)
    _, env_engines, env_notes = _engine_sections({}, env or {}, file_source, sources)
    daemon_engines = (daemon_values or {}).get("engines", ({}, ""))[0]
    merged["engines"] = _merge_engines(
        file_engines, daemon_engines if isinstance(daemon_engines, Mapping) else {}, env_engines
    )
    merged["deprecations"] = notes + env_notes
    for key, value in rest.items():
        if key not in KEYS:
            raise SettingsError(
                f"unknown setting '{key}' in {file_source}; known settings: {', '.join(sorted(KEYS))}"
            )
        merged[key], sources[key] = _coerce(key, value, file_source, root), file_source
    for key, (value, source) in (daemon_values or {}).items():
        if key in KEYS:
            where = f"the running daemon's settings ({source})"
            merged[key], sources[key] = _coerce(key, value, where, base), DAEMON_SOURCE + source
    for name, value in (env or {}).items():
        if not name.startswith(ENV_PREFIX) or name.startswith(ENGINES_ENV_PREFIX) or _alias_of_env(name):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in KEYS:
            raise SettingsError(
                f"unknown setting '{key}' from environment variable {name}; "
                f"known: {', '.join(ENV_PREFIX + k.upper() for k in sorted(KEYS))}"
            )
        merged[key], sources[key] = _coerce(key, value, f"environment variable {name}", base), name
    for key, value in (flags or {}).items():
        if value is None:
            continue
        flag = f"--{key.replace('_', '-')}"
        merged[key], sources[key] = _coerce(key, value, f"command-line flag {flag}", base), flag
    for key in ("assets", "registry"):
        merged.setdefault(key, root / str(FIELDS[key][1]))
    engine_sources = {key: src for key, src in sources.items() if key.startswith("engines.")}
    merged["sources"] = {**{key: sources.get(key, DEFAULT_SOURCE) for key in KEYS}, **engine_sources}
    return Settings(**merged)


def _merge_engines(*layers: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, object]]:
    """Engines' raw sections, later layers winning key by key."""
    merged: dict[str, dict[str, object]] = {}
    for layer in layers:
        for engine, values in layer.items():
            if isinstance(values, Mapping):
                merged.setdefault(str(engine), {}).update(values)
    return merged


def _alias_of_env(name: str) -> str | None:
    key = name[len(ENV_PREFIX) :].lower()
    return key if name.startswith(ENV_PREFIX) and key in DEPRECATED_ALIASES else None


def _engine_sections(
    file_values: Mapping[str, object],
    env: Mapping[str, str],
    file_source: str,
    sources: dict[str, str] | None = None,
) -> tuple[dict[str, object], dict[str, dict[str, object]], tuple[str, ...]]:
    """Split the engines' raw sections off: (other file values, {engine: {key: raw}}, deprecation notes).

    Precedence as for every setting: file < environment. Inside each, the engine's own section
    wins over a deprecated top-level alias. Values stay raw: the engine coerces and validates them.
    Where each came from goes to `sources` as "engines.<engine>.<key>" (`lorad config` shows it).
    """
    rest = {k: v for k, v in file_values.items() if k != "engines" and k not in DEPRECATED_ALIASES}
    sections: dict[str, dict[str, object]] = {}
    notes: list[str] = []
    where: dict[str, str] = sources if sources is not None else {}

    def put(engine: str, key: str, value: object, source: str = file_source) -> None:
        sections.setdefault(engine, {})[key] = value
        where[f"engines.{engine}.{key}"] = source

    for key, (engines, new_key) in DEPRECATED_ALIASES.items():
        if key in file_values:
            for engine in engines:
                put(engine, new_key, file_values[key], f"{file_source} ({key}, deprecated)")
            homes = " and ".join(f"[engines.{engine}] {new_key}" for engine in engines)
            notes.append(f"setting '{key}' in {file_source} is deprecated: move it to {homes}")
    table = file_values.get("engines", {})
    if not isinstance(table, Mapping) or not all(isinstance(v, Mapping) for v in table.values()):
        raise SettingsError(f"'engines' in {file_source} must hold tables like [engines.mflux]")
    for engine, values in table.items():
        for key, value in values.items():
            put(engine, key, value)
    for name, value in env.items():
        alias = _alias_of_env(name)
        if alias is not None:
            engines, new_key = DEPRECATED_ALIASES[alias]
            for engine in engines:
                put(engine, new_key, value, name)
            use = " and ".join(
                f"{ENGINES_ENV_PREFIX}{engine.upper()}_{new_key.upper()}" for engine in engines
            )
            notes.append(f"environment variable {name} is deprecated: use {use}")
    for name, value in env.items():
        if name.startswith(ENGINES_ENV_PREFIX):
            engine, _, key = name[len(ENGINES_ENV_PREFIX) :].partition("_")
            if not key:
                raise SettingsError(
                    f"environment variable {name}: expected {ENGINES_ENV_PREFIX}<ENGINE>_<KEY>"
                )
            put(engine.lower(), key.lower(), value, name)
    return rest, sections, tuple(notes)


def find_config_file(start: Path) -> Path | None:
    candidate = start / CONFIG_FILE_NAME
    return candidate if candidate.is_file() else None


def read_config(config_file: Path | None, cwd: Path) -> tuple[dict[str, object], str, Path]:
    """(values, source name, project root) of lorad.toml: the given one, or the project root's."""
    file_values: dict[str, object] = {}
    source = CONFIG_FILE_NAME
    root = cwd
    path = config_file if config_file is not None else find_config_file(cwd)
    if path is not None:
        path = Path(path).expanduser()
        source = str(path)
        import tomllib  # only when there is a file to read

        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"config file {path} does not exist (given with --config)") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
        root = path.resolve().parent
    return file_values, source, root


_LOCATION_KEYS = ("assets", "state_dir")


def load(
    *,
    config_file: Path | None = None,
    flags: Mapping[str, object] | None = None,
    cwd: Path | None = None,
    use_daemon: bool = False,
) -> Settings:
    """Read lorad.toml and the environment, then resolve. With `use_daemon` (every command but the
    daemon and a worker), the running daemon's settings come between lorad.toml and the
    environment: found in this state dir, or through the pointer in the default one."""
    cwd = (cwd or Path.cwd()).resolve()
    file_values, source, root = read_config(config_file, cwd)

    def merged(env: Mapping[str, str], flag_values: Mapping[str, object] | None, daemon_values=None):
        return resolve(file_values=file_values, file_source=source, env=env, flags=flag_values, base=cwd,
                       project_root=root, daemon_values=daemon_values)  # fmt: skip

    settings = merged(os.environ, flags)
    if not use_daemon:
        return settings
    from daemon import effective

    own_location = any((flags or {}).get(k) for k in _LOCATION_KEYS) or any(
        ENV_PREFIX + k.upper() in os.environ for k in _LOCATION_KEYS
    )
    default_state = None if own_location else merged({}, {}).state
    values = effective.daemon_values(settings.state, default_state)
    if not values:
        return settings
    try:
        return merged(os.environ, flags, values)
    except SettingsError:  # a settings file this version cannot read: as if no daemon ran
        return settings


def default_state_dir(config_file: Path | None = None, cwd: Path | None = None) -> Path:
    """The state dir a command with no flags and no LORAD_* variables looks in (lorad.toml's,
    else ./assets/.lorad): where the daemon leaves its pointer."""
    cwd = (cwd or Path.cwd()).resolve()
    file_values, source, root = read_config(config_file, cwd)
    return resolve(file_values=file_values, file_source=source, base=cwd, project_root=root).state


def effective_snapshot(settings: Settings, pid: int) -> dict:
    """What the daemon writes to daemon-settings.json (daemon/effective.py): its pid, state dir,
    each setting's real value and source (pure). Here, not there: effective.py stays below settings."""
    from daemon.effective import jsonable

    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        value = getattr(settings, key)
        values[key] = False if key == "ui" and value is None else jsonable(value)
        sources[key] = settings.sources.get(key, DEFAULT_SOURCE)
    values["state_dir"] = str(settings.state)  # the real place, whatever gave it
    if sources["state_dir"] == DEFAULT_SOURCE:
        sources["state_dir"] = sources["assets"]
    values["engines"] = settings.engines
    return {"pid": pid, "state": str(settings.state), "settings": values, "sources": sources}
