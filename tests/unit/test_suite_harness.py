"""The suite's own set-up that its time budget rests on (issue 21: the whole suite in <= 8 min)."""

from __future__ import annotations

import os
import sys


def test_processes_the_tests_start_cache_bytecode():
    """The dev and CI machines export PYTHONDONTWRITEBYTECODE=1; with it, every daemon, worker and
    CLI a test starts compiled redis, huey and the rest from source (bench/RESULTS.md: the suite's
    CPU fell from 18.4 to 13.5 minutes once they cache bytecode). tests/conftest.py removes it."""
    assert "PYTHONDONTWRITEBYTECODE" not in os.environ
    assert sys.dont_write_bytecode is False
