"""Commands on a cache and on checkpoints: ``inspect``, ``verify``, ``repair``, ``import-checkpoint``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from regionspot_cache.cli.options import (
    DataRootOption,
    RecipeOption,
    RetriesOption,
    SchedulerOption,
    SetOption,
    WorkersOption,
    flag,
    recipe_from,
)
from regionspot_cache.errors import UserError
from regionspot_cache.progress import plain, results, say


def import_checkpoint(
    checkpoint: Path = typer.Argument(..., help="Checkpoint of the released RegionSpot code (torch file with a 'model' dict)."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Head checkpoint to write (.safetensors; a .json config goes beside it)."
    ),
) -> None:
    """Convert a released RegionSpot checkpoint into our head checkpoint (frozen SAM/CLIP keys are
    ignored; loaded with weights_only=True), to evaluate the published weights on a cache."""
    from regionspot_cache.head.released import import_released_checkpoint

    head = import_released_checkpoint(checkpoint, output)
    say(
        f"wrote {output}: width {head.config.clip_width}, text dim {head.config.text_dim}, "
        f"{head.config.num_layers} decoder layers"
    )


def inspect(
    cache: Path = typer.Argument(..., help="Cache directory to summarise."),
    failed: bool = flag(
        "--failed", help="Also list the images that failed and the boxes that were rejected, with their reasons."
    ),
    as_json: bool = flag("--json", help="Print the summary as one JSON object (sizes in bytes) instead of tables."),
) -> None:
    """Summarise a cache: images, boxes, shards committed and missing, models, storage dtype and
    sizes on disk. Printed to stdout (tables, or JSON with --json); reads metadata only."""
    from dataclasses import asdict

    from rich.table import Table

    from regionspot_cache.cache import inspect_cache, recorded_failures

    summary = inspect_cache(cache)
    recorded = recorded_failures(cache) if failed else None
    if as_json:
        print(json.dumps({**summary, **({"failures": asdict(recorded)} if recorded else {})}, default=str))
        return
    table = Table(title=plain(cache), show_header=False)
    for key, value in summary.items():
        table.add_row(key, plain(_readable(key, value)))
    results.print(table)
    if recorded is not None:
        for title, rows in (
            (f"{len(recorded.images)} failed images", recorded.images),
            (f"{len(recorded.boxes)} rejected boxes", recorded.boxes),
        ):
            listing = Table(title=plain(title))
            for column in rows[0] if rows else {}:
                listing.add_column(column)
            for row in rows:
                listing.add_row(*(plain(value) for value in row.values()))
            results.print(listing)


def _readable(key: str, value: object) -> object:
    """Sizes (the ``bytes*`` entries) in decimal units, in nested view summaries too."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_readable(k, v)}" for k, v in value.items()) if value else "-"
    if key.startswith("bytes") and isinstance(value, (int, float)):
        return human_bytes(value)
    return value


def human_bytes(count: float) -> str:
    """``1.6 GB``, ``320 kB``, ``12 B`` (decimal units, as disk sizes are quoted)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" or abs(count) >= 100 else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def verify(
    cache: Path = typer.Argument(..., help="Cache directory to check."),
    as_json: bool = flag("--json", help="Print the result as one JSON object: cache, ok, and each damaged shard's problem."),
    images: bool = flag(
        "--images",
        help="Also read the dataset's images (--manifest) and name each one whose bytes changed since its shard "
        "was extracted (reads every image).",
    ),
    manifest: Optional[Path] = typer.Option(
        None, "--manifest", "-m", help="With --images: the dataset manifest TOML the cache was extracted from."
    ),
    data_root: Path = DataRootOption,
) -> None:
    """Check every committed shard against the SHA-256 checksums recorded when it was committed,
    also in the proposals caches inside CACHE. The result goes to stdout. With --images, also
    compare each image file of the dataset with the bytes its shard was extracted from.

    Exits with status 1 and names each damaged shard and file (and each changed image) if any differ.
    """
    from regionspot_cache.cache import proposals_caches, verify_cache_tree, view_caches

    if images and manifest is None:
        raise UserError("--images needs --manifest: the dataset whose image files to compare with the cache")
    if manifest is not None and not images:
        raise UserError("--manifest is only read with --images")
    found = verify_cache_tree(cache)
    shown = _shown(cache)
    problems = [(directory, problem) for directory, listed in found.items() for problem in listed]
    checks = _image_checks(cache, list(found), manifest, data_root) if images else []
    changed = [(check, problem) for check in checks for problem in check.problems]
    changed += [(check, shard) for check in checks for shard in check.unreadable_shards]
    if as_json:
        print(
            json.dumps(
                {
                    "cache": shown,
                    "ok": not problems and not changed,
                    "problems": [
                        {"cache": str(directory), "shard": problem.shard, "problem": problem.problem}
                        for directory, problem in problems
                    ],
                    **({"images": [_image_check_json(check) for check in checks]} if images else {}),
                }
            )
        )
    for directory, problem in [] if as_json else problems:
        where = "" if directory == cache else f"{directory.relative_to(cache)} "
        results.print(Text.assemble((f"{where}shard {problem.shard}", "red"), f": {problem.problem}"), soft_wrap=True)
    if not as_json and images:
        _print_image_checks(cache, checks, manifest)
    if problems or changed:
        raise typer.Exit(1)
    if not as_json:
        nested = {"proposals": len(proposals_caches(cache)), "view": len(view_caches(cache))}
        checked = "".join(f" and {count} {kind} cache(s)" for kind, count in nested.items() if count)
        results.print(Text(f"{shown}{checked}: every committed shard matches its checksums"), soft_wrap=True)


def _shown(cache: Path | str) -> str:
    """A cache as the user wrote it: a URL that went through ``Path`` gets its ``//`` back."""
    from regionspot_cache.cache.storage import CacheLocation

    return CacheLocation.parse(cache).url


