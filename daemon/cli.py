"""The `lorad` command line.

Start-up stays light: only the settings module loads here (argparse too, except on the
`lorad status` fast path); each verb imports what it needs when it runs. mlx, mflux, PIL and transformers are never imported on this path (a test
checks `sys.modules`), so `lorad --help` and `lorad status` stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def known_models(engine: str = "mflux") -> str:
    """The model ids the engine can train (its class is loaded, not its ML stack)."""
    from engines.base import engine_class

    return ", ".join(engine_class(engine).models)


def _add_globals(parser, *, suppress: bool, model_help: str | None = None) -> None:
    import argparse

    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--assets", metavar="DIR", default=default, help="assets folder (default ./assets)")
    parser.add_argument(
        "--config", metavar="FILE", default=default, help="settings file (default ./lorad.toml)"
    )
    parser.add_argument(
        "--state-dir", metavar="DIR", default=default, help="state folder (default <assets>/.lorad)"
    )
    parser.add_argument(
        "--model",
        default=default,
        help=model_help or "model id (default z-image-turbo; `lorad enqueue --help` lists them)",
    )
    parser.add_argument(
        "--registry", metavar="FILE", default=default, help="LoRA registry JSON (default config.json)"
    )
    parser.add_argument("--log-level", default=default, help="DEBUG, INFO, WARNING or ERROR")


COMMANDS = (
    "run",
    "status",
    "validate",
    "enqueue",
    "cancel",
    "retry",
    "plan",
    "logs",
    "service",
    "selftest",
    "doctor",
    "notify",
    "worker",
    "workers",
    "ui",
)
_GLOBAL_WITH_VALUE = {"--assets", "--config", "--state-dir", "--model", "--registry", "--log-level"}


def command_in(argv: list[str]) -> str | None:
    """The subcommand named in argv (skipping global options and their values), if any."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in _GLOBAL_WITH_VALUE:
            skip = True
        elif not token.startswith("-"):
            return token
    return None


