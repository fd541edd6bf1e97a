"""Per-dataset options from `lora.toml` and the `READY` file (READY wins), as pure functions.

Every problem is a Finding that names the file and the key, says what is wrong and what to do.
"""

from __future__ import annotations

import json
import tomllib
from typing import Any

from daemon.intake.findings import Finding

CAPTION_POLICIES = ("prepend", "require")
# What an image without a caption gets (apart from caption_policy, which governs captions that exist).
MISSING_CAPTIONS = ("refuse", "trigger", "vlm")
MAX_PREVIEW_PROMPTS = 8  # each one is rendered at every sample: more would slow training down
# What the LoRA teaches: a subject ("character", the default) or a look ("style"); only the
# image-count advice depends on it (daemon/intake/validate.py), not the training.
KINDS = ("character", "style")

# key -> (type, lower bound, upper bound, help)
OPTION_SPECS: dict[str, tuple[type, Any, Any]] = {
    "name": (str, 1, 100),
    "trigger": (str, 1, 100),
    "model": (str, 1, 200),
    "rank": (int, 1, 256),
    "alpha": (float, 0.0001, 1024.0),
    "epochs": (int, 1, 10_000),
    "steps": (int, 1, 1_000_000),
    "learning_rate": (float, 1e-8, 1.0),
    "resolution": (int, 256, 4096),
    "priority": (int, -1000, 1000),
    "preview_prompt": (str, 1, 2000),
    # Samples during training: mflux renders each prompt every sample_every steps (default: ~4 a run).
    "preview_prompts": (list, 1, MAX_PREVIEW_PROMPTS),
    "sample_every": (int, 1, 1_000_000),
    "caption_policy": (str, None, None),
    "engine": (str, 1, 50),  # one of engines.base.known_engines(): "mflux", "fal", ...
    "max_cost_usd": (float, 0.0, 100_000.0),  # a cloud engine refuses the job above this estimate
    "missing_captions": (str, None, None),  # one of MISSING_CAPTIONS
    "caption_model": (str, 1, 200),  # the captioner for missing_captions = "vlm"
    "write_captions": (bool, None, None),  # generated captions also as .txt sidecars in the folder
    "kind": (str, None, None),  # one of KINDS
}
READY_ONLY = {"force": (bool, None, None)}


# key -> (the values it accepts, what to write instead of a wrong one)
CHOICES: dict[str, tuple[tuple[str, ...], str]] = {
    "caption_policy": (CAPTION_POLICIES, 'write caption_policy = "prepend" (default) or "require"'),
    "missing_captions": (MISSING_CAPTIONS, 'write missing_captions = "refuse" (default), "trigger" or "vlm"'),
    "kind": (KINDS, 'write kind = "character" (default: a person, pet or object) or kind = "style" (a look)'),
}


def _check_value(
    key: str, value: Any, spec: tuple[type, Any, Any], filename: str
) -> tuple[Any, Finding | None]:
    """One option's value as stored, or the finding that refuses it: its type first, then the
    values it may take, then its text or its range (pure)."""
    kind, low, high = spec
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list:
        return _check_prompts(key, value, filename)
    problem = _type_finding(key, value, kind, filename) or _choice_finding(key, value, filename)
    if problem is not None:
        return None, problem
    if kind is str:
        return _check_text(key, value, (low, high), filename)
    if low is not None and not (low <= value <= high):
        return None, Finding.error(
            filename,
            f"key '{key}' = {value!r} is out of range ({low} to {high})",
            f"pick a value for '{key}' between {low} and {high}",
            code="option.range",
        )
    return value, None


