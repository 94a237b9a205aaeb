"""Checks and summaries of a cache: ``rs-cache verify`` (checksums recorded at commit) and ``inspect``."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from regionspot_cache.cache.format import (
    CHECKSUMS_FILE,
    PROPOSALS_DIR,
    STATUS_OK,
    VIEWS_DIR,
    Provenance,
    read_extraction_cost,
    shard_checksums,
)
from regionspot_cache.cache.reader import CacheReader, committed_shard_dirs
from regionspot_cache.cache.storage import SHARDS_DIR, CacheLocation
from regionspot_cache.choices import FeatureDtype


@dataclass
class ShardProblem:
    shard: str
    problem: str


def verify_cache(root: Path | str) -> list[ShardProblem]:
    """Check every committed shard's files against the checksums recorded when it was committed
    (on object storage each shard is downloaded to a temporary directory to be checked)."""
    location = CacheLocation.parse(root)
    if location.remote:
        return _verify_remote(location)
    root = Path(root)
    Provenance.read(root)
    problems = []
    for shard_dir in committed_shard_dirs(root):
        problems.extend(ShardProblem(shard_dir.name, p) for p in _shard_problems(shard_dir))
    return problems


def _verify_remote(location: CacheLocation) -> list[ShardProblem]:
    Provenance.read(location)
    problems = []
    listed = location.shard_objects()  # one listing: each shard then costs its GETs alone
    for shard in location.committed_shards(SHARDS_DIR):
        with tempfile.TemporaryDirectory(prefix="rs-cache-verify-") as tmp:
            shard_dir = location.fetch_shard(shard, Path(tmp), listed.get(shard))
            problems.extend(ShardProblem(shard_dir.name, p) for p in _shard_problems(shard_dir))
    return problems


def proposals_caches(root: Path | str) -> list[Path]:
    """The proposals caches kept inside ``root`` (they borrow its feature maps)."""
    return list(_nested(root, PROPOSALS_DIR).values())


def view_caches(root: Path | str) -> dict[str, Path]:
    """The view caches kept inside ``root`` (augmented views of its images), by view id."""
    return _nested(root, VIEWS_DIR)


def _nested(root: Path | str, directory: str) -> dict[str, Path]:
    """The caches under ``root/directory`` by name; on object storage as ``Path(url)``, as
    ``CacheReader.root`` names a remote cache (``CacheLocation.parse`` reads it back)."""
    location = CacheLocation.parse(root)
    names = location.subdirectories(directory)
    if location.local is not None:
        return {name: location.local / directory / name for name in names}
    return {name: Path(location.child(f"{directory}/{name}").url) for name in names}


def verify_cache_tree(root: Path | str) -> dict[Path, list[ShardProblem]]:
    """``verify_cache`` of ``root`` and of each proposals and view cache inside it, by cache directory."""
    caches = [Path(root), *proposals_caches(root), *view_caches(root).values()]
    return {cache: verify_cache(cache) for cache in caches}


def _shard_problems(shard_dir: Path) -> list[str]:
    try:
        recorded = json.loads((shard_dir / CHECKSUMS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"{CHECKSUMS_FILE} unreadable: {err}"]
    actual = shard_checksums(shard_dir)
    problems = [f"{name}: missing" for name in sorted(set(recorded) - set(actual))]
    problems += [f"{name}: not recorded at commit" for name in sorted(set(actual) - set(recorded))]
    problems += [
        f"{name}: checksum differs (damaged)" for name in sorted(set(recorded) & set(actual)) if recorded[name] != actual[name]
    ]
    return problems


def inspect_cache(root: Path | str) -> dict[str, Any]:
    """Summary of a cache: images, boxes, shards committed and missing, models, bytes on disk."""
    reader = CacheReader(root)
    provenance = reader.provenance
    sam, clip = provenance.sam, provenance.clip
    committed = {int(p.name) for p in reader.shard_dirs}
    status = reader.images.column("status").to_pylist()
    location = CacheLocation.parse(root)
    on_disk = _bytes_stored(location)
    return {
        "dataset": provenance.dataset,
        "box_source": provenance.box_source,
        "images": len(status),
        "images_failed": sum(s != STATUS_OK for s in status),
        "boxes": len(reader.boxes),
        "boxes_rejected": len(reader.rejected_boxes),
        "shards_committed": len(committed),
        "shards_missing": sorted(set(range(provenance.planned_shards)) - committed),
        "sam": f"{sam.variant} (sha256 {str(sam.checkpoint_sha256)[:12]})",
        "clip": f"{clip.model} ({clip.pretrained or 'file sha256 ' + str(clip.weights_sha256)[:12]})",
        "vocabularies": reader.vocabulary_names(),
        "bytes_on_disk": on_disk,
        "feature_dtype": str(provenance.feature_dtype),
        # The stored payload: one feature map per image, one token per box (int8: a byte per value
        # and one float32 scale per row; float16: two bytes per value).
        "bytes_per_image_map": clip.num_tokens * stored_row_bytes(clip.width, provenance.feature_dtype),
        "bytes_per_box_token": stored_row_bytes(sam.token_dim, provenance.feature_dtype),
        "bytes_on_disk_per_image": round(on_disk / max(len(status), 1)),
        **_cost(location),
        "views": {view_id: _view_summary(path) for view_id, path in view_caches(root).items()},
    }


def stored_row_bytes(width: int, feature_dtype: FeatureDtype | str) -> int:
    """Bytes of one stored row of ``width`` features: float16, or int8 and its float32 scale."""
    return FeatureDtype.parse(feature_dtype, "feature_dtype").row_bytes(width)


def _bytes_stored(location: CacheLocation) -> int:
    """Bytes of the cache's own files or objects (its proposals and view caches counted apart)."""
    return _bytes_on_disk(location.local) if location.local is not None else location.bytes_stored((PROPOSALS_DIR, VIEWS_DIR))


