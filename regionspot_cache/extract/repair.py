"""``rs-cache repair``: re-extract only the shards that ``verify`` finds damaged."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa

from regionspot_cache.cache import Provenance, exclusive_extraction, verify_cache
from regionspot_cache.cache.contents import ImageDigests, check_image_contents
from regionspot_cache.cache.format import IMAGES_FILE, SHARDS_DIR, STATUS_OK
from regionspot_cache.cache.storage import COMMIT_RECORD, CacheLocation, shard_name
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


def set_aside(location: CacheLocation, shard: str) -> str:
    """Hide the shard under a name never read (``shards/.removed-...``); returns that name. Locally
    one rename. On object storage (no rename) the shard is first copied there on the store, and
    uncommitted only once the copy is whole: a failure before that leaves it as it was."""
    aside = f"{SHARDS_DIR}/.removed-{shard}-{os.getpid()}-{time.time_ns()}"
    if location.local is not None:
        os.rename(location.local / SHARDS_DIR / shard, location.local / aside)
        return aside
    try:
        location.copy_dir(f"{SHARDS_DIR}/{shard}", aside)
    except BaseException:
        location.delete(aside)
        raise
    location.uncommit_shard(int(shard))
    return aside


def put_back(location: CacheLocation, shard: str, aside: str) -> None:
    """Make the shard set aside the committed one again, replacing whatever is there now."""
    if location.local is not None:
        if (location.local / SHARDS_DIR / shard).exists():
            shutil.rmtree(location.local / set_aside(location, shard))
        os.rename(location.local / aside, location.local / SHARDS_DIR / shard)
        return
    location.uncommit_shard(int(shard))
    location.copy_dir(aside, f"{SHARDS_DIR}/{shard}")  # its commit record last
    location.delete(aside)


def drop(location: CacheLocation, aside: str) -> None:
    if location.local is not None:
        shutil.rmtree(location.local / aside)
    else:
        location.delete(aside)


def images_ok(location: CacheLocation, relative: str) -> tuple[int, list[str]] | None:
    """(images extracted, reasons of those that failed) by the manifest of the shard at
    ``relative``; None if it is not committed or its manifest is unreadable."""
    if location.remote and not location.exists(f"{relative}/{COMMIT_RECORD}"):
        return None
    try:
        rows = location.read_table(f"{relative}/{IMAGES_FILE}").select(["status", "reason"]).to_pylist()
    except (OSError, pa.ArrowInvalid, KeyError):
        return None
    return sum(row["status"] == STATUS_OK for row in rows), [row["reason"] for row in rows if row["status"] != STATUS_OK]


def keep_the_more_complete(location: CacheLocation, shard: str, aside: str) -> str | None:
    """A replacement is kept only if it holds at least as many extracted images as the damaged
    shard it replaces (whose manifest may be readable though a feature byte is not): a repair at a
    moment the images cannot be read would otherwise swap good records for failed ones. Else the
    damaged shard is put back and the reasons the replacement failed are returned."""
    before, now = images_ok(location, aside), images_ok(location, f"{SHARDS_DIR}/{shard}")
    if now is None:  # not re-extracted at all (its task failed): put the damaged one back, as found
        put_back(location, shard, aside)
        return "not extracted again"
    if before is not None and now[0] < before[0]:
        put_back(location, shard, aside)
        return f"{now[0]} images extracted where the damaged shard had {before[0]}: {'; '.join(now[1][:3])}"
    drop(location, aside)
    return None


def _set_aside_all(location: CacheLocation, shards: list[str]) -> dict[str, str]:
    """Each damaged shard set aside; if one cannot be, those already set aside are put back."""
    aside: dict[str, str] = {}
    try:
        for shard in shards:
            aside[shard] = set_aside(location, shard)
    except BaseException:
        for shard, where in aside.items():
            put_back(location, shard, where)
        raise
    return aside


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
    location = CacheLocation.parse(cache_dir)
    with exclusive_extraction(cache_dir):  # no extraction may run while shards are replaced
        damaged = damaged_shards(cache_dir)
        for shard, problems in (stale_shards(cache_dir, image_digests) if image_digests else {}).items():
            damaged.setdefault(shard, []).extend(problems)
        # Kept aside until the replacement proves at least as complete (or the extraction fails).
        aside = _set_aside_all(location, sorted(damaged))
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
            refused = {shard: why for shard in aside if (why := keep_the_more_complete(location, shard, aside[shard]))}
    if refused:
        raise ExtractionError(
            f"{cache_dir}: repair refused for shard(s) {', '.join(sorted(refused))}, kept as they were "
            f"(damaged): the replacement was less complete ({'; '.join(refused.values())}); make the "
            "images readable and run repair again"
        )
    return RepairSummary(damaged, extraction)
