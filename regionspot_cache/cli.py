"""``rs-cache``: extract features once, train the head from the cache, evaluate on LVIS."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .config import ConfigError, DemoConfig, Recipe, apply_overrides, load_recipe
from .progress import console

app = typer.Typer(
    help="RegionSpot with cached frozen SAM + CLIP features: `extract` runs the encoders once per "
    "image into a zarr/parquet cache, `train` fits the head from the cache alone, `eval` scores "
    "boxes and computes LVIS AP. `demo` does all three on generated data with tiny models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RecipeOption = typer.Option(
    None, "--recipe", "-r", help="Recipe TOML (see pipelines/) with tables models.sam, models.clip, extract, train and eval."
)
SetOption = typer.Option(
    [], "--set", "-s", help="Override a recipe field, e.g. --set train.lr=1e-4 --set models.clip.model=ViT-B-16. Repeatable."
)
DataRootOption = typer.Option(Path("."), help="Directory that the manifest's relative paths start from.")
SamCheckpointOption = typer.Option(None, help="SAM checkpoint file (e.g. sam_vit_b_01ec64.pth); sets models.sam.checkpoint.")
SamVariantOption = typer.Option(None, help="SAM architecture: vit_b, vit_l, vit_h (or tiny); sets models.sam.variant.")
ClipModelOption = typer.Option(None, help="open_clip model name, e.g. ViT-L-14, ViT-B-16, ViT-L-14-336; sets models.clip.model.")
ClipPretrainedOption = typer.Option(
    None, help="open_clip pretrained tag (e.g. openai) or a local weights file; sets models.clip.pretrained."
)


class UserError(Exception):
    """Shown to the user as one line, without a traceback."""


def _recipe(path: Optional[Path], overrides: List[str], **models: Optional[str]) -> Recipe:
    recipe = load_recipe(path) if path else Recipe()
    recipe = apply_overrides(recipe, list(overrides))
    for key, value in models.items():
        if value is not None:
            section, field = key.split("_", 1)
            setattr(getattr(recipe.models, section), field, value)
    return recipe


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

    config = _recipe(recipe, overrides, sam_variant=sam_variant, sam_checkpoint=sam_checkpoint,
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

    config = _recipe(recipe, overrides)
    if cache:
        config.train.caches = [str(path) for path in cache]
    if vocabulary:
        config.train.vocabularies = list(vocabulary)
    if init_from is not None:
        config.train.init_from = str(init_from)
    summary = train_head(None, output, config.train, resume)
    console.print(f"wrote {summary.checkpoint} after {summary.steps} steps "
                  f"({summary.samples_per_second:.1f} images/s); final loss {summary.final_loss:.4f}")


@app.command("eval")
def evaluate(
    cache: Path = typer.Option(..., "--cache", "-c", help="Feature cache of the evaluation images."),
    head: Path = typer.Option(..., "--head", help="Head checkpoint (.safetensors) written by `rs-cache train`."),
    annotations: Optional[Path] = typer.Option(
        None, "--annotations", "-a", help="LVIS-format ground-truth JSON (default: the manifest's annotations)."
    ),
    manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="Dataset manifest naming annotations and proposal sets."),
    data_root: Path = DataRootOption,
    proposals: str = typer.Option(
        "gt", help="Boxes to score: `gt`, a proposal set named in the manifest (e.g. `glip`) or a proposal file. "
        "If CACHE holds other boxes, SAM tokens for these are extracted into CACHE/proposals/ (its CLIP "
        "feature maps are reused; needs --manifest)."
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write LVIS results JSON here and metrics beside it."),
    recipe: Optional[Path] = RecipeOption,
    overrides: List[str] = SetOption,
) -> None:
    """Score every cached box against the vocabulary and print LVIS AP, APr, APc, APf."""
    from .cache import CacheReader
    from .datasets import load_manifest
    from .evaluate import METRICS, evaluate_head
    from .head import load_head
    from .progress import metrics_table
    from .extract_proposals import cache_with_boxes
    from .proposals import GROUND_TRUTH, box_source_id, proposal_path, with_box_source

    spec = load_manifest(manifest, data_root) if manifest else None
    annotations = annotations or (spec.annotations if spec else None)
    if annotations is None:
        raise UserError("eval needs --annotations or --manifest")
    config = _recipe(recipe, overrides)
    wanted = GROUND_TRUTH if proposals == GROUND_TRUTH else box_source_id(proposal_path(spec, proposals))
    if wanted != CacheReader(cache).provenance.box_source:
        if spec is None:
            raise UserError(f"{cache}: holds other boxes than {proposals!r}; pass --manifest so that the missing "
                            "SAM tokens can be extracted (the cached CLIP feature maps are reused)")
        dataset, box_source = with_box_source(spec.load(), spec, proposals)
        cache = cache_with_boxes(cache, dataset, box_source, config.extract)
    model, _ = load_head(head)
    result = evaluate_head(cache, model, annotations, config.eval, output)
    console.print(metrics_table(f"LVIS box AP ({proposals} boxes)", {head.name: result.metrics}, METRICS))
    if output is not None:
        output.with_suffix(".metrics.json").write_text(json.dumps(result.metrics, indent=2))


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
    """Check every committed shard against the SHA-256 checksums recorded when it was committed.

    Exits with status 1 and names each damaged shard and file if any differ.
    """
    from .cache import verify_cache

    problems = verify_cache(cache)
    for problem in problems:
        console.print(f"[red]shard {problem.shard}[/]: {problem.problem}")
    if problems:
        raise typer.Exit(1)
    console.print(f"{cache}: every committed shard matches its checksums")


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
