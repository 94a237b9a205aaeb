"""The tests' guard against hangs (tests/helpers.wait_until): no deadline, yet a dead helper process
or a stuck one fails the wait instead of letting it run forever."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import helpers


def _sleeper(seconds: int = 1000) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_a_helper_that_dies_fails_the_wait_at_once_naming_it():
    dying = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(AssertionError, match=r"waiting for the answer: .* exited with 3 first"):
        helpers.wait_until(lambda: False, "the answer", must_live=[dying])


def test_processes_that_use_no_cpu_are_found_stuck(monkeypatch):
    monkeypatch.setattr(helpers, "STUCK_AFTER_IDLE_S", 0.2)  # a sleeping process never uses CPU: no timing here
    sleeping = _sleeper()
    try:
        with pytest.raises(AssertionError, match="used no CPU .*stuck"):
            helpers.wait_until(lambda: False, "the answer", must_live=[sleeping], poll_s=0.05)
    finally:
        sleeping.kill()
        sleeping.wait()


def test_run_to_end_returns_the_output_and_status(tmp_path):
    done = helpers.run_to_end([sys.executable, "-c", "print('out'); raise SystemExit(4)"], tmp_path / "log")
    assert done.returncode == 4 and done.stdout.strip() == "out"