def _bytes_on_disk(root: Path) -> int:
    """Bytes of the cache's own files (its proposals and view caches are counted apart)."""
    nested = {root / PROPOSALS_DIR, root / VIEWS_DIR}
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not nested & set(p.parents))


def _cost(root: Path | CacheLocation) -> dict[str, Any]:
    cost = read_extraction_cost(root)
    per_image = cost["seconds"] / cost["images"] if cost["images"] else None
    return {
        "extraction_seconds": cost["seconds"],
        "extracted_images": cost["images"],
        "extraction_seconds_per_image": None if per_image is None else round(per_image, 4),
    }


def _view_summary(root: Path) -> dict[str, Any]:
    """Mode, seed, images, bytes and extraction cost of one view cache."""
    reader = CacheReader(root)
    view = reader.provenance.kind.view
    on_disk = _bytes_stored(reader.location)
    return {
        "mode": view.mode if view else "?",
        "seed": view.seed if view else None,
        "images": len(reader.images),
        "boxes": len(reader.boxes),
        "boxes_rejected": len(reader.rejected_boxes),
        "shards_missing": sorted(set(range(reader.provenance.planned_shards)) - {int(p.name) for p in reader.shard_dirs}),
        "bytes_on_disk": on_disk,
        "bytes_on_disk_per_image": round(on_disk / max(len(reader.images), 1)),
        **_cost(reader.location),
    }


@dataclass
class RecordedFailures:
    """What extraction recorded instead of encoding: failed images and rejected boxes, with reasons."""

    images: list[dict[str, Any]]  # image_id, file_name, reason
    boxes: list[dict[str, Any]]  # image_id, x1, y1, x2, y2 (as given), category_id, reason


def recorded_failures(root: Path | str) -> RecordedFailures:
    """The failed images and rejected boxes of every committed shard (``rs-cache inspect --failed``)."""
    reader = CacheReader(root)
    images = reader.images.filter(pc.not_equal(reader.images["status"], STATUS_OK))
    return RecordedFailures(
        images.select(["image_id", "file_name", "reason"]).to_pylist(),
        reader.rejected_boxes.select(["image_id", "x1", "y1", "x2", "y2", "category_id", "reason"]).to_pylist(),
    )
