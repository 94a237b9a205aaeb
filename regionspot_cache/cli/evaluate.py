"""``rs-cache eval``: options in, ``evaluate.api.evaluate`` on cached boxes or proposals, tables
and files out."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from regionspot_cache.cli.options import (
    AllowPartialOption,
    DataRootOption,
    RecipeOption,
    SetOption,
    flag,
    option_over_recipe,
    recipe_from,
)
from regionspot_cache.config import EvalConfig, Recipe
from regionspot_cache.errors import UserError
from regionspot_cache.progress import console, say
from regionspot_cache.runtime.files import check_writable


def evaluate(
    cache: Path = typer.Option(..., "--cache", "-c", help="Feature cache of the evaluation images."),
    head: Optional[Path] = typer.Option(
        None, "--head", help="Head checkpoint (.safetensors) written by `rs-cache train` (needed by --method regionspot)."
    ),
    annotations: Optional[Path] = typer.Option(
        None, "--annotations", "-a", help="Ground-truth JSON in LVIS or COCO format (default: the manifest's annotations)."
    ),
    manifest: Optional[Path] = typer.Option(
        None, "--manifest", "-m", help="Dataset manifest naming annotations and proposal sets."
    ),
    data_root: Path = DataRootOption,
    proposals: str = typer.Option(
        "gt",
        help="Boxes to score: `gt`, a proposal set named in the manifest (e.g. `glip`) or a proposal file. "
        "If CACHE holds other boxes, SAM tokens for these are extracted into CACHE/proposals/ (its CLIP "
        "feature maps are reused; needs --manifest).",
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write LVIS results JSON here and metrics beside it."),
    recipe: Optional[Path] = RecipeOption,
    overrides: List[str] = SetOption,
    method: str = typer.Option(
        "regionspot",
        help="Scorer: `regionspot` (the head), or a training-free baseline of the paper: `clip-box` "
        "(CLIP on each box crop) or `clip-mask` (CLIP on the crop with SAM's mask, background in CLIP's mean colour); or "
        "`detector`: the --proposals file's own classes and scores (from `rs-cache propose`), RegionSpot's baseline.",
    ),
    masks: bool = flag("--masks", help="Also report mask AP: SAM's mask for each detection's box prompt, as RLE in the results."),
    image_root: Optional[Path] = typer.Option(
        None, help="Directory of the images, for clip-*, --masks and --report (default: the manifest's image_root)."
    ),
    sam_variant: Optional[str] = typer.Option(None, help="SAM architecture for clip-mask and --masks (default: the cache's)."),
    sam_checkpoint: Optional[str] = typer.Option(None, help="SAM checkpoint for clip-mask and --masks (default: the cache's)."),
    clip_model: Optional[str] = typer.Option(None, help="open_clip model name for clip-* (default: the cache's)."),
    clip_pretrained: Optional[str] = typer.Option(
        None, help="CLIP pretrained tag or weights file for clip-* (default: the cache's)."
    ),
    scoring: Optional[str] = typer.Option(
        None,
        help="Class probabilities: `softmax` over the vocabulary (the released code) or `sigmoid` per class "
        "(the focal training loss); sets eval.scoring.",
    ),
    fixed_ap: bool = flag(
        "--fixed-ap",
        help="AP-fixed protocol (Dave et al. 2021): no per-image cap, the top "
        "eval.fixed_dets_per_class (10,000) detections per class over the dataset; sets eval.protocol=fixed.",
    ),
    device: Optional[str] = typer.Option(
        None,
        help="Torch device: auto (CUDA when present), cpu, cuda, cuda:1, ...; sets eval.device (and extract.device "
        "for the SAM tokens of --proposals).",
    ),
    allow_partial: bool = AllowPartialOption,
    report: Optional[Path] = typer.Option(
        None,
        help="Write a results page here: results.md with the metrics, settings, an AP-by-frequency chart "
        "and example images with predictions drawn (from --image-root or the manifest's images).",
    ),
) -> None:
    """Score every cached box against the vocabulary and print LVIS AP, APr, APc, APf.

    The SAM and CLIP of the clip-* baselines and of --masks are those recorded in CACHE (checked
    against it when given); their images are read again from --image-root or the manifest.
    """
    from regionspot_cache.cache import CacheReader
    from regionspot_cache.config import EvalMethod
    from regionspot_cache.data.datasets import load_manifest
    from regionspot_cache.evaluate.api import check_applicable, released_input_differences
    from regionspot_cache.evaluate.api import evaluate as evaluate_on_lvis
    from regionspot_cache.head.model import load_head
    from regionspot_cache.identity import models_recorded_in

    chosen = EvalMethod.find(method)
    if chosen is None:
        raise UserError(f"--method {method!r}: expected one of {', '.join(EvalMethod.words())}")
    if chosen.needs_head and head is None:
        raise UserError(f"eval --method {chosen} needs --head (the clip-box and clip-mask baselines do not)")
    if chosen.scores_proposal_classes and proposals == "gt":
        raise UserError(f"eval --method {chosen} scores a proposal file's own classes: pass --proposals NAME or FILE")
    for path, option, directory in ((output, "--output", False), (report, "--report", True)):
        if path is not None:
            check_writable(path, option, directory)
    spec = load_manifest(manifest, data_root) if manifest else None
    annotations = annotations or (spec.annotations if spec else None)
    if annotations is None:
        raise UserError("eval needs --annotations or --manifest")
    config = recipe_from(recipe, overrides)
    defaults = EvalConfig()
    config.eval.scoring = option_over_recipe(
        "--scoring", scoring, "eval.scoring", config.eval.scoring, defaults.scoring, overrides
    )
    config.eval.protocol = option_over_recipe(
        "--fixed-ap", fixed_ap, "eval.protocol", config.eval.protocol, defaults.protocol, overrides, meaning="fixed"
    )
    config.eval.allow_partial = allow_partial or config.eval.allow_partial
    if device is not None:
        config.eval.device = config.extract.device = device
        config.extract.validate()
    config.eval.validate()
    check_applicable(chosen, config.eval)  # settings the method would ignore
    proposals_file = _checked_proposals(cache, proposals, spec)
    if not chosen.scores_proposal_classes:  # the detector's own result needs no features: the cache gives the vocabulary
        cache = _cache_holding(cache, proposals, spec, config)
    image_root = image_root or (spec.image_root if spec else None)
    if (chosen.reads_images or masks) and image_root is None:
        raise UserError(f"eval --method {chosen}{' --masks' if masks else ''} reads the images: pass --image-root or --manifest")
    given_models = (sam_variant, sam_checkpoint, clip_model, clip_pretrained)
    # The models the cache recorded, with the files (or names) given here, e.g. paths on this machine.
    models = models_recorded_in(CacheReader(cache).provenance).with_overrides(*given_models) if any(given_models) else None
    model, metadata = load_head(head) if chosen.needs_head else (None, None)
    # Logs a warning for an imported head on a non-released cache.
    released_input_differences(metadata.imported_from if metadata else None, cache)
    result = evaluate_on_lvis(
        cache,
        annotations,
        config.eval,
        method=chosen,
        head=model,
        masks=masks,
        image_root=image_root,
        models=models,
        results_file=output,
        proposals_file=proposals_file,
    )
    name = head.name if chosen.needs_head else chosen.value
    _show_and_write(result, name, proposals, output)
    if report is not None:
        page = _write_report(report, cache, result, f"LVIS box AP of {name} ({proposals} boxes)", image_root, output)
        say(f"wrote {page}")


def _checked_proposals(cache: Path, proposals: str, spec) -> Optional[Path]:
    """The proposal file of ``proposals`` (None for ``gt``), refused if its recorded provenance
    (``rs-cache propose``) does not match the file or the cache's vocabulary."""
    from regionspot_cache.cache import CacheReader
    from regionspot_cache.data.datasets import Category
    from regionspot_cache.data.proposals import GROUND_TRUTH, check_provenance, proposal_path

    if proposals == GROUND_TRUTH:
        return None
    path = proposal_path(spec, proposals)
    reader = CacheReader(cache)
    vocabulary = reader.vocabulary(reader.provenance.dataset)
    check_provenance(path, [Category(int(i), n) for i, n in zip(vocabulary.category_ids, vocabulary.names)])
    return path


