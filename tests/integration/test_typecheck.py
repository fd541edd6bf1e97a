"""The type checker over daemon/, engines/ and lorad_base/ (configured in pyproject.toml [tool.mypy]).

CI runs only `uv run pytest`, so the check runs here, as a test. mypy caches in .mypy_cache:
the first run on a fresh clone takes about 15 s of CPU, later runs a few seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_mypy_passes_on_daemon_and_engines():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-color-output", "--no-error-summary"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, "mypy found problems:\n" + result.stdout + result.stderr
