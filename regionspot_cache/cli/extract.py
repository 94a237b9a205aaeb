"""``rs-cache extract``: the frozen encoders once per image, into a cache."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from regionspot_cache.cli.options import (
    ClipModelOption,
    ClipPretrainedOption,
    DataRootOption,
    RecipeOption,
    RetriesOption,
    SamCheckpointOption,
    SamVariantOption,
    SchedulerOption,
    SetOption,
    WorkersOption,
    flag,
    recipe_from,
)
from regionspot_cache.runtime.files import check_writable


def extract(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Dataset manifest TOML (see manifests/)."),
    cache: Path = typer.Option(..., "--cache", "-c", help="Cache directory to create or resume."),
    data_root: Path = DataRootOption,
    boxes: str = typer.Option(
        "gt",
        help="Boxes to encode: `gt` (ground truth), a proposal set named in the manifest (e.g. `glip`), "
        "or a proposal file (GLIP result JSON or COCO results list).",
    ),
    recipe: Optional[Path] = RecipeOption,
    overrides: List[str] = SetOption,
    sam_variant: Optional[str] = SamVariantOption,
    sam_checkpoint: Optional[str] = SamCheckpointOption,
    clip_model: Optional[str] = ClipModelOption,
    clip_pretrained: Optional[str] = ClipPretrainedOption,
    strict: bool = flag("--strict", help="Stop at the first bad image or degenerate box instead of recording it."),
    check_images: bool = flag(
        "--check-images",
        help="On resume, read the committed shards' images again and refuse if any file's bytes changed "
        "since extraction (sets extract.check_images).",
    ),
    scheduler: Optional[str] = SchedulerOption,
    workers: Optional[int] = WorkersOption,
    retries: int = RetriesOption,
    in_process: bool = flag("--in-process", help="Run the shards in this process, without dask."),
) -> None:
    """Run frozen SAM and CLIP once per image and write tokens and feature maps to the cache.

    Shards are dask tasks (a local cluster by default). Shards already committed in CACHE are
    skipped, so re-running the same command resumes. With extract.views in the recipe (or --set),
    each augmented view is then cached under CACHE/views/<view id>/.
    """
    from regionspot_cache.data.datasets import load_manifest

    config = recipe_from(
        recipe,
        overrides,
        sam_variant=sam_variant,
        sam_checkpoint=sam_checkpoint,
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
    )
    config.extract.strict = strict or config.extract.strict
    config.extract.check_images = check_images or config.extract.check_images
    check_writable(cache, "--cache", directory=True)
    spec = load_manifest(manifest, data_root)  # a wrong path is told before the models' libraries load (5-8 s)
    from regionspot_cache.data.proposals import with_box_source
    from regionspot_cache.demo.report import print_extract_summary
    from regionspot_cache.extract.distribute import Dask, InProcess
    from regionspot_cache.extract.runner import CacheTarget, load_encoders, run_extraction

    distributor = InProcess() if in_process else Dask(scheduler, workers, retries)  # counts checked before any work
    dataset, box_source = with_box_source(spec.load(), spec, boxes)
    encoders = load_encoders(config.models, config.extract, distributor)  # for the cache and its views
    summary = run_extraction(dataset, CacheTarget(cache, box_source=box_source), encoders, config.extract, distributor)
    print_extract_summary(summary)
    if summary.failed_shards:
        raise typer.Exit(1)
    if config.extract.views:  # each view a cache of its own under CACHE/views/, resumable the same way
        from regionspot_cache.extract.views import extract_views

        views = extract_views(dataset, cache, config.extract, box_source, encoders=encoders, distributor=distributor)
        for view_summary in views.values():
            print_extract_summary(view_summary)
        if any(view_summary.failed_shards for view_summary in views.values()):
            raise typer.Exit(1)
