"""``rs-cache``: extract features once, train the head from the cache, evaluate on LVIS.

One module per command group; each defines plain functions that are registered here.
"""

from __future__ import annotations

import sys

import typer

from regionspot_cache.cli import cache, demo, evaluate, extract, predict, propose, search, train
from regionspot_cache.errors import RegionSpotCacheError
from regionspot_cache.progress import log_to_console, say

app = typer.Typer(
    help="RegionSpot with cached frozen SAM + CLIP features: `extract` runs the encoders once per "
    "image into a zarr/parquet cache, `train` fits the head from the cache alone, `eval` scores "
    "boxes and computes LVIS AP. `demo` does all three on generated data with tiny models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(extract.extract)
app.command()(propose.propose)
app.command()(train.train)
app.command("eval")(evaluate.evaluate)
app.command()(predict.predict)
app.command("import-checkpoint")(cache.import_checkpoint)
app.command()(cache.inspect)
app.command()(cache.verify)
app.command()(cache.repair)
app.command()(demo.demo)
app.command()(search.search)


def main() -> None:
    """Console entry point: an error the user can fix (``RegionSpotCacheError``, or an ``OSError``
    naming a file: a read-only directory, a full disk) becomes one clear line and exit code 2;
    anything else is a bug and keeps its traceback."""
    log_to_console()
    try:
        app()
    except RegionSpotCacheError as err:
        _fail(_raised_message(err))
    except OSError as err:
        if err.filename is None:  # an OSError that names no file is not the user's to fix
            raise
        _fail(file_error_message(err))


def _raised_message(err: RegionSpotCacheError) -> str:
    """The error's own message, also when a DataLoader worker raised it: torch re-raises it in the
    main process wrapped in the worker's traceback text, which is not the user's to read."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    raised_as = f"{type(err).__module__}.{type(err).__qualname__}: "
    return text[text.rfind(raised_as) + len(raised_as) :].strip() if raised_as in text else text


def file_error_message(err: OSError) -> str:
    """A file the machine refused (read-only directory, full disk, a directory where a file was
    expected) as one line naming the file: the user's to fix, whichever command wrote it."""
    # A rename names the temporary file first and the file the user asked for second.
    name = err.filename2 if err.filename2 is not None else err.filename
    return f"{name}: {err.strerror or err.__class__.__name__}"


def _fail(message: str) -> None:
    say(("error:", "bold red"), f" {message}")
    sys.exit(2)
