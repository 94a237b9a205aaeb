"""Proposals caches: SAM tokens for another set of boxes, reusing a cache's CLIP feature maps.

The CLIP feature map of an image does not depend on the boxes, so evaluating new proposals (say
GLIP's) on a cache extracted for ground-truth boxes only needs SAM tokens for the new boxes. They
go to a cache of their own under ``<cache>/proposals/<box source>/`` that stores boxes and tokens
and reads the feature maps from the cache it sits in.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from pathlib import Path

from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.format import PROPOSALS_DIR
from regionspot_cache.config import ExtractConfig, ModelsConfig, Preprocessing, TextRecipe
from regionspot_cache.data.datasets import DetectionDataset
from regionspot_cache.encoders import FrozenEncoders
from regionspot_cache.errors import CacheFormatError
from regionspot_cache.extract.distribute import Distributor
from regionspot_cache.extract.runner import CacheTarget, load_encoders, run_extraction
from regionspot_cache.identity import CacheKind, models_recorded_in

logger = logging.getLogger(__name__)


def proposals_cache_dir(cache_dir: Path | str, box_source: str) -> Path:
    return Path(cache_dir) / PROPOSALS_DIR / re.sub(r"[^A-Za-z0-9._-]+", "-", box_source)


def cache_with_boxes(
    cache_dir: Path | str,
    dataset: DetectionDataset,
    box_source: str,
    config: ExtractConfig,
    models: ModelsConfig | None = None,
    encoders: FrozenEncoders | None = None,
    distributor: Distributor | None = None,
) -> Path:
    """The cache holding ``box_source`` boxes of ``dataset``: ``cache_dir`` itself if it was
    extracted with them, else its proposals cache, where the missing SAM tokens are computed now
    (on ``distributor``, default this process; resumable like any extraction). ``models`` default
    to those ``cache_dir`` recorded."""
    cache_dir = Path(cache_dir)
    base = CacheReader(cache_dir)
    if base.provenance.box_source == box_source:
        return cache_dir
    _check_maps_can_be_borrowed(base, dataset)
    target = proposals_cache_dir(cache_dir, box_source)
    # SAM must see images and boxes prepared as the base cache's were (its maps are reused as they are).
    # Same shards as the base, so a proposals shard's images are one base shard's.
    config = replace(
        config,
        preprocess=Preprocessing.recorded_in(base.provenance),
        text_recipe=_text_recipe_of(base, dataset.name, config.text_recipe),
        shard_size=base.provenance.shard_size,
    )
    encoders = encoders or load_encoders(models or models_recorded_in(base.provenance), config, distributor)
    encoders = encoders.with_preprocess(config.preprocess)  # for the comparison below (run_extraction's is then a no-op)
    if encoders.clip_provenance() != base.provenance.clip:
        raise CacheFormatError(
            f"{cache_dir}: its feature maps come from another CLIP than the models given; "
            "pass the models the cache was extracted with"
        )
    kind = CacheKind.proposals(os.path.relpath(cache_dir.resolve(), target.resolve()))
    summary = run_extraction(dataset, CacheTarget(target, kind, box_source), encoders, config, distributor)
    failed = f"; shards failed: {summary.failed_shards}" if summary.failed_shards else ""
    logger.log(
        logging.WARNING if failed else logging.INFO,
        "proposals cache %s: SAM tokens of %d images, %d boxes (%d images failed) in %.1f s%s",
        target,
        summary.images,
        summary.boxes,
        summary.failed,
        summary.seconds,
        failed,
    )
    return target


def _text_recipe_of(base: CacheReader, vocabulary: str, default: TextRecipe) -> TextRecipe:
    return base.vocabulary(vocabulary).text_recipe if vocabulary in base.vocabulary_names() else default


def _check_maps_can_be_borrowed(base: CacheReader, dataset: DetectionDataset) -> None:
    provenance = base.provenance
    if not provenance.kind.owns_feature_maps:
        raise CacheFormatError(f"{base.location}: borrows its feature maps itself; use the cache it borrows them from")
    if provenance.dataset != dataset.name:
        raise CacheFormatError(f"{base.location}: holds dataset {provenance.dataset!r}, not {dataset.name!r}")
    committed = {int(p.name) for p in base.shard_dirs}
    missing = sorted(set(range(provenance.planned_shards)) - committed)
    if missing:
        raise CacheFormatError(
            f"{base.location}: shards {missing[:8]} are not extracted yet; finish `rs-cache extract` "
            "first (its feature maps are reused for the proposals)"
        )