def build_parser(only: str | None = None):
    """The full parser, or with `only` just that subcommand's (building all eleven costs the
    fast commands a noticeable part of their run time)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="lorad",
        description="Hands-off LoRA training daemon: drop READY into assets/training_data/<trigger>_<name>/, "
        "find assets/loras/<name>.safetensors later.",
    )
    _add_globals(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    class _Skip:  # stands in for the parsers of other commands when `only` is set
        def add_argument(self, *a, **k):
            return None

    def add(name: str, help_text: str, model_help: str | None = None):
        if only is not None and name != only:
            return _Skip()
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_globals(p, suppress=True, model_help=model_help)
        return p

    add("run", "run the daemon in the foreground (what launchd starts)")

    p = add("status", "show jobs: state, progress, ETA (works with or without a running daemon)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="include finished jobs older than a day")

    p = add("validate", "check a dataset folder without training it (exit 0 valid, 1 invalid)")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")

    p = add(
        "enqueue",
        "mark a dataset READY (same path as a user's drop), optionally with overrides; on a terminal with "
        "no flags it asks, showing the plan's defaults, and writes only what you change",
        model_help=f"train this dataset on another model (written into READY); known: {known_models()}",
    )
    p.add_argument("path", type=Path, help="the dataset folder (assets/training_data/<trigger>_<name>)")
    p.add_argument("--force", action="store_true", help="train even if an identical dataset was trained")
    p.add_argument("--rank", type=int, help="LoRA rank (default 16, or lora.toml's)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1.0)")
    p.add_argument("--epochs", type=int, help="passes over the images (replaces --steps)")
    p.add_argument(
        "--steps", type=int, help="training steps (default ~100 per image, 1000-3000; `lorad plan DIR`)"
    )
    p.add_argument("--learning-rate", type=float, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--resolution", type=int, help="max training resolution in px (capped by the memory plan)")
    p.add_argument("--priority", type=int, help="higher runs first among queued jobs (default 0)")
    p.add_argument("--name", help="the LoRA's file name (default: the folder name after the trigger)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask, even on a terminal")

    p = add("cancel", "cancel a queued or running job")
    p.add_argument("job")

    p = add("retry", "queue a failed, cancelled or interrupted job again")
    p.add_argument("job")

    p = add("plan", "print the memory/training plan for this machine (or --ram-gb)")
    p.add_argument("path", type=Path, nargs="?")
    p.add_argument("--ram-gb", type=float)
    p.add_argument(
        "--images", type=int, help="plan for this many images when no dataset is given (default 20)"
    )
    p.add_argument("--json", action="store_true")

    p = add("logs", "pretty tail of the JSON log")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--job")
    p.add_argument("--json", action="store_true", help="raw JSON lines")
    p.add_argument("-n", "--lines", type=int, default=40)

    p = add("service", "install/uninstall/start/stop/restart/status/print the launchd or systemd service")
    p.add_argument("action", choices=["install", "uninstall", "start", "stop", "restart", "status", "print"])
    p.add_argument("--platform", choices=["launchd", "systemd"])
    p.add_argument("--dry-run", action="store_true", help="print the launchctl/systemctl commands only")
    p.add_argument(
        "--worker",
        action="store_true",
        help="the service runs `lorad worker` (needs the queue setting or --queue)",
    )
    p.add_argument(
        "--queue", metavar="URL", help="with --worker: the coordinator's redis:// or rediss:// URL"
    )

    p = add("worker", "train jobs from a coordinator's Redis queue on this machine (scale-out)")
    p.add_argument(
        "--queue", metavar="URL", help="redis:// or rediss:// URL (default: the queue setting / LORAD_QUEUE)"
    )

    p = add("workers", "list the live workers of the Redis queue: host, backend, memory, job, last heartbeat")
    p.add_argument(
        "--queue", metavar="URL", help="redis:// or rediss:// URL (default: the queue setting / LORAD_QUEUE)"
    )
    p.add_argument("--json", action="store_true")

    p = add("selftest", "train a miniature model end to end in a temp folder and print the outputs")
    p.add_argument(
        "--clean", action="store_true", help="remove the temp folder afterwards (default: keep it)"
    )

    add("doctor", "check this machine: Python, RAM, disk, mflux/mlx, model weights")

    p = add("notify", "notifications: `lorad notify test` sends a test message to every `notify` target")
    p.add_argument("action", choices=["test"])

    p = add("ui", "open the dashboard (served by `lorad run`, setting ui) in the browser")
    p.add_argument("--print", action="store_true", dest="print_only", help="only print its URL")
    return parser


def settings_from_args(args):
    from daemon import settings as settings_mod

    flags = {
        "assets": getattr(args, "assets", None),
        "state_dir": getattr(args, "state_dir", None),
        "model": getattr(args, "model", None),
        "registry": getattr(args, "registry", None),
        "log_level": getattr(args, "log_level", None),
    }
    config = getattr(args, "config", None)
    return settings_mod.load(config_file=Path(config) if config else None, flags=flags)


def fast_status_args(argv: list[str]):
    """Parse `[globals] status [--json] [--all]` without argparse, or None for anything else.

    `lorad status` is the command people (and scripts) run most; importing argparse and
    building a parser is about half its run time (bench P5). Anything unusual, including
    --help or a malformed line, goes through argparse as usual.
    """
    import types

    values: dict = {"command": "status", "json": False, "all": False}
    it = iter(argv)
    seen_command = False
    for token in it:
        if token in _GLOBAL_WITH_VALUE:
            value = next(it, None)
            if value is None or value.startswith("-"):
                return None
            values[token[2:].replace("-", "_")] = value
        elif token == "status" and not seen_command:
            seen_command = True
        elif token in ("--json", "--all") and seen_command:
            values[token[2:]] = True
        else:
            return None
    return types.SimpleNamespace(**values) if seen_command else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = fast_status_args(argv)
    if args is None:
        command = command_in(argv)
        parser = build_parser(only=command if command in COMMANDS else None)
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from daemon.settings import SettingsError

    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"lorad: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from daemon import commands

    handler = getattr(commands, "cmd_" + args.command)
    try:
        return int(handler(settings, args) or 0)
    except KeyboardInterrupt:
        return 130
    except commands.UsageError as exc:
        print(f"lorad {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SettingsError as exc:  # e.g. an unknown engine, found when the command builds it
        print(f"lorad: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
