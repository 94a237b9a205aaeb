"""``rs-cache``: extract features once, train the head from the cache, evaluate on LVIS."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import cli_eval
from .cli_common import (ClipModelOption, ClipPretrainedOption, DataRootOption, RecipeOption, SamCheckpointOption,
                         SamVariantOption, SetOption, UserError, recipe_from, app)
from .config import ConfigError, DemoConfig
from .progress import console

@app.command()
def extract(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Dataset manifest TOML (see manifests/)."),
    cache: Path = typer.Option(..., "--cache", "-c", help="Cache directory to create or resume."),
    data_root: Path = DataRootOption,
    boxes: str = typer.Option(
        "gt", help="Boxes to encode: `gt` (ground truth), a proposal set named in the manifest (e.g. `glip`), "
        "or a proposal file (GLIP result JSON or COCO results list)."
    ),
    recipe: Optional[Path] = RecipeOption,
    overrides: List[str] = SetOption,
    sam_variant: Optional[str] = SamVariantOption,
    sam_checkpoint: Optional[str] = SamCheckpointOption,
    clip_model: Optional[str] = ClipModelOption,
    clip_pretrained: Optional[str] = ClipPretrainedOption,
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad image or degenerate box instead of recording it."),
    scheduler: Optional[str] = typer.Option(
        None, help="Address of an existing dask scheduler (e.g. tcp://host:8786) to run the shards on."
    ),
    workers: Optional[int] = typer.Option(
        None, help="Workers of the local dask cluster (default: one per GPU, or one on a CPU-only machine)."
    ),
    retries: int = typer.Option(2, help="Times a failed shard is retried before it is reported."),
    in_process: bool = typer.Option(False, "--in-process", help="Run the shards in this process, without dask."),
) -> None:
    """Run frozen SAM and CLIP once per image and write tokens and feature maps to the cache.

    Shards are dask tasks (a local cluster by default). Shards already committed in CACHE are
    skipped, so re-running the same command resumes.
    """
    from .datasets import load_manifest
    from .distribute import run_distributed
    from .extract import print_summary, run_extraction
    from .proposals import with_box_source

    config = recipe_from(recipe, overrides, sam_variant=sam_variant, sam_checkpoint=sam_checkpoint,
                     clip_model=clip_model, clip_pretrained=clip_pretrained)
    config.extract.strict = strict or config.extract.strict
    spec = load_manifest(manifest, data_root)
    dataset, box_source = with_box_source(spec.load(), spec, boxes)
    if in_process:
        summary = run_extraction(dataset, cache, config.models, config.extract, box_source=box_source)
    else:
        summary = run_distributed(dataset, cache, config.models, config.extract, box_source, scheduler, workers, retries)
    print_summary(summary)
    if summary.failed_shards:
        raise typer.Exit(1)


@app.command()
def train(
    cache: List[Path] = typer.Option(
        [], "--cache", "-c", help="Feature cache made by `rs-cache extract`; repeat for multi-dataset training "
        "(replaces train.caches of the recipe; weights: train.dataset_weights)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Head checkpoint to write (.safetensors; a .json config goes beside it)."),
    vocabulary: List[str] = typer.Option(
        [], help="Vocabulary stored in each cache, in --cache order (default: each cache's dataset)."
    ),
    init_from: Optional[Path] = typer.Option(None, help="Head checkpoint to start from (stage 2 from stage 1); sets train.init_from."),
    recipe: Optional[Path] = RecipeOption,
    overrides: List[str] = SetOption,
    resume: bool = typer.Option(True, help="Continue from the newest training state saved beside OUTPUT (exact resume)."),
) -> None:
    """Train the RegionSpot head from cached features only (no encoder in the loop).

    Each batch comes from one of the caches, drawn with train.dataset_weights. The full training
    state is saved every train.checkpoint_every steps under OUTPUT's `<stem>.run/state`; per-step
    metrics go to `<stem>.run/metrics.csv` and `<stem>.run/tensorboard`. Multi-GPU:
    `torchrun --nproc-per-node N -m regionspot_cache train ...` (train.batch_size stays the global batch).
    """
    from .train import train_head

    config = recipe_from(recipe, overrides)
    if cache:
        config.train.caches = [str(path) for path in cache]
    if vocabulary:
        config.train.vocabularies = list(vocabulary)
    if init_from is not None:
        config.train.init_from = str(init_from)
    summary = train_head(None, output, config.train, resume)
    console.print(f"wrote {summary.checkpoint} after {summary.steps} steps "
                  f"({summary.samples_per_second:.1f} images/s); final loss {summary.final_loss:.4f}")


app.command("eval")(cli_eval.evaluate)
app.command()(cli_eval.predict)


@app.command("import-checkpoint")
def import_checkpoint(
    checkpoint: Path = typer.Argument(..., help="Checkpoint of the released RegionSpot code (torch file with a 'model' dict)."),
    output: Path = typer.Option(..., "--output", "-o", help="Head checkpoint to write (.safetensors; a .json config goes beside it)."),
) -> None:
    """Convert a released RegionSpot checkpoint into our head checkpoint (frozen SAM/CLIP keys are
    ignored; loaded with weights_only=True), to evaluate the published weights on a cache."""
    from .import_released import import_released_checkpoint

    head = import_released_checkpoint(checkpoint, output)
    console.print(f"wrote {output}: width {head.config.clip_width}, text dim {head.config.text_dim}, "
                  f"{head.config.num_layers} decoder layers")


@app.command()
def inspect(cache: Path = typer.Argument(..., help="Cache directory to summarise.")) -> None:
    """Summarise a cache: images, boxes, shards committed and missing, models, bytes on disk."""
    from rich.table import Table

    from .cache import inspect_cache

    table = Table(title=str(cache), show_header=False)
    for key, value in inspect_cache(cache).items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def verify(cache: Path = typer.Argument(..., help="Cache directory to check.")) -> None:
    """Check every committed shard against the SHA-256 checksums recorded when it was committed,
    also in the proposals caches inside CACHE.

    Exits with status 1 and names each damaged shard and file if any differ.
    """
    from .cache import verify_cache_tree

    results = verify_cache_tree(cache)
    for directory, problems in results.items():
        where = "" if directory == cache else f"{directory.relative_to(cache)} "
        for problem in problems:
            console.print(f"[red]{where}shard {problem.shard}[/]: {problem.problem}")
    if any(results.values()):
        raise typer.Exit(1)
    checked = f" and {len(results) - 1} proposals cache(s)" if len(results) > 1 else ""
    console.print(f"{cache}{checked}: every committed shard matches its checksums")


@app.command()
def repair(
    cache: Path = typer.Argument(..., help="Cache directory whose damaged shards to extract again."),
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Dataset manifest TOML the cache was extracted from."),
    data_root: Path = DataRootOption,
    boxes: str = typer.Option("gt", help="The boxes the cache was extracted with (as for `rs-cache extract --boxes`)."),
    recipe: Optional[Path] = RecipeOption,
    overrides: List[str] = SetOption,
    sam_checkpoint: Optional[str] = typer.Option(None, help="SAM checkpoint, if it moved since extraction (default: the path in cache.json)."),
    clip_pretrained: Optional[str] = typer.Option(None, help="CLIP weights file or tag, if moved (default: the one in cache.json)."),
) -> None:
    """Check every shard against its checksums, then remove and re-extract only the damaged ones.

    The models default to those recorded in the cache; its identity check refuses others.
    """
    from .cache import CacheReader
    from .datasets import load_manifest
    from .encoders import models_recorded_in
    from .extract import print_summary
    from .proposals import with_box_source
    from .repair import repair_cache

    config = recipe_from(recipe, overrides)
    models = models_recorded_in(CacheReader(cache).provenance)
    models.sam.checkpoint = sam_checkpoint or models.sam.checkpoint
    models.clip.pretrained = clip_pretrained or models.clip.pretrained
    spec = load_manifest(manifest, data_root)
    dataset, box_source = with_box_source(spec.load(), spec, boxes)
    summary = repair_cache(cache, dataset, box_source, config.extract, models)
    if not summary.damaged:
        console.print(f"{cache}: every committed shard matches its checksums; nothing to repair")
        return
    for shard, problems in summary.damaged.items():
        console.print(f"[yellow]shard {shard}[/] re-extracted: {'; '.join(problems)}")
    print_summary(summary.extraction)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("rs-cache-demo"), help="Directory for the generated data, models, caches and results."),
    train_images: int = typer.Option(DemoConfig.train_images, help="Generated training images."),
    val_images: int = typer.Option(DemoConfig.val_images, help="Generated validation images."),
    iterations: int = typer.Option(DemoConfig().train.iterations, help="Training iterations of the head."),
    seed: int = typer.Option(DemoConfig.seed, help="Seed for data, model weights and training."),
    sam_variant: Optional[str] = SamVariantOption,
    sam_checkpoint: Optional[str] = SamCheckpointOption,
    clip_model: Optional[str] = ClipModelOption,
    clip_pretrained: Optional[str] = ClipPretrainedOption,
) -> None:
    """Generate a small LVIS-format dataset and tiny random-weight SAM/CLIP checkpoints, then run
    extract -> train -> eval and print the AP of the untrained and the trained head.

    Pass --sam-checkpoint/--clip-model/--clip-pretrained to use real models instead of tiny ones.
    """
    from .config import ModelsConfig
    from .demo.run import run_demo
    from .demo.tiny_models import TINY_CLIP, TINY_SAM

    config = DemoConfig(train_images=train_images, val_images=val_images, seed=seed)
    config.train.seed = seed
    config.train.iterations = iterations
    if any(v is not None for v in (sam_variant, sam_checkpoint, clip_model, clip_pretrained)):
        models = ModelsConfig()
        models.sam.variant = sam_variant or ("vit_b" if sam_checkpoint else TINY_SAM)
        models.sam.checkpoint = sam_checkpoint
        models.clip.model = clip_model or ("ViT-L-14" if clip_pretrained else TINY_CLIP)
        models.clip.pretrained = clip_pretrained
        config.models = models
    run_demo(workdir, config)


def main() -> None:
    """Console entry point: expected failures become one clear line and exit code 2."""
    from .cache import CacheFormatError
    from .datasets import DatasetError
    from .images import ImageDecodeError
    from .runtime import UnsafeCheckpointError

    expected = (UserError, ConfigError, DatasetError, CacheFormatError, ImageDecodeError,
                UnsafeCheckpointError, FileNotFoundError, ValueError)
    try:
        app()
    except expected as err:
        console.print(f"[bold red]error:[/] {err}")
        sys.exit(2)
