"""The `lorad` command line.

Start-up stays light: only argparse and the settings module load here; each verb imports what
it needs when it runs. mlx, mflux, PIL and transformers are never imported on this path (a test
checks `sys.modules`), so `lorad --help` and `lorad status` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _add_globals(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--assets", metavar="DIR", default=default, help="assets folder (default ./assets)")
    parser.add_argument("--config", metavar="FILE", default=default, help="settings file (default ./lorad.toml)")
    parser.add_argument("--state-dir", metavar="DIR", default=default, help="state folder (default <assets>/.lorad)")
    parser.add_argument("--model", default=default, help="model id (default z-image-turbo)")
    parser.add_argument("--registry", metavar="FILE", default=default, help="LoRA registry JSON (default config.json)")
    parser.add_argument("--log-level", default=default, help="DEBUG, INFO, WARNING or ERROR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorad",
        description="Hands-off LoRA training daemon: drop READY into assets/training_data/<trigger>_<name>/, "
        "find assets/loras/<name>.safetensors later.",
    )
    _add_globals(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_globals(p, suppress=True)
        return p

    add("run", "run the daemon in the foreground (what launchd starts)")

    p = add("status", "show jobs: state, progress, ETA (works with or without a running daemon)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="include finished jobs older than a day")

    p = add("validate", "check a dataset folder without training it (exit 0 valid, 1 invalid)")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")

    p = add("enqueue", "mark a dataset READY (same path as a user's drop), optionally with overrides")
    p.add_argument("path", type=Path)
    p.add_argument("--force", action="store_true", help="train even if an identical dataset was trained")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--resolution", type=int)
    p.add_argument("--priority", type=int)
    p.add_argument("--name")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask, even on a terminal")

    p = add("cancel", "cancel a queued or running job")
    p.add_argument("job")

    p = add("retry", "queue a failed, cancelled or interrupted job again")
    p.add_argument("job")

    p = add("plan", "print the memory/training plan for this machine (or --ram-gb)")
    p.add_argument("path", type=Path, nargs="?")
    p.add_argument("--ram-gb", type=float)
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

    p = add("selftest", "train a miniature model end to end in a temp folder and print the outputs")
    p.add_argument("--clean", action="store_true", help="remove the temp folder afterwards (default: keep it)")

    add("doctor", "check this machine: Python, RAM, disk, mflux/mlx, model weights")
    return parser


def settings_from_args(args: argparse.Namespace):
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
