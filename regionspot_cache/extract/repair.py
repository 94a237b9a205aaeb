"""``rs-cache repair``: re-extract only the shards that ``verify`` finds damaged."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from regionspot_cache.cache import Provenance, exclusive_extraction, verify_cache
from regionspot_cache.cache.contents import ImageDigests, check_image_contents
from regionspot_cache.cache.format import IMAGES_FILE, SHARDS_DIR, STATUS_OK
from regionspot_cache.cache.storage import CacheLocation, shard_name
from regionspot_cache.config import ExtractConfig, ModelsConfig, Preprocessing
from regionspot_cache.data.datasets import DetectionDataset
from regionspot_cache.encoders import FrozenEncoders
from regionspot_cache.errors import ExtractionError
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


def stale_shards(cache_dir: Path | str, digests: ImageDigests) -> dict[str, list[str]]:
    """The shards one of whose image files holds other bytes now than it was extracted from."""
    problems: dict[str, list[str]] = {}
    for problem in check_image_contents(cache_dir, digests).problems:
        if problem.stale:
            problems.setdefault(shard_name(problem.shard), []).append(
                f"image {problem.image_id} ({problem.file_name}): {problem.problem}"
            )
    return problems


def set_aside(cache_dir: Path, shard: str) -> Path:
    """Hide the shard with one rename (a hidden name is never read); returns where it now lies."""
    shards = cache_dir / SHARDS_DIR
    aside = shards / f".removed-{shard}-{os.getpid()}-{time.time_ns()}"
    os.rename(shards / shard, aside)
    return aside


def images_ok(shard_dir: Path) -> tuple[int, list[str]] | None:
    """(images extracted, reasons of those that failed) by the shard's manifest; None if unreadable."""
    try:
        rows = pq.read_table(shard_dir / IMAGES_FILE, columns=["status", "reason"]).to_pylist()
    except (OSError, pa.ArrowInvalid, KeyError):
        return None
    return sum(row["status"] == STATUS_OK for row in rows), [row["reason"] for row in rows if row["status"] != STATUS_OK]


def keep_the_more_complete(cache_dir: Path, shard: str, aside: Path) -> str | None:
    """A replacement is kept only if it holds at least as many extracted images as the damaged
    shard it replaces (whose manifest may be readable though a feature byte is not): a repair at a
    moment the images cannot be read would otherwise swap good records for failed ones. Else the
    damaged shard is put back and the reasons the replacement failed are returned."""
    before, now = images_ok(aside), images_ok(cache_dir / SHARDS_DIR / shard)
    if now is None:  # not re-extracted at all (its task failed): put the damaged one back, as found
        os.rename(aside, cache_dir / SHARDS_DIR / shard)
        return "not extracted again"
    if before is not None and now[0] < before[0]:
        shutil.rmtree(set_aside(cache_dir, shard))
        os.rename(aside, cache_dir / SHARDS_DIR / shard)
        return f"{now[0]} images extracted where the damaged shard had {before[0]}: {'; '.join(now[1][:3])}"
    shutil.rmtree(aside)
    return None


def repair_cache(
    cache_dir: Path | str,
    dataset: DetectionDataset,
    box_source: str,
    config: ExtractConfig,
    models: ModelsConfig | None = None,
    encoders: FrozenEncoders | None = None,
    distributor: Distributor | None = None,
    image_digests: ImageDigests | None = None,
) -> RepairSummary:
    """Find damaged shards by their checksums, remove them and extract them again (on
    ``distributor``, default this process); shards that are intact, or were never extracted, are
    left as they are. ``models`` default to those the cache recorded; the cache's identity check
    refuses any others. With ``image_digests`` (``repair --images``), shards whose image files
    changed since extraction are extracted again too."""
    cache_dir = Path(cache_dir)
    provenance = Provenance.read(cache_dir)  # not CacheReader: the shards' manifests may be the damage
    remote = CacheLocation.parse(cache_dir).remote
    with exclusive_extraction(cache_dir):  # no extraction may run while shards are replaced
        damaged = damaged_shards(cache_dir)
        for shard, problems in (stale_shards(cache_dir, image_digests) if image_digests else {}).items():
            damaged.setdefault(shard, []).extend(problems)
        # Local shards are kept aside until the replacement proves at least as complete; on object
        # storage (no rename) a damaged shard is uncommitted, its commit record first.
        aside = {} if remote else {shard: set_aside(cache_dir, shard) for shard in damaged}
        for shard in damaged if remote else ():
            CacheLocation.parse(cache_dir).uncommit_shard(int(shard))
    if not damaged:
        return RepairSummary()
    # The shards come back as the cache recorded them, whatever the recipe given says.
    config = replace(
        config,
        shard_size=provenance.shard_size,
        feature_dtype=provenance.feature_dtype,
        preprocess=Preprocessing.recorded_in(provenance),
    )
    # A view or proposals cache is re-extracted as the kind cache.json records, not as a plain cache.
    config = replace(config, strict=False) if provenance.kind.view is not None else config
    target = CacheTarget(cache_dir, provenance.kind, box_source)
    only = {int(name) for name in damaged}
    encoders = encoders or load_encoders(models or models_recorded_in(provenance), config, distributor)
    try:
        extraction = run_extraction(dataset, target, encoders, config, distributor, only_shards=only)
    finally:
        with exclusive_extraction(cache_dir):
            refused = {shard: why for shard in aside if (why := keep_the_more_complete(cache_dir, shard, aside[shard]))}
    if refused:
        raise ExtractionError(
            f"{cache_dir}: repair refused for shard(s) {', '.join(sorted(refused))}, kept as they were "
            f"(damaged): the replacement was less complete ({'; '.join(refused.values())}); make the "
            "images readable and run repair again"
        )
    return RepairSummary(damaged, extraction)
