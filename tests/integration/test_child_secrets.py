"""Least privilege for children, for real: training and render children of a running daemon get
an environment without the secrets they do not need (cloud keys, lorad's own settings, URLs
carrying a password)."""

from __future__ import annotations

import json

from conftest import wait_for

from daemon.sample import make_dataset

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


def test_training_and_render_children_get_no_secrets(daemon_factory, tmp_path):
    """Real scripted-engine children dump the names in their environment (never the values)."""
    dumps = tmp_path / "env-dumps"
    dumps.mkdir()
    d = daemon_factory(extra_env={**SECRETS, "SCRIPTED_ENGINE_ENV_DUMP": str(dumps)}).start()
    folder = make_dataset(d.training_data / "ohwx_env", images=1)
    (folder / "READY").write_text("steps = 2\n")
    wait_for(lambda: d.job_states().get("ohwx_env") == "done", 90, message="done")
    seen = {p.stem: json.loads(p.read_text()) for p in dumps.glob("*.json")}
    assert set(seen) == {"train", "render"}, seen
    for mode, names in seen.items():
        assert "PATH" in names and "LORAD_PARENT_PID" in names, mode  # the environment is still there
        leaked = sorted(set(SECRETS) & set(names))
        assert not leaked, f"the {mode} child got {leaked}"
        assert not [n for n in names if n.startswith("LORAD_") and n != "LORAD_PARENT_PID"], (mode, names)
