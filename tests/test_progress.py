"""Progress where the output is not a terminal (nohup, SLURM, CI, ``2> file``): lines during a phase."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from regionspot_cache import progress
from regionspot_cache.progress import progress_bar


class FakeClock:
    """Time that moves only when read: each reading is ``step`` seconds after the last."""

    def __init__(self, step: float):
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture
def log_file(monkeypatch):
    """The progress console writing to a file-like object, as under nohup or ``2> file``."""
    stream = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=stream, force_terminal=False, width=200))
    return stream


def test_lines_appear_during_the_phase_at_the_interval(log_file, monkeypatch):
    monkeypatch.setattr(progress, "_now", FakeClock(step=10.0))  # 10 s per reading
    monkeypatch.setenv(progress.INTERVAL_ENV, "30")
    seen_during = []
    with progress_bar("train head", 12, "loss {task.fields[loss]}") as (bar, task):
        for step in range(12):
            bar.update(task, advance=1, loss=f"{1 / (step + 1):.3f}")
            seen_during.append(log_file.getvalue().count("\n"))
    lines = log_file.getvalue().splitlines()
    assert lines[0] == "train head: started"
    # One line every third update (30 s of 10 s readings), written while the phase still runs.
    assert seen_during[-1] >= 4 and seen_during[2] > seen_during[0]
    periodic = lines[1:-1]
    assert periodic and all("ETA" in line and "elapsed" in line and "loss" in line for line in periodic)
    assert lines[-1].startswith("train head: done: 12/12 (100%), loss 0.083")


def test_the_rate_and_eta_leave_out_the_steps_resumed_from(log_file, monkeypatch):
    monkeypatch.setattr(progress, "_now", FakeClock(step=1.0))
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")  # a line per update
    with progress_bar("train head", 100, completed=90) as (bar, task):
        bar.update(task, advance=1)
        bar.update(task, advance=1)
    lines = log_file.getvalue().splitlines()
    assert lines[0] == "train head: resumed at 90"
    # 2 steps in 2 s since the start: 1/s, so 8 steps left take 8 s.
    assert lines[2] == "train head: 92/100 (92%), 1/s, elapsed 0:00:02, ETA 0:00:08"


def test_a_silent_bar_writes_nothing_and_a_bad_interval_falls_back(log_file, monkeypatch, caplog):
    with progress_bar("train head", 3, disable=True) as (bar, task):
        bar.update(task, advance=3)
    assert log_file.getvalue() == ""
    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    assert progress.progress_interval() == progress.DEFAULT_INTERVAL_S
    assert "soon" in caplog.text
