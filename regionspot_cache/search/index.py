"""The region index: the head's embedding of every cached box, stored beside the cache.

``CACHE/regions/<head sha256>/regions.safetensors`` holds image ids, box indices, boxes and the
L2-normalised embeddings; ``index.json`` beside it records the file's SHA-256 (checked on every
open: a damaged index is rebuilt, never trusted), the head's, and the cache's box count. The
head's hash is over its config and weights, so the same head gives the same index whether it
comes from a file or from Python. A cache on object storage keeps its index there too (uploaded
with ``index.json`` last, as a shard's commit record), unless another place is given
(``index_root``: a local directory or a URL, e.g. when the cache's bucket is read-only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.completeness import content_digest
from regionspot_cache.cache.storage import CacheLocation
from regionspot_cache.errors import CacheFormatError
from regionspot_cache.head.model import RegionSpotHead, check_head_fits_cache
from regionspot_cache.progress import progress_bar
from regionspot_cache.runtime.devices import resolve_device
from regionspot_cache.runtime.files import atomic_path, sha256_file, write_json

REGIONS_DIR = "regions"
INDEX_FILE = "regions.safetensors"
META_FILE = "index.json"
INDEX_VERSION = 1  # bump when what the index stores changes

logger = logging.getLogger(__name__)


@dataclass
class RegionIndex:
    image_ids: np.ndarray  # (R,) int64
    box_index: np.ndarray  # (R,) int64: the box's place among its image's cached boxes
    boxes: np.ndarray  # (R, 4) float32 x1 y1 x2 y2 in original pixels
    embeddings: np.ndarray  # (R, text_dim) float32, L2-normalised

    def __len__(self) -> int:
        return len(self.image_ids)

    def row(self, image_id: int, box: int) -> int:
        rows = np.flatnonzero((self.image_ids == image_id) & (self.box_index == box))
        if not len(rows):
            raise KeyError(f"image {image_id} has no cached box {box}")
        return int(rows[0])


def head_sha256(head: RegionSpotHead) -> str:
    """SHA-256 over the head's config and weights (names, shapes, values, in name order)."""
    digest = hashlib.sha256(json.dumps(asdict(head.config), sort_keys=True).encode())
    for name, tensor in sorted(head.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def index_dir(cache: Path | str, head_hash: str) -> Path:
    return Path(cache) / REGIONS_DIR / head_hash


def index_place(reader: CacheReader, head_hash: str, index_root: Path | str | None = None) -> tuple[CacheLocation, str]:
    """(store, directory in it) of the index of ``head_hash``: ``regions/<hash>`` beside the cache
    (on its object store for a remote cache), or ``<hash>`` under ``index_root``."""
    if index_root is None:
        return reader.location, f"{REGIONS_DIR}/{head_hash}"
    return CacheLocation.parse(index_root), head_hash


def open_region_index(
    reader: CacheReader,
    head: RegionSpotHead,
    device: str = "auto",
    batch_images: int = 32,
    index_root: Path | str | None = None,
) -> RegionIndex:
    """The cache's region index for ``head``: read if built and intact, else built and written
    (beside the cache, or under ``index_root``)."""
    clip = reader.provenance.clip
    check_head_fits_cache(head, str(reader.location), clip.width, clip.text_dim, reader.provenance.sam.token_dim)
    head_hash = head_sha256(head)
    store, relative = index_place(reader, head_hash, index_root)
    cache_digest = content_digest(reader)  # shards re-extracted with other boxes make the index stale
    expected = (head_hash, len(reader.boxes), cache_digest)
    if store.local is not None:
        index = read_index(store.local / relative, *expected)
    else:
        index = _read_remote_index(store, relative, *expected)
    if index is None:
        index = build_index(reader, head, resolve_device(device), batch_images)
        if store.local is not None:
            write_index(index, store.local / relative, head_hash, cache_digest)
        else:
            with tempfile.TemporaryDirectory(prefix="rs-cache-index-") as staged:
                write_index(index, Path(staged), head_hash, cache_digest)
                store.publish_dir(Path(staged), relative, record=META_FILE)
    return index


def _read_remote_index(store: CacheLocation, relative: str, head_hash: str, regions: int, digest: str) -> RegionIndex | None:
    """The index on object storage: its ``index.json`` first (a stale index is not downloaded),
    then both files into a temporary directory, checked as a local one."""
    try:
        meta = json.loads(store.read_bytes(f"{relative}/{META_FILE}"))
    except FileNotFoundError:
        return None
    except ValueError:
        meta = {}
    if not _meta_matches(meta, head_hash, regions, digest, f"{store}/{relative}"):
        return None
    with tempfile.TemporaryDirectory(prefix="rs-cache-index-") as local:
        store.fetch_dir(relative, Path(local))
        return read_index(Path(local), head_hash, regions, digest)


def _meta_matches(meta: dict, head_hash: str, regions: int, digest: str | None, where: object) -> bool:
    expected = {"version": INDEX_VERSION, "head_sha256": head_hash, "regions": regions, "cache_digest": digest}
    if any(meta.get(k) != v for k, v in expected.items()):
        logger.warning("%s: index made for another head, cache or version; rebuilding", where)
        return False
    return True


@torch.no_grad()
def build_index(reader: CacheReader, head: RegionSpotHead, device: torch.device, batch_images: int) -> RegionIndex:
    """Embed every box of every extracted image, ``batch_images`` images per head call (their
    feature maps read in one batched gather, boxes padded and masked)."""
    head = head.to(device).eval()
    counts = {i: len(reader.image_boxes(i)) for i in reader.image_ids()}
    image_ids = [i for i, count in counts.items() if count]
    parts: list[RegionIndex] = []
    with progress_bar("embed regions", sum(counts.values())) as (bar, task):
        for start in range(0, len(image_ids), batch_images):
            batch = image_ids[start : start + batch_images]
            parts.append(_embed_images(reader, head, batch, device))
            bar.update(task, advance=len(parts[-1]))
    if not parts:
        raise CacheFormatError(f"{reader.location}: the cache has no extracted boxes to index")
    fields = ("image_ids", "box_index", "boxes", "embeddings")
    return RegionIndex(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def _embed_images(reader: CacheReader, head: RegionSpotHead, image_ids: list[int], device: torch.device) -> RegionIndex:
    maps = torch.from_numpy(reader.feature_maps(image_ids)).to(device).float()
    token_sets = [reader.box_tokens(i) for i in image_ids]
    most = max(len(t) for t in token_sets)
    tokens = torch.zeros(len(image_ids), most, token_sets[0].shape[1], device=device)
    mask = torch.zeros(len(image_ids), most, dtype=torch.bool, device=device)
    for row, own in enumerate(token_sets):
        tokens[row, : len(own)] = torch.from_numpy(own.astype(np.float32))
        mask[row, : len(own)] = True
    embeddings = head(tokens, maps, mask)[mask].cpu().numpy()
    counts = [len(t) for t in token_sets]
    boxes = np.concatenate([reader.image_boxes(i) for i in image_ids])
    return RegionIndex(
        np.repeat(np.asarray(image_ids, np.int64), counts),
        np.concatenate([np.arange(c, dtype=np.int64) for c in counts]),
        boxes,
        embeddings,
    )


def write_index(index: RegionIndex, directory: Path, head_hash: str, cache_digest: str | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / INDEX_FILE
    arrays = {
        "image_ids": index.image_ids,
        "box_index": index.box_index,
        "boxes": index.boxes,
        "embeddings": np.ascontiguousarray(index.embeddings, np.float32),
    }
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp))
    meta = {
        "version": INDEX_VERSION,
        "head_sha256": head_hash,
        "regions": len(index),
        "cache_digest": cache_digest,
        "file_sha256": sha256_file(path),
    }
    write_json(directory / META_FILE, meta, indent=2)
    logger.info("wrote the region index of %d regions to %s", len(index), directory)


def read_index(directory: Path, head_hash: str, regions: int, cache_digest: str | None = None) -> RegionIndex | None:
    """The stored index, or None when it is missing, stale or fails its checksum (logged)."""
    path, meta_path = directory / INDEX_FILE, directory / META_FILE
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not _meta_matches(meta, head_hash, regions, cache_digest, directory):
            return None
        if sha256_file(path) != meta.get("file_sha256"):
            logger.warning("%s: checksum mismatch (damaged file); rebuilding", path)
            return None
        arrays = load_file(str(path))
        return RegionIndex(arrays["image_ids"], arrays["box_index"], arrays["boxes"], arrays["embeddings"])
    except (OSError, ValueError, KeyError) as err:
        logger.warning("%s: unreadable region index (%s); rebuilding", directory, err)
        return None