def _cache_holding(cache: Path, proposals: str, spec, config: Recipe) -> Path:
    """CACHE itself if it holds the boxes of ``proposals``; else its proposals sub-cache, with
    the missing SAM tokens extracted (the cached CLIP feature maps are reused)."""
    from regionspot_cache.cache import CacheReader
    from regionspot_cache.data.proposals import GROUND_TRUTH, box_source_id, proposal_path, with_box_source
    from regionspot_cache.extract.proposals import cache_with_boxes

    wanted = GROUND_TRUTH if proposals == GROUND_TRUTH else box_source_id(proposal_path(spec, proposals))
    if wanted == CacheReader(cache).provenance.box_source:
        return cache
    if spec is None:
        raise UserError(
            f"{cache}: holds other boxes than {proposals!r}; pass --manifest so that the missing "
            "SAM tokens can be extracted (the cached CLIP feature maps are reused)"
        )
    dataset, box_source = with_box_source(spec.load(), spec, proposals)
    return cache_with_boxes(cache, dataset, box_source, config.extract)


def _show_and_write(result, name: str, proposals: str, output: Optional[Path]) -> None:
    """Print the box (and mask) AP tables; with --output, write the metrics beside the results."""
    from regionspot_cache.evaluate.lvis import METRICS, write_metrics
    from regionspot_cache.progress import metrics_table
    from regionspot_cache.runtime.files import write_json

    title = f"LVIS box AP ({proposals} boxes; {result.settings['description']})"
    console.print(metrics_table(title, {name: result.metrics}, METRICS))
    if result.segm_metrics is not None:
        console.print(metrics_table(f"LVIS mask AP ({proposals} boxes, SAM masks)", {name: result.segm_metrics}, METRICS))
    if output is not None:
        write_metrics(output.with_suffix(".metrics.json"), result)
        if result.segm_metrics is not None:
            write_json(output.with_suffix(".segm.metrics.json"), result.segm_metrics, indent=2)


def _write_report(directory: Path, cache: Path, result, title: str, image_root: Optional[Path], output: Optional[Path]) -> Path:
    """eval --report: the results page, its chart and example images with predictions drawn."""
    from regionspot_cache.evaluate.report import ReportData, cache_labels, write_report

    names, file_names = cache_labels(cache)
    files = {"results": output, "metrics": output.with_suffix(".metrics.json")} if output is not None else {}
    data = ReportData(result.metrics, result.settings, title, result.detections, names, file_names, image_root, files)
    return write_report(directory, data)
