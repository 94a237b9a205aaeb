"""Per-step training metrics: a CSV file (one row per step) and TensorBoard event files."""

from __future__ import annotations

from pathlib import Path

from regionspot_cache.runtime import atomic_write_bytes


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

            # purge_step: events a killed run wrote past the resumed step are discarded.
            self.board = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)

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
