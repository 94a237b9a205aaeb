"""Rich progress bars and tables shared by the phases."""

from __future__ import annotations

import logging
from contextlib import contextmanager
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

console = Console(stderr=True)


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
def progress_bar(description: str, total: int, fields: str = "", disable: bool = False) -> Iterator[tuple[Progress, int]]:
    """A bar with count, rate-bearing ``fields`` (e.g. ``"{task.fields[rate]}"``) and ETA;
    ``disable`` keeps it silent (e.g. in all training processes but the first)."""
    columns = [
        TextColumn("{task.description}", style="bold", markup=False),  # descriptions hold dataset names
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn(fields) if fields else TextColumn(""),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False, disable=disable) as progress:
        task = progress.add_task(description, total=total, rate="", loss="")
        yield progress, task


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
