"""``evaluate``: one call from a cache and a scorer to LVIS AP, and the one place that chooses
how the detections are made: the head on the cached tokens and feature maps, or a training-free
baseline on the original images, with or without SAM masks for mask AP."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

# The cache-only path: nothing here loads SAM or CLIP or reads an image. The baselines and masks
# import them inside ``evaluate`` (``with_images.py``, ``baselines.py``), when a method needs them.
from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.completeness import Completeness, check_complete
from regionspot_cache.config import EvalConfig, EvalMethod, ModelsConfig, Preprocessing, TextRecipe
from regionspot_cache.errors import InputError
from regionspot_cache.evaluate.cached import score_cache
from regionspot_cache.evaluate.detector import check_has_classes, detector_detections
from regionspot_cache.evaluate.ground_truth import GroundTruthBoxes, check_same_images, load_ground_truth
from regionspot_cache.evaluate.lvis import EvalResult, lvis_ap, lvis_scores
from regionspot_cache.evaluate.masks import without_boxes
from regionspot_cache.evaluate.scoring import protocol_for, write_results_json
from regionspot_cache.head.model import RegionSpotHead, check_head_fits_cache
from regionspot_cache.regions.open_set import warn_if_never_rejects

logger = logging.getLogger(__name__)


def evaluate(
    cache_dir: Path | str,
    annotation_file: Path | str,
    config: EvalConfig,
    *,
    method: EvalMethod | str = EvalMethod.REGIONSPOT,
    head: RegionSpotHead | None = None,
    masks: bool = False,
    image_root: Path | str | None = None,
    models: ModelsConfig | None = None,
    results_file: Path | str | None = None,
    vocabulary: str | None = None,
    proposals_file: Path | str | None = None,
) -> EvalResult:
    """Score the cache's boxes with ``method`` and evaluate them with the official LVIS code.

    ``regionspot`` without masks reads the cache alone. The baselines and ``masks`` also run the
    cache's SAM / CLIP on its original images; those models are checked against the cache first.

    Arguments:
      cache_dir (Path or str): a cache from ``rs-cache extract`` (or a proposals cache in one).
      annotation_file (Path or str): LVIS- or COCO-format ground truth of the cache's images, in
        the vocabulary's categories (else refused); COCO files get LVIS's fields filled in
        (``ground_truth.py``).
      config (EvalConfig): scoring (softmax / sigmoid), protocol (standard / fixed), device.
      method (EvalMethod or its word): ``regionspot`` (the head), ``clip-box`` or ``clip-mask`` (the paper's
        training-free baselines), or ``detector``: ``proposals_file``'s own classes and scores.
      head (RegionSpotHead or None): the head; needed by ``regionspot`` only.
      masks (bool): add SAM's mask for each counted detection's box and report mask AP too.
      image_root (Path, str or None): directory of the original images (image_root / file_name,
        as at extraction); needed by the baselines and by ``masks``.
      models (ModelsConfig or None): SAM and CLIP for the baselines and ``masks``; None: the
        models recorded in the cache.
      results_file (Path, str or None): where to write the LVIS results JSON (with RLE
        ``segmentation`` when ``masks``); None: nothing is written.
      vocabulary (str or None): vocabulary stored in the cache to score against; None: the
        cache's dataset.
      proposals_file (Path, str or None): for ``detector``, the proposal file whose classes are scored.

    Returns:
      (EvalResult): ``metrics`` (AP, AP50, AP75, APs/m/l, APr/c/f as floats in [0, 1], None where
        there is no ground truth to score), ``num_detections`` (D), ``results_file``, ``segm_metrics``
        (mask AP, or None), ``settings`` (the protocol's description), ``detections``: the D
        scored detections as columns (image_ids (D,) int64, category_ids (D,) int64, boxes
        (D, 4) float32 x, y, w, h, scores (D,) float64), ``per_category`` (each category's box AP,
        None without ground truth, and its number of annotations) and ``ground_truth`` (the
        annotated boxes, for drawing).
    """
    config.validate()
    method = check_method(method, head, masks, image_root, config)
    if method.scores_proposal_classes and proposals_file is None:
        raise InputError(f"method {method} needs the proposal file whose classes it scores")
    if method.scores_proposal_classes:
        check_has_classes(proposals_file)  # before the cache and the ground truth are read
    protocol = protocol_for(config)
    reader = CacheReader(cache_dir)
    check_scorable(reader)
    found = check_complete(reader, config.allow_partial)
    vocab = reader.vocabulary(vocabulary or reader.provenance.dataset)
    warn_if_never_rejects(config.open_set, len(vocab.names))
    ground_truth = load_ground_truth(annotation_file, vocab)  # checked before the scoring work
    cached = dict(zip(reader.images.column("image_id").to_pylist(), reader.images.column("file_name").to_pylist()))
    ground_truth = check_same_images(Path(annotation_file), ground_truth, cached, not found.complete)
    encoders = images = None
    if method.reads_images or masks:
        from regionspot_cache.evaluate import with_images  # SAM, CLIP and the images: only for these

        encoders = with_images.load_cache_encoders(reader, models, config.device)
        images = with_images.cache_images(reader, image_root)
    if method.scores_proposal_classes:
        # Its boxes did not come through the protocol's collector: the same cap across images here.
        detections = protocol.cap_finished(detector_detections(proposals_file, vocab))
    elif method.needs_head:
        clip = reader.provenance.clip
        check_head_fits_cache(head, str(reader.location), clip.width, clip.text_dim, reader.provenance.sam.token_dim)
        detections = score_cache(reader, head, vocab, config, background_embeddings(reader, models, config))
    else:
        from regionspot_cache.evaluate.baselines import score_cache_with_baseline

        detections = score_cache_with_baseline(reader, vocab, config, method, encoders, images)
    segm_metrics = None
    if masks:
        records = with_images.records_with_masks(detections, protocol.lvis_max_dets, images, encoders.sam)
        if results_file is not None:
            results_file = with_images.write_records_json(records, results_file)
        segm_metrics = lvis_ap(copy.deepcopy(ground_truth), without_boxes(records), protocol.lvis_max_dets, iou_type="segm")
    elif results_file is not None:
        results_file = write_results_json(detections, results_file)
    drawn = GroundTruthBoxes.of(ground_truth)  # before LVISEval changes the data
    scores = lvis_scores(ground_truth, detections, protocol.lvis_max_dets)
    settings = run_settings(protocol, config, found)
    return EvalResult(
        scores.metrics, len(detections), results_file, segm_metrics, settings, detections, scores.per_category, drawn
    )


def run_settings(protocol, config: EvalConfig, found: Completeness) -> dict:
    """What produced the metrics: the protocol, the open-set rule (rejected regions make no
    detections, so it changes AP) and, for a partial cache, the fraction of it that was scored."""
    settings = protocol.settings()
    rule = config.open_set.rule
    if rule.rejects:
        settings["open_set"] = {"rule": str(rule), "threshold": config.open_set.threshold}
        settings["description"] += f"; open-set {rule} < {config.open_set.threshold:g} rejected"
    if not found.complete:
        settings["partial_cache"] = found.to_dict()
        settings["description"] += f"; PARTIAL cache: {found.fraction:.0%} of its shards"
    return settings


def check_scorable(reader: CacheReader) -> None:
    """A view cache holds the boxes of flipped or cropped images: scored against the annotation
    file it would give a meaningless AP."""
    view = reader.provenance.kind.view
    if view is not None:
        raise InputError(
            f"{reader.location}: a view cache ({view.id}): its boxes are in the coordinates of transformed "
            "images, not the annotation file's; evaluate the cache it was made from"
        )


def background_embeddings(reader: CacheReader, models: ModelsConfig | None, config: EvalConfig) -> torch.Tensor | None:
    """The cache's CLIP text embeddings of the background prompts, when the open-set rule needs them."""
    if not config.open_set.rule.needs_background:
        return None
    from regionspot_cache.evaluate.with_images import load_cache_encoders  # CLIP for the prompts' text

    clip = load_cache_encoders(reader, models, config.device).clip
    return clip.text_embeddings(config.open_set.background_prompts).float()


def check_method(
    method: EvalMethod | str,
    head: RegionSpotHead | None,
    masks: bool,
    image_root: Path | str | None,
    config: EvalConfig | None = None,
) -> EvalMethod:
    """The method named, refused before anything loads if it is unknown, lacks what it needs or
    would ignore a setting it was given (open-set rejection works on the head's logits only)."""
    chosen = EvalMethod.find(method)
    if chosen is None:
        raise InputError(f"unknown method {method!r}; known: {', '.join(EvalMethod.words())}")
    if config is not None:
        check_applicable(chosen, config)
    if chosen.needs_head and head is None:
        raise InputError(f"method {chosen} needs a head checkpoint")
    if (chosen.reads_images or masks) and image_root is None:
        raise InputError(f"method {chosen}{' with masks' if masks else ''} reads the original images: give their image_root")
    return chosen


def check_applicable(method: EvalMethod, config: EvalConfig) -> None:
    """Settings ``method`` would ignore are refused, not dropped (open-set rejection works on the
    head's logits only)."""
    if config.open_set.rule.rejects and not method.needs_head:
        raise InputError(
            f"method {method} does not apply eval.open_set (rule {config.open_set.rule}): open-set "
            "rejection works on the head's logits; use --method regionspot or eval.open_set.rule=off"
        )


def evaluate_head(
    cache_dir: Path | str,
    head: RegionSpotHead,
    annotation_file: Path | str,
    config: EvalConfig,
    results_file: Path | str | None = None,
    vocabulary: str | None = None,
) -> EvalResult:
    """The head on the cache alone: ``evaluate`` with method ``regionspot`` and no masks."""
    return evaluate(cache_dir, annotation_file, config, head=head, results_file=results_file, vocabulary=vocabulary)


def released_input_differences(imported_from: str | None, cache_dir: Path | str, vocabulary: str | None = None) -> list[str]:
    """For a head imported from the released checkpoint ``imported_from`` (``HeadMetadata.imported_from``):
    what of the cache is not made as the released code makes it, each logged as a warning (the
    paper's numbers need ``released`` preprocessing and text recipe). Other heads (None): nothing."""
    if imported_from is None:
        return []

    reader = CacheReader(cache_dir)
    name = vocabulary or reader.provenance.dataset
    made = {
        "extract.preprocess": (Preprocessing.recorded_in(reader.provenance), Preprocessing.RELEASED),
        "extract.text_recipe": (reader.vocabulary(name).text_recipe, TextRecipe.RELEASED),
    }
    found = [f"{key} is {value!r}, not {released!r}" for key, (value, released) in made.items() if value is not released]
    for difference in found:
        logger.warning(
            "%s: the head was imported from the released checkpoint %s, but the cache's %s; "
            "features differ from those it was trained on",
            cache_dir,
            imported_from,
            difference,
        )
    return found
