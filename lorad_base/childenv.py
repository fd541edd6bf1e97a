"""The environment of every child process lorad starts: the daemon's, minus secrets.

Least privilege: a training, render, probe, load-check or notify child needs PATH, HOME, caches
and its own knobs, never the cloud's keys, lorad's settings (the queue URL with its password,
the notify URLs, ui_token: children get what they need as arguments or on stdin) or any URL
that carries a password. A child that does need a secret names it in `keep` (the mflux
children keep HF_TOKEN for gated weights). Pure; the caller passes os.environ.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# Secrets by exact name: the cloud engines' keys.
SECRET_NAMES = frozenset({"FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "REPLICATE_API_TOKEN"})
# lorad's own settings (LORAD_QUEUE, LORAD_NOTIFY, LORAD_UI_TOKEN, ...): no child reads them.
LORAD_PREFIX = "LORAD_"
# Conventional names of credentials (GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, ...).
SECRET_SUFFIXES = ("_TOKEN", "_SECRET", "_PASSWORD", "_PASSWD", "_API_KEY", "_ACCESS_KEY", "_SECRET_KEY")
# scheme://user:password@host: a URL whose user info holds a password, whatever the variable.
_URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]*@")
# Tokens Hugging Face reads: the children that load model weights keep them.
HF_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def is_secret(name: str, value: str) -> bool:
    """Is this environment variable a credential a child must not inherit by default? (pure)"""
    upper = name.upper()
    return (
        upper in SECRET_NAMES
        or upper.startswith(LORAD_PREFIX)
        or upper.endswith(SECRET_SUFFIXES)
        or bool(_URL_PASSWORD.search(value or ""))
    )


def child_env(
    base: Mapping[str, str], *, extra: Mapping[str, str] | None = None, keep: Iterable[str] = ()
) -> dict[str, str]:
    """`base` without its secrets (those named in `keep` stay), then `extra` on top (pure)."""
    kept = set(keep)
    env = {k: v for k, v in base.items() if k in kept or not is_secret(k, v)}
    env.update(extra or {})
    return env
