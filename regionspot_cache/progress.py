"""Progress of the long phases, and the tables they print.

On a terminal a phase shows a rich bar. Elsewhere (nohup, SLURM and CI logs, ``2> file``) a bar
would only be drawn when the phase ends, so it writes a plain line instead when it starts, every
``RS_CACHE_PROGRESS_INTERVAL`` seconds (default 30) and when it ends: count, rate, elapsed, ETA.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from datetime import timedelta
from types import SimpleNamespace
from typing import Iterator, Mapping, Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console(stderr=True)  # logs, progress, messages
results = Console()  # what a command was asked for (tables, JSON): stdout, so that it can be piped apart from the logs

INTERVAL_ENV = "RS_CACHE_PROGRESS_INTERVAL"  # seconds between progress lines when output is not a terminal
DEFAULT_INTERVAL_S = 30.0


def _now() -> float:
    """The clock of the progress lines (tests replace it to drive time without sleeping)."""
    return time.monotonic()


def log_to_console(level: int = logging.INFO) -> None:
    """Show the library's log messages on ``console``, above any progress bars; for the
    command line and the demo (library modules only log). Repeated calls add no handler.

    The handler sits on the root logger, so libraries that call ``logging.info()`` find a handler
    and add none of their own (which would print our lines twice), and pytest's caplog still sees
    our records; it shows our messages and other libraries' warnings, not their INFO chatter
    (dask logs every worker start)."""
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) and h.console is console for h in root.handlers):
        handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
        handler.addFilter(lambda record: record.name.startswith("regionspot_cache") or record.levelno >= logging.WARNING)
        root.addHandler(handler)
    logging.getLogger("regionspot_cache").setLevel(level)


def say(*parts: str | tuple[str, str]) -> None:
    """Print one line verbatim: plain strings and ``(text, style)`` pairs, never read as markup.
    Messages hold paths, names and errors from the user and the file system, where rich markup
    would crash (``[/b]``) or drop text (``[copy]``); styles are given as pairs instead."""
    console.print(Text.assemble(*parts), highlight=False)


def plain(text: object) -> Text:
    """``text`` as a rich renderable that is shown as is (for table cells and titles)."""
    return Text(str(text))


@contextmanager
def progress_bar(
    description: str, total: int, fields: str = "", disable: bool = False, completed: int = 0
) -> Iterator[tuple[Progress | LogLines, int]]:
    """A bar with count, rate-bearing ``fields`` (e.g. ``"{task.fields[rate]}"``) and ETA, on a
    terminal; periodic ``LogLines`` otherwise. Both are driven by ``bar.update(task, advance=n, **fields)``.
    ``completed``: work done before this run (a resumed training), left out of the rate.
    ``disable`` keeps it silent (e.g. in all training processes but the first)."""
    if not console.is_terminal or disable:
        # Nothing to do (e.g. every shard committed already): no lines about it either.
        lines = LogLines(
            description, total, fields, progress_interval(), silent=disable or total <= completed, completed=completed
        )
        yield lines, 0
        lines.finish()
        return
    columns = [
        TextColumn("{task.description}", style="bold", markup=False),  # descriptions hold dataset names
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn(fields) if fields else TextColumn(""),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, rate="", loss="")
        yield progress, task


def progress_interval() -> float:
    """Seconds between progress lines: ``RS_CACHE_PROGRESS_INTERVAL``, or 30."""
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(float(text), 0.0) if text.strip() else DEFAULT_INTERVAL_S
    except ValueError:
        logging.getLogger(__name__).warning("%s=%r is not a number of seconds; using %g", INTERVAL_ENV, text, DEFAULT_INTERVAL_S)
        return DEFAULT_INTERVAL_S


class LogLines:
    """Progress as plain lines, for output that is not a terminal: one when the phase starts,
    then at most one per ``interval`` seconds as work is done, and one when it ends."""

    def __init__(self, description: str, total: int, fields: str, interval: float, silent: bool = False, completed: int = 0):
        self.description, self.total, self.fields_format, self.interval = description, total, fields, interval
        self.silent = silent
        self.completed = self.resumed = completed
        self.fields: dict[str, str] = {"rate": "", "loss": ""}
        self.started = self.last_line = _now()
        self._write(self.started, "started" if not completed else f"resumed at {completed}")

    def update(self, task: int, advance: float = 0, **fields: str) -> None:
        """As ``rich.progress.Progress.update``: ``advance`` the count, set ``fields``."""
        self.completed += advance
        self.fields.update(fields)
        now = _now()
        if now - self.last_line >= self.interval:
            self._write(now, self.status(now))

    def finish(self) -> None:
        self._write(_now(), "done: " + self.status(_now()))

    def status(self, now: float) -> str:
        """``120/480 (25%), 4.0/s, elapsed 0:00:30, ETA 0:01:30`` (rate: the fields, if they carry one)."""
        elapsed = now - self.started
        rate = (self.completed - self.resumed) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.completed
        eta = _duration(left / rate) if rate > 0 else "?"
        shown = self.fields_format.format(task=SimpleNamespace(fields=self.fields)).strip() or f"{rate:.3g}/s"
        share = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        return f"{self.completed:g}/{self.total}{share}, {shown}, elapsed {_duration(elapsed)}, ETA {eta}"

    def _write(self, now: float, text: str) -> None:
        self.last_line = now
        if not self.silent:
            console.print(Text(f"{self.description}: {text}"), highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def metrics_table(title: str, rows: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> Table:
    """One row per named result (e.g. untrained / trained), one column per metric, in percent."""
    table = Table(title=plain(title))
    table.add_column("head")
    for column in columns:
        table.add_column(column, justify="right")
    for name, metrics in rows.items():
        table.add_row(plain(name), *(percent(metrics.get(column)) for column in columns))
    return table


def percent(value: float | None) -> str:
    """AP as printed everywhere: percent with one decimal; LVIS's -1 (no ground truth) is n/a."""
    return "n/a" if value is None or value < 0 else f"{100 * value:.1f}"
