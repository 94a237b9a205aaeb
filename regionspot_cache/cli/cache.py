"""Commands on a cache and on checkpoints: ``inspect``, ``verify``, ``repair``, ``import-checkpoint``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from regionspot_cache.cli.options import (
    DataRootOption,
    RecipeOption,
    RetriesOption,
    SchedulerOption,
    SetOption,
    WorkersOption,
    recipe_from,
)
from regionspot_cache.progress import console, plain, say


def import_checkpoint(
    checkpoint: Path = typer.Argument(
        ..., help="Checkpoint of the released RegionSpot code (torch file with a 'model' dict)."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Head checkpoint to write (.safetensors; a .json config goes beside it)."
    ),
) -> None:
    """Convert a released RegionSpot checkpoint into our head checkpoint (frozen SAM/CLIP keys are
    ignored; loaded with weights_only=True), to evaluate the published weights on a cache."""
    from regionspot_cache.head.released import import_released_checkpoint

    head = import_released_checkpoint(checkpoint, output)
    say(f"wrote {output}: width {head.config.clip_width}, text dim {head.config.text_dim}, "
                  f"{head.config.num_layers} decoder layers")


def inspect(
    cache: Path = typer.Argument(..., help="Cache directory to summarise."),
    failed: bool = typer.Option(
        False, "--failed", help="Also list the images that failed and the boxes that were rejected, with their reasons."
    ),
) -> None:
    """Summarise a cache: images, boxes, shards committed and missing, models, bytes on disk."""
    from rich.table import Table

    from regionspot_cache.cache import inspect_cache, recorded_failures

    table = Table(title=plain(cache), show_header=False)
    for key, value in inspect_cache(cache).items():
        table.add_row(key, plain(value))
    console.print(table)
    if failed:
        recorded = recorded_failures(cache)
        for title, rows in ((f"{len(recorded.images)} failed images", recorded.images),
                            (f"{len(recorded.boxes)} rejected boxes", recorded.boxes)):
            listing = Table(title=plain(title))
            for column in (rows[0] if rows else {}):
                listing.add_column(column)
            for row in rows:
                listing.add_row(*(plain(value) for value in row.values()))
            console.print(listing)


def verify(cache: Path = typer.Argument(..., help="Cache directory to check.")) -> None:
    """Check every committed shard against the SHA-256 checksums recorded when it was committed,
    also in the proposals caches inside CACHE.

    Exits with status 1 and names each damaged shard and file if any differ.
    """
    from regionspot_cache.cache import verify_cache_tree

    results = verify_cache_tree(cache)
    for directory, problems in results.items():
        where = "" if directory == cache else f"{directory.relative_to(cache)} "
        for problem in problems:
            say((f"{where}shard {problem.shard}", "red"), f": {problem.problem}")
    if any(results.values()):
        raise typer.Exit(1)
    from regionspot_cache.cache import proposals_caches, view_caches

    nested = {"proposals": len(proposals_caches(cache)), "view": len(view_caches(cache))}
    checked = "".join(f" and {count} {kind} cache(s)" for kind, count in nested.items() if count)
    say(f"{cache}{checked}: every committed shard matches its checksums")


def repair(
    cache: Path = typer.Argument(..., help="Cache directory whose damaged shards to extract again."),
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Dataset manifest TOML the cache was extracted from."),
    data_root: Path = DataRootOption,
    boxes: str = typer.Option("gt", help="The boxes the cache was extracted with (as for `rs-cache extract --boxes`)."),
    recipe: Optional[Path] = RecipeOption,
    overrides: List[str] = SetOption,
    sam_checkpoint: Optional[str] = typer.Option(
        None, help="SAM checkpoint, if it moved since extraction (default: the path in cache.json)."
    ),
    clip_pretrained: Optional[str] = typer.Option(
        None, help="CLIP weights file or tag, if moved (default: the one in cache.json)."
    ),
    scheduler: Optional[str] = SchedulerOption,
    workers: Optional[int] = WorkersOption,
    retries: int = RetriesOption,
) -> None:
    """Check every shard against its checksums, then remove and re-extract only the damaged ones.

    The models default to those recorded in the cache; its identity check refuses others. The
    damaged shards are extracted in this process, or as dask tasks with --scheduler or --workers.
    """
    from regionspot_cache.cache import Provenance
    from regionspot_cache.data.datasets import load_manifest
    from regionspot_cache.data.proposals import with_box_source
    from regionspot_cache.demo.report import print_extract_summary
    from regionspot_cache.extract.distribute import Dask, InProcess
    from regionspot_cache.extract.repair import repair_cache
    from regionspot_cache.identity import models_recorded_in

    config = recipe_from(recipe, overrides)
    models = models_recorded_in(Provenance.read(cache)).with_overrides(
        sam_checkpoint=sam_checkpoint, clip_pretrained=clip_pretrained)
    spec = load_manifest(manifest, data_root)
    dataset, box_source = with_box_source(spec.load(), spec, boxes)
    distributor = Dask(scheduler, workers, retries) if scheduler or workers is not None else InProcess()
    from regionspot_cache.cache import proposals_caches, view_caches
    from regionspot_cache.extract.repair import damaged_shards

    targets = [cache, *view_caches(cache).values(), *proposals_caches(cache)]  # the cache, its views, its proposals
    for where in targets:
        data, source = dataset, box_source
        if where in proposals_caches(cache) and damaged_shards(where):  # its boxes: the manifest's set it was made of
            data, source = with_box_source(spec.load(), spec, _proposal_set_of(where, spec))
        summary = repair_cache(where, data, source, config.extract, models, distributor=distributor)
        if not summary.damaged:
            say(f"{where}: every committed shard matches its checksums; nothing to repair")
            continue
        for shard, problems in summary.damaged.items():
            prefix = "" if where == cache else f"{where.relative_to(cache)} "
            say((f"{prefix}shard {shard}", "yellow"), f" re-extracted: {'; '.join(problems)}")
        print_extract_summary(summary.extraction)


def _proposal_set_of(proposals_cache: Path, spec) -> str:
    """The manifest's proposal set a proposals cache was extracted from (matched by the file's
    SHA-256, which the cache recorded as its box source)."""
    from regionspot_cache.cache import Provenance
    from regionspot_cache.data.proposals import box_source_id
    from regionspot_cache.errors import UserError

    recorded = Provenance.read(proposals_cache).box_source
    for name, path in spec.proposals.items():
        if path.is_file() and box_source_id(path) == recorded:
            return name
    raise UserError(f"{proposals_cache}: damaged, but no proposal set of {spec.source} is the file it was extracted "
                    f"from ({recorded}); name that file under [proposals] in the manifest to repair it")
