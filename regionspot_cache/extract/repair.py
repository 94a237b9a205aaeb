"""``rs-cache repair``: re-extract only the shards that ``verify`` finds damaged."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from regionspot_cache.cache import Provenance, exclusive_extraction, verify_cache
from regionspot_cache.cache.format import SHARDS_DIR
from regionspot_cache.cache.storage import CacheLocation
from regionspot_cache.config import ExtractConfig, ModelsConfig, Preprocessing
from regionspot_cache.data.datasets import DetectionDataset
from regionspot_cache.encoders import FrozenEncoders
from regionspot_cache.extract.distribute import Distributor
from regionspot_cache.extract.runner import CacheTarget, ExtractSummary, load_encoders, run_extraction
from regionspot_cache.identity import models_recorded_in


@dataclass
class RepairSummary:
    damaged: dict[str, list[str]] = field(default_factory=dict)  # shard name -> problems found
    extraction: ExtractSummary | None = None


def damaged_shards(cache_dir: Path | str) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    for problem in verify_cache(cache_dir):
        problems.setdefault(problem.shard, []).append(problem.problem)
    return problems


def remove_shard(cache_dir: Path, shard: str) -> None:
    """Make the shard invisible with one rename (readers never see half of it), then delete it
    (on object storage: its commit record first)."""
    location = CacheLocation.parse(cache_dir)
    if location.remote:
        location.uncommit_shard(int(shard))
        return
    shards = cache_dir / SHARDS_DIR
    doomed = shards / f".removed-{shard}-{os.getpid()}-{time.time_ns()}"
    os.rename(shards / shard, doomed)
    shutil.rmtree(doomed)


def repair_cache(
    cache_dir: Path | str, dataset: DetectionDataset, box_source: str, config: ExtractConfig,
    models: ModelsConfig | None = None, encoders: FrozenEncoders | None = None, distributor: Distributor | None = None,
) -> RepairSummary:
    """Find damaged shards by their checksums, remove them and extract them again (on
    ``distributor``, default this process); shards that are intact, or were never extracted, are
    left as they are. ``models`` default to those the cache recorded; the cache's identity check
    refuses any others."""
    cache_dir = Path(cache_dir)
    provenance = Provenance.read(cache_dir)  # not CacheReader: the shards' manifests may be the damage
    with exclusive_extraction(cache_dir):  # no extraction may run while shards are replaced
        damaged = damaged_shards(cache_dir)
        for shard in damaged:
            remove_shard(cache_dir, shard)
    if not damaged:
        return RepairSummary()
    # The shards come back as the cache recorded them, whatever the recipe given says.
    config = replace(config, shard_size=provenance.shard_size, feature_dtype=provenance.feature_dtype,
                     preprocess=Preprocessing.recorded_in(provenance))
    # A view or proposals cache is re-extracted as the kind cache.json records, not as a plain cache.
    config = replace(config, strict=False) if provenance.kind.view is not None else config
    target = CacheTarget(cache_dir, provenance.kind, box_source)
    only = {int(name) for name in damaged}
    encoders = encoders or load_encoders(models or models_recorded_in(provenance), config, distributor)
    extraction = run_extraction(dataset, target, encoders, config, distributor, only_shards=only)
    return RepairSummary(damaged, extraction)
