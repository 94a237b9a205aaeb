"""View caches: the images of a cache seen through augmented views (flips, crops), extracted once.

Each view of ``extract.views`` gets a cache of its own under ``<cache>/views/<view id>/``, made
by the one runner (so resume, ``verify`` and ``repair`` work per view) with the base cache's
shards. Its ``cache.json`` records the view, its seed and the mode:

- ``released``: the CLIP maps of the view only; boxes, labels and SAM tokens stay the base
  cache's (what the released training sees: it augments the image, not the token file);
- ``consistent``: boxes flipped, cropped and clipped with the view (left-out ones recorded in
  ``rejected_boxes.parquet``), SAM tokens and CLIP maps computed on the view.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.format import VIEWS_DIR
from regionspot_cache.config import ExtractConfig, ModelsConfig
from regionspot_cache.data.datasets import DetectionDataset
from regionspot_cache.data.views import parse_views
from regionspot_cache.encoders import FrozenEncoders
from regionspot_cache.errors import CacheFormatError
from regionspot_cache.extract.distribute import Distributor
from regionspot_cache.extract.runner import CacheTarget, ExtractSummary, load_encoders, run_extraction
from regionspot_cache.identity import CacheKind, ViewIdentity, models_recorded_in

logger = logging.getLogger(__name__)


def view_cache_dir(cache_dir: Path | str, view_id: str) -> Path:
    return Path(cache_dir) / VIEWS_DIR / view_id


def extract_views(
    dataset: DetectionDataset,
    cache_dir: Path | str,
    config: ExtractConfig,
    box_source: str = "gt",
    models: ModelsConfig | None = None,
    encoders: FrozenEncoders | None = None,
    distributor: Distributor | None = None,
) -> dict[str, ExtractSummary]:
    """Extract every view of ``config.views`` (in ``config.views_mode``, seeded by
    ``config.views_seed``) of the complete cache ``cache_dir``; committed shards of a view are
    skipped, so re-running resumes. ``models`` default to those ``cache_dir`` recorded. Returns
    each view id's summary."""
    views = parse_views(config.views)
    if not views:
        return {}
    cache_dir = Path(cache_dir)
    base = CacheReader(cache_dir)
    _check_base(base, dataset, box_source)
    # Same shards as the base; --strict already held for the base, and a crop leaving a box out is not bad input.
    config = replace(config, shard_size=base.provenance.shard_size, strict=False)
    encoders = encoders or load_encoders(models or models_recorded_in(base.provenance), config, distributor)
    summaries = {}
    for view in views:
        kind = CacheKind.of_view(ViewIdentity(view.id, config.views_seed, config.views_mode))
        summary = run_extraction(
            dataset, CacheTarget(view_cache_dir(cache_dir, view.id), kind, box_source), encoders, config, distributor
        )
        logger.log(
            logging.WARNING if summary.failed_shards else logging.INFO,
            "view %s (%s): %d images, %d boxes, %d boxes outside the view, in %.1f s",
            view.id,
            config.views_mode,
            summary.images,
            summary.boxes,
            summary.dropped_boxes,
            summary.seconds,
        )
        summaries[view.id] = summary
    return summaries


def _check_base(base: CacheReader, dataset: DetectionDataset, box_source: str) -> None:
    provenance = base.provenance
    if not provenance.kind.is_plain:
        raise CacheFormatError(f"{base.location}: is itself a proposals or view cache; extract views of the cache it belongs to")
    if (provenance.dataset, provenance.box_source) != (dataset.name, box_source):
        raise CacheFormatError(
            f"{base.location}: holds {provenance.dataset!r} with boxes {provenance.box_source!r}, "
            f"not {dataset.name!r} with {box_source!r}"
        )
    committed = {int(p.name) for p in base.shard_dirs}
    missing = sorted(set(range(provenance.planned_shards)) - committed)
    if missing:
        raise CacheFormatError(f"{base.location}: shards {missing[:8]} are not extracted yet; finish the cache before its views")
