"""Evaluation that needs the original images: the training-free baselines and mask AP.

The models are those recorded in the cache's ``cache.json`` unless others are given; either way
they must be the models the cache was extracted with (its vocabulary's text embeddings and box
tokens come from them), which is checked against the provenance before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from regionspot_cache.cache import CacheFormatError, CacheReader, Provenance
from regionspot_cache.config import EvalConfig, ModelsConfig
from regionspot_cache.data.datasets import ImageEntry
from regionspot_cache.data.images import ImageSource
from regionspot_cache.encoders import FrozenEncoders, load_frozen_encoders, models_recorded_in
from regionspot_cache.evaluate.baselines import BASELINES, baseline_predictions
from regionspot_cache.evaluate.cached import score_cache
from regionspot_cache.evaluate.lvis import EvalResult, lvis_ap
from regionspot_cache.evaluate.masks import add_segmentations, without_boxes
from regionspot_cache.evaluate.scoring import cap_per_image, lvis_max_dets, protocol_settings, write_results_json
from regionspot_cache.head.model import RegionSpotHead
from regionspot_cache.runtime import differences, resolve_device

REGIONSPOT = "regionspot"
METHODS = (REGIONSPOT, *BASELINES)


@dataclass
class ImageEvalOptions:
    image_root: Path  # images: image_root / file_name, as at extraction
    method: str = REGIONSPOT
    head: RegionSpotHead | None = None  # needed by ``regionspot`` only
    masks: bool = False  # add SAM's mask of each detection's box and report mask AP as well
    models: ModelsConfig | None = None  # None: the models recorded in the cache


def recorded_models_with(provenance: Provenance, **overrides: str | None) -> ModelsConfig:
    """The models recorded in a cache, with the fields given in ``overrides`` (those of
    ``ModelsConfig.with_overrides``) replaced, e.g. the checkpoints' paths on this machine."""
    return models_recorded_in(provenance).with_overrides(**overrides)


def load_cache_encoders(reader: CacheReader, models: ModelsConfig | None, device: str) -> FrozenEncoders:
    """Load ``models`` (default: the cache's) and check they are the cache's models."""
    models = models or models_recorded_in(reader.provenance)
    try:
        encoders = load_frozen_encoders(models, resolve_device(device))
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err} (models recorded in {reader.root / 'cache.json'}; give their files with "
            "--sam-checkpoint / --clip-pretrained)"
        ) from None
    differences = model_differences(encoders, reader.provenance)
    if differences:
        raise CacheFormatError(
            f"{reader.root}: these are not the models the cache was extracted with: " + "; ".join(differences)
        )
    return encoders


def model_differences(encoders: FrozenEncoders, provenance: Provenance) -> list[str]:
    given = {"sam": encoders.sam_provenance(), "clip": encoders.clip_provenance()}
    recorded = {"sam": provenance.sam, "clip": provenance.clip}
    return differences(recorded, given, "{key}: cache has {old!r}, given {new!r}")


def cache_images(reader: CacheReader, image_root: Path | str) -> ImageSource:
    """The original images of the cache's entries, under ``image_root``."""
    rows = reader.images.select(["image_id", "file_name", "width", "height"]).to_pylist()
    entries = {row["image_id"]: ImageEntry(row["image_id"], row["file_name"], row["width"], row["height"]) for row in rows}
    return ImageSource(Path(image_root), entries)


def evaluate_with_images(
    cache_dir: Path | str,
    annotation_file: Path | str,
    config: EvalConfig,
    options: ImageEvalOptions,
    results_file: Path | str | None = None,
    vocabulary: str | None = None,
) -> EvalResult:
    """Detections of ``options.method`` on the cache's boxes under ``config``'s scoring protocol,
    with SAM masks if asked; LVIS box AP, and mask AP (``segm``) when masks are on."""
    if options.method not in METHODS:
        raise ValueError(f"unknown method {options.method!r}; known: {', '.join(METHODS)}")
    if options.method == REGIONSPOT and options.head is None:
        raise ValueError("method regionspot needs a head checkpoint (--head)")
    reader = CacheReader(cache_dir)
    vocab = reader.vocabulary(vocabulary or reader.provenance.dataset)
    encoders = load_cache_encoders(reader, options.models, config.device)
    images = cache_images(reader, options.image_root)
    if options.method == REGIONSPOT:
        detections = score_cache(reader, options.head, vocab, config)
    else:
        detections = baseline_predictions(reader, vocab, config, options.method, encoders, images)
    max_dets = lvis_max_dets(config)
    segm_metrics = None
    if options.masks:
        # Masks only for what LVIS will count: its per-image cap first.
        records = cap_per_image(detections, max_dets).records()
        add_segmentations(records, images, encoders.sam)
        if results_file is not None:
            results_file = _write_json(records, results_file)
        segm_metrics = lvis_ap(annotation_file, without_boxes(records), max_dets, iou_type="segm")
    elif results_file is not None:
        results_file = write_results_json(detections, results_file)
    metrics = lvis_ap(annotation_file, detections, max_dets)
    return EvalResult(metrics, len(detections), results_file, segm_metrics, protocol_settings(config), detections)


def _write_json(records: list[dict], path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path
