"""Settings: precedence (file < env < flags), defaults, errors naming the key and its source, paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import settings as settings_mod
from daemon.settings import Settings, SettingsError, resolve

BASE = Path("/proj")


@pytest.mark.parametrize(
    "file_values, env, flags, key, expected",
    [
        ({}, {}, {}, "model", "z-image-turbo"),
        ({"model": "flux2-klein-4b"}, {}, {}, "model", "flux2-klein-4b"),
        ({"model": "flux2-klein-4b"}, {"LORAD_MODEL": "z-image"}, {}, "model", "z-image"),
        (
            {"model": "flux2-klein-4b"},
            {"LORAD_MODEL": "z-image"},
            {"model": "tiny-z-image"},
            "model",
            "tiny-z-image",
        ),
        ({}, {}, {}, "assets", BASE / "assets"),
        ({"assets": "data/a"}, {}, {}, "assets", BASE / "data/a"),
        ({}, {"LORAD_ASSETS": "/abs/assets"}, {}, "assets", Path("/abs/assets")),
        ({}, {}, {}, "registry", BASE / "config.json"),
        ({}, {"LORAD_LOG_LEVEL": "debug"}, {}, "log_level", "DEBUG"),
        ({"log_level": "WARNING"}, {}, {"log_level": "error"}, "log_level", "ERROR"),
        ({}, {"LORAD_KEEP_AWAKE": "false"}, {}, "keep_awake", False),
        ({"rescan_interval_s": 30}, {}, {}, "rescan_interval_s", 30.0),
        ({}, {}, {"state_dir": None}, "state_dir", None),
    ],
)
def test_precedence(file_values, env, flags, key, expected):
    s = resolve(file_values=file_values, env=env, flags=flags, base=BASE, project_root=BASE)
    assert getattr(s, key) == expected


def test_state_dir_defaults_under_assets():
    s = resolve(base=BASE, project_root=BASE)
    assert s.state == BASE / "assets" / ".lorad"
    assert s.log_file == BASE / "assets" / ".lorad" / "logs" / "lorad.jsonl"
    s = resolve(env={"LORAD_STATE_DIR": "/var/lorad"}, base=BASE)
    assert s.state == Path("/var/lorad")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"file_values": {"modle": "x"}}, ["unknown setting 'modle'", "lorad.toml"]),
        ({"env": {"LORAD_FOO": "1"}}, ["unknown setting 'foo'", "LORAD_FOO"]),
        ({"env": {"LORAD_LOG_LEVEL": "loud"}}, ["log_level", "LORAD_LOG_LEVEL", "DEBUG"]),
        ({"flags": {"log_level": "loud"}}, ["log_level", "--log-level"]),
        ({"file_values": {"rescan_interval_s": "soon"}}, ["rescan_interval_s", "number"]),
        ({"file_values": {"rescan_interval_s": -1}}, ["rescan_interval_s", "greater than 0"]),
        ({"file_values": {"keep_awake": "maybe"}}, ["keep_awake", "true or false"]),
        ({"file_values": {"model": 3}}, ["model", "string"]),
        ({"file_values": {"observer": "magic"}}, ["observer", "polling"]),
        ({"file_values": {"assets": ""}}, ["assets", "path"]),
    ],
)
def test_bad_settings_name_key_and_source(kwargs, words):
    with pytest.raises(SettingsError) as info:
        resolve(base=BASE, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_load_reads_project_file_and_env(tmp_path, monkeypatch):
    (tmp_path / "lorad.toml").write_text('model = "z-image"\nassets = "my_assets"\n')
    monkeypatch.setenv("LORAD_LOG_LEVEL", "WARNING")
    s = settings_mod.load(cwd=tmp_path, flags={"model": "tiny-z-image"})
    assert s.model == "tiny-z-image"
    assert s.assets == tmp_path / "my_assets"
    assert s.log_level == "WARNING"


def test_settings_paths():
    s = Settings(assets=Path("/a"))
    assert s.training_data == Path("/a/training_data") and s.loras == Path("/a/loras")
    assert s.jobs_db == Path("/a/.lorad/jobs.db") and s.queue_db == Path("/a/.lorad/queue.db")


def test_settings_annotations_match_fields():
    """Settings declares its attributes for the type checker; they must be exactly FIELDS."""
    from daemon.settings import FIELDS, Settings

    assert list(Settings.__annotations__) == list(FIELDS)