def _image_checks(cache: Path, caches: list[Path], manifest: Path, data_root: Path) -> list:
    """``check_image_contents`` of each cache of the tree, every image file read once."""
    from regionspot_cache.cache.contents import ImageDigests, check_image_contents
    from regionspot_cache.data.datasets import load_manifest

    digests = ImageDigests(load_manifest(manifest, data_root).load())
    return [check_image_contents(directory, digests) for directory in caches]


def _image_check_json(check) -> dict:
    from dataclasses import asdict

    return {
        "cache": check.cache,
        "checked_images": check.checked_images,
        "changed": [asdict(problem) for problem in check.problems],
        "unrecorded_shards": check.unrecorded_shards,
        "unreadable_shards": check.unreadable_shards,
    }


def _print_image_checks(cache: Path, checks: list, manifest: Path) -> None:
    from regionspot_cache.cache.contents import describe

    for check in checks:
        where = "" if Path(check.cache) == cache else f"{Path(check.cache).relative_to(cache)} "
        for problem in check.problems:
            results.print(Text.assemble((f"{where}{describe(problem)}", "red")), soft_wrap=True)
        for shard in check.unreadable_shards:
            results.print(Text(f"{where}shard {shard:06d}: input.json unreadable: its images were not checked", "red"))
        if check.unrecorded_shards:
            results.print(
                Text(
                    f"{where or str(cache) + ' '}{len(check.unrecorded_shards)} shard(s) were extracted before image "
                    "digests were recorded: their images were not checked",
                    "yellow",
                ),
                soft_wrap=True,
            )
    stale = sum(problem.stale for check in checks for problem in check.problems)
    if stale:
        results.print(
            Text(
                f"{stale} image(s) changed since extraction: re-extract their shards with `rs-cache repair {cache} "
                f"--manifest {manifest} --images`"
            ),
            soft_wrap=True,
        )
    elif not any(check.problems or check.unreadable_shards for check in checks):
        checked = sum(check.checked_images for check in checks)
        results.print(Text(f"{cache}: {checked} image(s) checked: every file holds the bytes it was extracted from"))


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
    images: bool = flag(
        "--images",
        help="Also re-extract the shards one of whose image files changed since extraction (reads every image).",
    ),
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
        sam_checkpoint=sam_checkpoint, clip_pretrained=clip_pretrained
    )
    spec = load_manifest(manifest, data_root)
    dataset, box_source = with_box_source(spec.load(), spec, boxes)
    distributor = Dask(scheduler, workers, retries) if scheduler or workers is not None else InProcess()
    from regionspot_cache.cache import proposals_caches, view_caches
    from regionspot_cache.cache.contents import ImageDigests
    from regionspot_cache.extract.repair import damaged_shards, stale_shards

    targets = [cache, *view_caches(cache).values(), *proposals_caches(cache)]  # the cache, its views, its proposals
    digests = ImageDigests(dataset) if images else None  # each image file read once for all of them
    for where in targets:
        data, source = dataset, box_source
        to_redo = damaged_shards(where) or (digests is not None and stale_shards(where, digests))
        if where in proposals_caches(cache) and to_redo:  # its boxes: the manifest's set it was made of
            data, source = with_box_source(spec.load(), spec, _proposal_set_of(where, spec))
        summary = repair_cache(where, data, source, config.extract, models, distributor=distributor, image_digests=digests)
        if not summary.damaged:
            unchanged = " and holds the images it was extracted from" if images else ""
            say(f"{_shown(where)}: every committed shard matches its checksums{unchanged}; nothing to repair")
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
    raise UserError(
        f"{proposals_cache}: damaged, but no proposal set of {spec.source} is the file it was extracted "
        f"from ({recorded}); name that file under [proposals] in the manifest to repair it"
    )
