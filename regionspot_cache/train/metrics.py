"""Per-step training metrics: a CSV file (one row per step) and TensorBoard event files."""

from __future__ import annotations

import time
from pathlib import Path

from regionspot_cache.runtime.files import atomic_write_bytes


class MetricsLog:
    """Writes ``metrics.csv`` (flushed every row) and, if asked, TensorBoard events under
    ``tensorboard/``. On resume, rows and events past the resumed step are dropped, so the logs
    read as one uninterrupted run."""

    COLUMNS = ("step", "loss", "lr", "images_per_s", "dataset")

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.csv"
        self._rewrite_csv(resume_step)
        self.handle = open(self.path, "a", encoding="utf-8")
        self.board = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            board_dir = run_dir / "tensorboard"
            if resume_step:
                _wait_past_event_files(board_dir)
            # purge_step: events a killed run wrote past the resumed step are discarded.
            self.board = SummaryWriter(str(board_dir), purge_step=resume_step or None)

    def _rewrite_csv(self, resume_step: int) -> None:
        kept = []
        if self.path.is_file() and resume_step > 0:
            rows = self.path.read_text().splitlines()[1:]
            kept = [row for row in rows if row and int(row.split(",")[0]) < resume_step]
        atomic_write_bytes(self.path, ("\n".join([",".join(self.COLUMNS), *kept]) + "\n").encode())

    def write(self, step: int, loss: float, lr: float, rate: float, dataset: str) -> None:
        self.handle.write(f"{step},{loss!r},{lr!r},{rate:.2f},{dataset}\n")
        self.handle.flush()
        if self.board is not None:
            self.board.add_scalar("train/loss", loss, step)
            self.board.add_scalar(f"train/loss/{dataset}", loss, step)
            self.board.add_scalar("train/lr", lr, step)
            self.board.add_scalar("train/images_per_s", rate, step)

    def flush(self) -> None:
        """Called before each training state is saved: everything up to a resume point is on disk."""
        if self.board is not None:
            self.board.flush()

    def close(self) -> None:
        self.handle.close()
        if self.board is not None:
            self.board.close()


def recorded_last_step(run_dir: Path) -> tuple[float, float] | None:
    """(loss, images per second) of the last step in ``metrics.csv``, or None if none is recorded:
    what a re-run of a finished training reports instead of a loss it did not compute."""
    path = run_dir / "metrics.csv"
    rows = path.read_text(encoding="utf-8").splitlines()[1:] if path.is_file() else []
    if not rows or not rows[-1]:
        return None
    _, loss, _, rate, _ = rows[-1].split(",", 4)
    return float(loss), float(rate)


def _wait_past_event_files(directory: Path) -> None:
    """TensorBoard reads a run's event files in name order, and a name starts with the second it
    was created in, then the pid: a resumed writer's file made in the same second as the killed
    run's could sort first, and its purge of the killed run's later steps would be read before
    them. Wait (at most a second) until the new file's second is later than every existing one."""
    stamps = [int(part) for part in (p.name.split(".")[3] for p in directory.glob("events.out.tfevents.*")) if part.isdigit()]
    if stamps:
        time.sleep(max(0.0, max(stamps) + 1 - time.time()))
