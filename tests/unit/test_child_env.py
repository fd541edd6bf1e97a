"""Least privilege for children: which variables are secrets, and the environment a child gets
(cloud keys, lorad's own settings, URLs carrying a password dropped; what the child asks for kept)."""

from __future__ import annotations

import pytest

from daemon.childenv import child_env, is_secret

SECRETS = {
    "FAL_KEY": "fal-secret-1",
    "FAL_KEY_ID": "fal-id-2",
    "FAL_KEY_SECRET": "fal-secret-3",
    "REPLICATE_API_TOKEN": "r8-secret-4",
    "LORAD_UI_TOKEN": "ui-token-secret-0123456789",
    "LORAD_NOTIFY": "json://127.0.0.1:9/hook?token=notify-secret",
    "REDIS_URL": "redis://:hunter2@127.0.0.1:1/0",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
}


@pytest.mark.parametrize(
    "name, value, secret",
    [
        ("FAL_KEY", "x", True),
        ("FAL_KEY_ID", "x", True),
        ("FAL_KEY_SECRET", "x", True),
        ("REPLICATE_API_TOKEN", "x", True),
        ("LORAD_QUEUE", "redis://:pw@h:6379/0", True),
        ("LORAD_NOTIFY", "ntfy://topic", True),
        ("LORAD_UI_TOKEN", "x" * 20, True),
        ("LORAD_ASSETS", "/a", True),  # children get their paths as arguments, not lorad's settings
        ("REDIS_URL", "redis://:hunter2@127.0.0.1/0", True),  # a URL with a password, whatever its name
        ("MY_DB", "postgres://u:pw@db/x", True),
        ("GITHUB_TOKEN", "x", True),
        ("AWS_SECRET_ACCESS_KEY", "x", True),
        ("DB_PASSWORD", "x", True),
        ("OPENAI_API_KEY", "x", True),
        ("HF_TOKEN", "x", True),  # a secret: only children that load weights keep it (keep=)
        ("PATH", "/usr/bin", False),
        ("HOME", "/root", False),
        ("HF_HOME", "/cache/hf", False),
        ("HF_HUB_OFFLINE", "1", False),
        ("PROXY", "http://proxy:3128", False),  # a URL without a password
        ("SCRIPTED_ENGINE_STEP_S", "0.1", False),
        ("LORADTEST_HOLD_AT_STEP", "3", False),
        ("KEYCHAIN", "login", False),
    ],
)
def test_is_secret(name, value, secret):
    assert is_secret(name, value) is secret


def test_child_env_drops_secrets_keeps_what_is_asked_and_adds_extras():
    base = {"PATH": "/bin", "HF_TOKEN": "hf", **SECRETS}
    env = child_env(base, extra={"TRANSFORMERS_VERBOSITY": "error"}, keep=("HF_TOKEN",))
    assert env == {"PATH": "/bin", "HF_TOKEN": "hf", "TRANSFORMERS_VERBOSITY": "error"}
    assert "HF_TOKEN" not in child_env(base)
    assert base["FAL_KEY"] == "fal-secret-1"  # the daemon's own environment is untouched