def _type_finding(key: str, value: Any, kind: type, filename: str) -> Finding | None:
    """A value of the wrong type (a bool is not an int here, though Python says it is)."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if ok:
        return None
    return Finding.error(
        filename,
        f"key '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}",
        f"write e.g. {key} = {_example(key)}",
        code="option.type",
    )


def _choice_finding(key: str, value: Any, filename: str) -> Finding | None:
    """A value outside the ones a key accepts (CHOICES), or an engine lorad does not have."""
    if key in CHOICES and value not in CHOICES[key][0]:
        choices, todo = CHOICES[key]
        return Finding.error(
            filename,
            f"key '{key}' must be one of {', '.join(choices)}, got {value!r}",
            todo,
            code="option.value",
        )
    if key == "engine":
        from engines.base import known_engines

        if value.strip() not in known_engines():
            return Finding.error(
                filename,
                f"key 'engine' = {value!r} is not an engine lorad has",
                f"known engines: {', '.join(known_engines())}",
                code="option.value",
            )
    return None


def _check_text(
    key: str, value: str, bounds: tuple[Any, Any], filename: str
) -> tuple[str | None, Finding | None]:
    """A text option stripped, or refused: empty or too long, control characters, a name that
    cannot be a file name."""
    text, (low, high) = value.strip(), bounds
    if low is not None and not (low <= len(text) <= high):
        return None, Finding.error(
            filename,
            f"key '{key}' must be 1 to {high} characters",
            f"shorten or fill in '{key}'",
            code="option.value",
        )
    if any(ord(ch) < 32 for ch in text):
        return None, Finding.error(
            filename,
            f"key '{key}' contains control characters",
            f"use plain text for '{key}'",
            code="option.value",
        )
    if key == "name" and ("/" in text or "\\" in text or text.startswith(".")):
        return None, Finding.error(
            filename,
            f"key 'name' = {text!r} cannot be used as a file name (no '/', '\\', or leading '.')",
            "use letters, digits, '-' and '_'",
            code="option.value",
        )
    return text, None


def _check_prompts(key: str, value: Any, filename: str) -> tuple[Any, Finding | None]:
    """preview_prompts: a list of 1 to MAX_PREVIEW_PROMPTS plain-text prompts."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None, Finding.error(
            filename,
            f"key '{key}' must be a list of strings, got {type(value).__name__} {value!r}",
            f"write e.g. {key} = {_example(key)}",
            code="option.type",
        )
    prompts = [v.strip() for v in value]
    if not 1 <= len(prompts) <= MAX_PREVIEW_PROMPTS:
        return None, Finding.error(
            filename,
            f"key '{key}' must hold 1 to {MAX_PREVIEW_PROMPTS} prompts, got {len(prompts)}",
            f"keep at most {MAX_PREVIEW_PROMPTS} prompts in '{key}'",
            code="option.range",
        )
    for prompt in prompts:
        if not 1 <= len(prompt) <= 2000 or any(ord(ch) < 32 for ch in prompt):
            return None, Finding.error(
                filename,
                f"key '{key}' has a prompt that is empty, longer than 2000 characters or holds control characters",
                f"use 1 to 2000 characters of plain text per prompt in '{key}'",
                code="option.value",
            )
    return prompts, None


def _example(key: str) -> str:
    return {
        "name": '"my_character"',
        "trigger": '"ohwx"',
        "model": '"z-image-turbo"',
        "rank": "16",
        "alpha": "16",
        "epochs": "10",
        "steps": "1000",
        "learning_rate": "1e-4",
        "resolution": "1024",
        "priority": "0",
        "preview_prompt": '"ohwx, portrait photo"',
        "preview_prompts": '["ohwx, portrait photo", "ohwx, full body, on a beach"]',
        "sample_every": "250",
        "caption_policy": '"prepend"',
        "force": "true",
        "engine": '"fal"',
        "max_cost_usd": "5.0",
        "missing_captions": '"trigger"',
        "caption_model": '"tiny-vlm"',
        "write_captions": "true",
        "kind": '"style"',
    }.get(key, "...")


def parse_options(text: str | bytes, filename: str, *, allow_force: bool) -> tuple[dict, list[Finding]]:
    """Parse lora.toml / READY text. Empty text is no options (a plain `touch READY`)."""
    if isinstance(text, bytes):
        if b"\x00" in text:
            return {}, [
                Finding.error(
                    filename,
                    "contains NUL bytes, not TOML text",
                    "rewrite it as UTF-8 TOML",
                    code="option.toml",
                )
            ]
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError:
            return {}, [Finding.error(filename, "is not UTF-8 text", "save it as UTF-8", code="option.toml")]
    if not text.strip():
        return {}, []
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return {}, [
            Finding.error(
                filename,
                f"is not valid TOML: {exc}",
                'write lines like rank = 16 or name = "x"',
                code="option.toml",
            )
        ]
    specs = dict(OPTION_SPECS)
    if allow_force:
        specs.update(READY_ONLY)
    options: dict = {}
    findings: list[Finding] = []
    for key, value in raw.items():
        if key not in specs:
            findings.append(
                Finding.error(
                    filename,
                    f"unknown key '{key}'",
                    f"known keys: {', '.join(sorted(specs))}",
                    code="option.unknown",
                )
            )
            continue
        checked, problem = _check_value(key, value, specs[key], filename)
        if problem is not None:
            findings.append(problem)
        else:
            options[key] = checked
    if "epochs" in options and "steps" in options:
        findings.append(
            Finding.error(
                filename, "sets both 'epochs' and 'steps'", "keep one of them", code="option.conflict"
            )
        )
    return options, findings


def merge(toml_options: dict, ready_options: dict) -> dict:
    """READY wins over lora.toml; epochs and steps replace each other."""
    merged = dict(toml_options)
    if "epochs" in ready_options:
        merged.pop("steps", None)
    if "steps" in ready_options:
        merged.pop("epochs", None)
    merged.update(ready_options)
    return merged


def render_ready(options: dict) -> str:
    """TOML text for a READY file written by `lorad enqueue`."""
    lines = []
    for key, value in options.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        elif isinstance(value, list):
            lines.append(f"{key} = {json.dumps([str(v) for v in value], ensure_ascii=False)}")
        else:
            escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{key} = "{escaped}"')
    return "\n".join(lines) + ("\n" if lines else "")
