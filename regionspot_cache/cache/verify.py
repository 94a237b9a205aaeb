"""Checks and summaries of a cache: ``rs-cache verify`` (checksums recorded at commit) and ``inspect``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regionspot_cache.cache.format import (
    CHECKSUMS_FILE,
    PROPOSALS_DIR,
    STATUS_OK,
    Provenance,
    shard_checksums,
)
from regionspot_cache.cache.reader import CacheReader, committed_shard_dirs


@dataclass
class ShardProblem:
    shard: str
    problem: str


def verify_cache(root: Path | str) -> list[ShardProblem]:
    """Check every committed shard's files against the checksums recorded when it was committed."""
    root = Path(root)
    Provenance.read(root)
    problems = []
    for shard_dir in committed_shard_dirs(root):
        problems.extend(ShardProblem(shard_dir.name, p) for p in _shard_problems(shard_dir))
    return problems


def proposals_caches(root: Path | str) -> list[Path]:
    """The proposals caches kept inside ``root`` (they borrow its feature maps)."""
    directory = Path(root) / PROPOSALS_DIR
    return sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []


def verify_cache_tree(root: Path | str) -> dict[Path, list[ShardProblem]]:
    """``verify_cache`` of ``root`` and of each proposals cache inside it, by cache directory."""
    return {cache: verify_cache(cache) for cache in [Path(root), *proposals_caches(root)]}


def _shard_problems(shard_dir: Path) -> list[str]:
    try:
        recorded = json.loads((shard_dir / CHECKSUMS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"{CHECKSUMS_FILE} unreadable: {err}"]
    actual = shard_checksums(shard_dir)
    problems = [f"{name}: missing" for name in sorted(set(recorded) - set(actual))]
    problems += [f"{name}: not recorded at commit" for name in sorted(set(actual) - set(recorded))]
    problems += [
        f"{name}: checksum differs (damaged)"
        for name in sorted(set(recorded) & set(actual))
        if recorded[name] != actual[name]
    ]
    return problems


def inspect_cache(root: Path | str) -> dict[str, Any]:
    """Summary of a cache: images, boxes, shards committed and missing, models, bytes on disk."""
    reader = CacheReader(root)
    provenance = reader.provenance
    sam, clip = provenance.sam, provenance.clip
    committed = {int(p.name) for p in reader.shard_dirs}
    status = reader.images.column("status").to_pylist()
    on_disk = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
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
        # float16 payload: one feature map per image, one 256-d token per box.
        "bytes_per_image_map": 2 * clip.num_tokens * clip.width,
        "bytes_per_box_token": 2 * sam.token_dim,
        "bytes_on_disk_per_image": round(on_disk / max(len(status), 1)),
    }
