"""``rs-cache train``: the head from cached features alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from regionspot_cache.cli.options import (
    AllowPartialOption,
    RecipeOption,
    SetOption,
    flag,
    recipe_from,
)
from regionspot_cache.errors import UserError
from regionspot_cache.runtime.files import check_writable


def train(
    cache: List[Path] = typer.Option(
        [],
        "--cache",
        "-c",
        help="Feature cache made by `rs-cache extract`; repeat for multi-dataset training "
        "(replaces train.caches of the recipe; weights: train.dataset_weights).",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Head checkpoint to write (.safetensors; a .json config goes beside it)."
    ),
    vocabulary: List[str] = typer.Option(
        [], help="Vocabulary stored in each cache, in --cache order (default: each cache's dataset)."
    ),
    init_from: Optional[Path] = typer.Option(
        None, help="Head checkpoint to start from (stage 2 from stage 1); sets train.init_from."
    ),
    recipe: Optional[Path] = RecipeOption,
    overrides: List[str] = SetOption,
    allow_partial: bool = AllowPartialOption,
    resume: bool = flag(default=True, help="Continue from the newest training state saved beside OUTPUT (exact resume)."),
) -> None:
    """Train the RegionSpot head from cached features only (no encoder in the loop).

    Each batch comes from one of the caches, drawn with train.dataset_weights. The full training
    state is saved every train.checkpoint_every steps under OUTPUT's `<stem>.run/state`; per-step
    metrics go to `<stem>.run/metrics.csv` and `<stem>.run/tensorboard`. Multi-GPU:
    `torchrun --nproc-per-node N -m regionspot_cache train ...` (train.batch_size stays the global batch).
    """
    if init_from is not None and any(o.split("=", 1)[0].strip() == "train.init_from" for o in overrides):
        raise UserError("--init-from and --set train.init_from=... both given; give one of the two")
    check_writable(output, "--output")
    given = [f"train.init_from={json.dumps(str(init_from))}"] if init_from is not None else []
    config = recipe_from(recipe, [*given, *overrides])  # validated with init_from: 0 iterations need it
    if cache:
        config.train.caches = [str(path) for path in cache]
    if vocabulary:
        config.train.vocabularies = list(vocabulary)
    config.train.allow_partial = allow_partial or config.train.allow_partial
    _check_caches_exist(config.train.caches)
    from regionspot_cache.demo.report import print_train_summary  # torch: only once the arguments hold
    from regionspot_cache.train.loop import train_head

    summary = train_head(None, output, config.train, resume)
    print_train_summary(summary)


def _check_caches_exist(caches: List[str]) -> None:
    """A cache that is not one is refused before torch loads (seconds): its cache.json is read."""
    from regionspot_cache.cache.format import Provenance

    for cache in caches:
        Provenance.read(cache)
