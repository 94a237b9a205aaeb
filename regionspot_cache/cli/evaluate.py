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
    method: List[str] = typer.Option(
        ["regionspot"],
        help="Scorer: `regionspot` (the head), or a training-free baseline of the paper: `clip-box` "
        "(CLIP on each box crop) or `clip-mask` (CLIP on the crop with SAM's mask, background in CLIP's mean colour); or "
        "`detector`: the --proposals file's own classes and scores (from `rs-cache propose`), RegionSpot's baseline. "
        "Repeat it (or give a comma list, e.g. detector,regionspot) to score the same boxes with each: one table, "
        "one metrics file and one page with a row per method; with -o OUT each method's results go to OUT's stem.METHOD.json.",
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
    from regionspot_cache.data.datasets import load_manifest
    from regionspot_cache.evaluate.api import check_applicable, released_input_differences
    from regionspot_cache.evaluate.api import evaluate as evaluate_on_lvis
    from regionspot_cache.head.model import load_head
    from regionspot_cache.identity import models_recorded_in

    chosen = _methods(method)
    with_head = [m for m in chosen if m.needs_head]
    if with_head and head is None:
        raise UserError(f"eval --method {with_head[0]} needs --head (the clip-box and clip-mask baselines do not)")
    scoring_classes = [m for m in chosen if m.scores_proposal_classes]
    if scoring_classes and proposals == "gt":
        raise UserError(f"eval --method {scoring_classes[0]} scores a proposal file's own classes: pass --proposals NAME or FILE")
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
    for one in chosen:
        check_applicable(one, config.eval)  # settings the method would ignore
    proposals_file = _checked_proposals(cache, proposals, spec)
    # The detector's own result needs no features (the cache gives the vocabulary); the others score
    # the cache holding these boxes.
    scored = cache if len(scoring_classes) == len(chosen) else _cache_holding(cache, proposals, spec, config)
    image_root = image_root or (spec.image_root if spec else None)
    reading = [m for m in chosen if m.reads_images or masks]
    if reading and image_root is None:
        masked = " --masks" if masks else ""
        raise UserError(f"eval --method {reading[0]}{masked} reads the images: pass --image-root or --manifest")
    given_models = (sam_variant, sam_checkpoint, clip_model, clip_pretrained)
    # The models the cache recorded, with the files (or names) given here, e.g. paths on this machine.
    models = models_recorded_in(CacheReader(scored).provenance).with_overrides(*given_models) if any(given_models) else None
    model, metadata = load_head(head) if with_head else (None, None)
    # Logs a warning for an imported head on a non-released cache.
    released_input_differences(metadata.imported_from if metadata else None, scored)
    results = {}
    for one in chosen:
        results[_row_name(one, head)] = evaluate_on_lvis(
            cache if one.scores_proposal_classes else scored,
            annotations,
            config.eval,
            method=one,
            head=model,
            masks=masks,
            image_root=image_root,
            models=models,
            results_file=_results_file(output, one, len(chosen)),
            proposals_file=proposals_file,
        )
    provenance = None
    if output is not None or report is not None:
        from regionspot_cache.evaluate.provenance import record_provenance

        first = next(iter(results.values()))
        methods = [m.value for m in chosen]
        provenance = record_provenance(
            scored, annotations, first.settings, methods, head if with_head else None, proposals, proposals_file
        )
    _show_and_write(results, proposals, output, provenance)
    if report is not None:
        title = f"LVIS box AP of {', '.join(results)} ({proposals} boxes)"
        page = _write_report(report, scored, results, title, image_root, output, provenance)
        say(f"wrote {page}")


def _methods(words: List[str]):
    """The methods named (repeated or comma lists), in order; an unknown or repeated one is refused."""
    from regionspot_cache.config import EvalMethod

    chosen = []
    for word in (part.strip() for given in words for part in given.split(",")):
        method = EvalMethod.find(word)
        if method is None:
            raise UserError(f"--method {word!r}: expected one of {', '.join(EvalMethod.words())}")
        if method in chosen:
            raise UserError(f"--method {method} is given twice")
        chosen.append(method)
    if not chosen:
        raise UserError(f"--method: expected one of {', '.join(EvalMethod.words())}")
    return chosen


def _row_name(method, head: Optional[Path]) -> str:
    """The method's row in tables and pages: the head's file name beside ``regionspot``."""
    return f"{method} ({head.name})" if method.needs_head and head is not None else method.value


def _results_file(output: Optional[Path], method, count: int) -> Optional[Path]:
    """OUT for one method; OUT's stem.METHOD.json for each of several."""
    if output is None or count == 1:
        return output
    return output.with_name(f"{output.stem}.{method.value}{output.suffix}")


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


def _show_and_write(results: dict, proposals: str, output: Optional[Path], provenance) -> None:
    """Print the box (and mask) AP tables, a row per method; with --output, write the metrics of
    all beside the results (and a single method's mask metrics in their own file, as before)."""
    from regionspot_cache.evaluate.lvis import METRICS, write_metrics
    from regionspot_cache.progress import metrics_table
    from regionspot_cache.runtime.files import write_json

    first = next(iter(results.values()))
    title = f"LVIS box AP ({proposals} boxes; {first.settings['description']})"
    console.print(metrics_table(title, {name: result.metrics for name, result in results.items()}, METRICS))
    masked = {name: result.segm_metrics for name, result in results.items() if result.segm_metrics is not None}
    if masked:
        console.print(metrics_table(f"LVIS mask AP ({proposals} boxes, SAM masks)", masked, METRICS))
    if output is not None:
        write_metrics(output.with_suffix(".metrics.json"), results, provenance)
        if len(results) == 1 and first.segm_metrics is not None:
            write_json(output.with_suffix(".segm.metrics.json"), first.segm_metrics, indent=2)


def _write_report(
    directory: Path, cache: Path, results: dict, title: str, image_root: Optional[Path], output: Optional[Path], provenance
) -> Path:
    """eval --report: the results page (a row per method), its chart, AP per category and example
    images with the first method's predictions drawn beside the ground truth."""
    from regionspot_cache.evaluate.report import ReportData, cache_labels, write_report

    names, file_names = cache_labels(cache)
    first = next(iter(results.values()))
    files = {}
    if output is not None:
        many = len(results) > 1
        files = {f"results ({name})" if many else "results": result.results_file for name, result in results.items()}
        files["metrics"] = output.with_suffix(".metrics.json")
    data = ReportData(
        {name: result.metrics for name, result in results.items()},
        first.settings,
        title,
        first.detections,
        names,
        file_names,
        image_root,
        files,
        {name: result.per_category for name, result in results.items()},
        first.ground_truth,
        provenance,
    )
    return write_report(directory, data)
