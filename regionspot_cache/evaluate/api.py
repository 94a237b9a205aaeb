"""``evaluate``: one call from a cache and a scorer to LVIS AP, and the one place that chooses
how the detections are made: the head on the cached tokens and feature maps, or a training-free
baseline on the original images, with or without SAM masks for mask AP."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from regionspot_cache.cache import CacheReader
from regionspot_cache.config import EvalConfig, ModelsConfig
from regionspot_cache.encoders import preprocess_recorded_in
from regionspot_cache.evaluate.baselines import BASELINES, score_cache_with_baseline
from regionspot_cache.evaluate.cached import score_cache
from regionspot_cache.evaluate.detector import detector_detections
from regionspot_cache.evaluate.ground_truth import load_ground_truth
from regionspot_cache.evaluate.lvis import EvalResult, lvis_ap
from regionspot_cache.evaluate.masks import without_boxes
from regionspot_cache.evaluate.open_set import needs_background
from regionspot_cache.evaluate.scoring import protocol_for, write_results_json
from regionspot_cache.evaluate.with_images import cache_images, load_cache_encoders, records_with_masks, write_records_json
from regionspot_cache.head.model import RegionSpotHead

logger = logging.getLogger(__name__)

REGIONSPOT = "regionspot"
DETECTOR = "detector"  # the proposal file's own classes and scores (rs-cache propose)
METHODS = (REGIONSPOT, *BASELINES, DETECTOR)


def evaluate(
    cache_dir: Path | str,
    annotation_file: Path | str,
    config: EvalConfig,
    *,
    method: str = REGIONSPOT,
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
      method (str): ``regionspot`` (the head), ``clip-box`` or ``clip-mask`` (the paper's
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
      (EvalResult): ``metrics`` (AP, AP50, AP75, APs/m/l, APr/c/f as floats in [0, 1], -1 where
        LVIS has no ground truth), ``num_detections`` (D), ``results_file``, ``segm_metrics``
        (mask AP, or None), ``settings`` (the protocol's description) and ``detections``: the D
        scored detections as columns (image_ids (D,) int64, category_ids (D,) int64, boxes
        (D, 4) float32 x, y, w, h, scores (D,) float64).
    """
    config.validate()
    check_method(method, head, masks, image_root)
    if method == DETECTOR and proposals_file is None:
        raise ValueError("method detector needs the proposal file whose classes it scores")
    protocol = protocol_for(config)
    reader = CacheReader(cache_dir)
    vocab = reader.vocabulary(vocabulary or reader.provenance.dataset)
    ground_truth = load_ground_truth(annotation_file, vocab)  # checked before the scoring work
    encoders = images = None
    if method not in (REGIONSPOT, DETECTOR) or masks:
        encoders = load_cache_encoders(reader, models, config.device)
        images = cache_images(reader, image_root)
    if method == DETECTOR:
        detections = detector_detections(proposals_file, vocab)
    elif method == REGIONSPOT:
        detections = score_cache(reader, head, vocab, config, background_embeddings(reader, models, config))
    else:
        detections = score_cache_with_baseline(reader, vocab, config, method, encoders, images)
    segm_metrics = None
    if masks:
        records = records_with_masks(detections, protocol.lvis_max_dets, images, encoders.sam)
        if results_file is not None:
            results_file = write_records_json(records, results_file)
        segm_metrics = lvis_ap(copy.deepcopy(ground_truth), without_boxes(records), protocol.lvis_max_dets, iou_type="segm")
    elif results_file is not None:
        results_file = write_results_json(detections, results_file)
    metrics = lvis_ap(ground_truth, detections, protocol.lvis_max_dets)
    return EvalResult(metrics, len(detections), results_file, segm_metrics, protocol.settings(), detections)


def background_embeddings(reader: CacheReader, models: ModelsConfig | None, config: EvalConfig) -> torch.Tensor | None:
    """The cache's CLIP text embeddings of the background prompts, when the open-set rule needs them."""
    if not needs_background(config.open_set):
        return None
    clip = load_cache_encoders(reader, models, config.device).clip
    return clip.text_embeddings(config.open_set.background_prompts).float()


def check_method(method: str, head: RegionSpotHead | None, masks: bool, image_root: Path | str | None) -> None:
    """Refuse, before anything loads, a method that is unknown or lacks what it needs."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == REGIONSPOT and head is None:
        raise ValueError("method regionspot needs a head checkpoint")
    if (method not in (REGIONSPOT, DETECTOR) or masks) and image_root is None:
        raise ValueError(f"method {method}{' with masks' if masks else ''} reads the original images: give their image_root")


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


def released_input_differences(head_config: dict[str, Any], cache_dir: Path | str, vocabulary: str | None = None) -> list[str]:
    """For a head imported from a released checkpoint (its JSON config records ``imported_from``):
    what of the cache is not made as the released code makes it, each logged as a warning (the
    paper's numbers need ``released`` preprocessing and text recipe). Other heads: nothing."""
    if "imported_from" not in head_config:
        return []
    reader = CacheReader(cache_dir)
    name = vocabulary or reader.provenance.dataset
    made = {"extract.preprocess": preprocess_recorded_in(reader.provenance),
            "extract.text_recipe": reader.vocabulary(name).text_recipe}
    found = [f"{key} is {value!r}, not 'released'" for key, value in made.items() if value != "released"]
    for difference in found:
        logger.warning("%s: the head was imported from the released checkpoint %s, but the cache's %s; "
                       "features differ from those it was trained on", cache_dir, head_config["imported_from"], difference)
    return found
