"""The one writer of the cache format. Shards are written aside and committed by one rename (a local
cache) or staged locally, uploaded, and committed by their checksums.json uploaded last (object
storage: cache/storage.py)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from regionspot_cache.cache.arrays import quantize_rows, write_rows
from regionspot_cache.cache.contents import ShardInput
from regionspot_cache.cache.format import (
    BOX_TOKENS,
    BOXES_FILE,
    BOXES_SCHEMA,
    CHECKSUMS_FILE,
    CLIP_MAPS,
    DEFAULT_TEXT_RECIPE,
    FEATURES_DIR,
    IMAGES_FILE,
    IMAGES_SCHEMA,
    INPUT_FILE,
    PROVENANCE_FILE,
    REJECTED_FILE,
    REJECTED_SCHEMA,
    SCALE_SUFFIX,
    SHARDS_DIR,
    STATUS_OK,
    TEXT_RECIPE_KEY,
    TOKENS_PER_CHUNK,
    VOCAB_DIR,
    CacheFormatError,
    Provenance,
    shard_checksums,
    shard_name,
    vocabulary_schema,
    vocabulary_text_recipe,
)
from regionspot_cache.cache.lease import extraction_lease
from regionspot_cache.cache.storage import CacheLocation
from regionspot_cache.choices import FeatureDtype, TextRecipe
from regionspot_cache.data.datasets import BoxSet, Category
from regionspot_cache.errors import CacheBusyError
from regionspot_cache.runtime.files import atomic_path, atomic_write_bytes, remove_abandoned_temps

LOCK_FILE = ".extract.lock"


@contextmanager
def exclusive_extraction(root: Path | str) -> Iterator[None]:
    """Held by the process that runs an extraction into ``root`` (dask workers write the shards
    it hands out). A second extraction is refused rather than racing on the same shards. The
    kernel drops the lock when its holder dies, so a killed run never leaves a stale lock. On object
    storage, a lease object instead (``storage.extraction_lease``)."""
    location = CacheLocation.parse(root)
    if location.remote:
        with extraction_lease(location):
            yield
        return
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK_FILE, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise CacheBusyError(
                f"{root}: another rs-cache extract ({holder}) is writing this cache; "
                "wait for it to finish or stop it, then re-run to resume"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


@dataclass
class ImageFeatures:
    """Everything the cache keeps of one image. A failed image has a reason and no arrays."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: BoxSet = field(default_factory=BoxSet.empty)
    feature_map: np.ndarray | None = None  # (tokens, width)
    box_tokens: np.ndarray | None = None  # (boxes, 256)
    status: str = STATUS_OK
    reason: str = ""
    rejected_boxes: BoxSet = field(default_factory=BoxSet.empty)  # degenerate boxes, as given
    rejected_reasons: list[str] = field(default_factory=list)


class CacheWriter:
    """Creates a cache, or reopens one whose identity matches ``provenance``."""

    def __init__(self, root: Path | str | CacheLocation, provenance: Provenance):
        self.location = CacheLocation.parse(root)
        self.root = self.location.local or Path(self.location.url)  # a Path for local caches
        self.provenance = provenance
        self.shards_dir = self.root / SHARDS_DIR
        if self.location.exists(PROVENANCE_FILE):
            existing = Provenance.read(self.location)
            differences = provenance.differences(existing)
            if differences:
                raise CacheFormatError(
                    f"{self.location}: refusing to extract into a cache made with other settings:\n  " + "\n  ".join(differences)
                )
        elif self.location.remote:
            self.location.write_bytes(PROVENANCE_FILE, provenance.to_json().encode())
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.root / PROVENANCE_FILE, provenance.to_json().encode())
        if not self.location.remote:
            self.shards_dir.mkdir(exist_ok=True)

    def committed_shards(self) -> set[int]:
        return set(self.location.committed_shards(SHARDS_DIR))

    def recorded_input_digest(self, shard_id: int) -> str | None:
        """The digest of the inputs a committed shard was extracted from; None for shards written
        before digests were recorded (nothing to compare)."""
        record = ShardInput.read(self.location, shard_id)
        return None if record is None else record.sha256

    def has_vocabulary(self, name: str) -> bool:
        return self.location.exists(f"{VOCAB_DIR}/{name}.parquet")

    def vocabulary_text_recipe(self, name: str) -> TextRecipe:
        """The text recipe vocabulary ``name`` was built with (it must exist)."""
        if self.location.remote:
            return vocabulary_text_recipe(self.location.read_table(f"{VOCAB_DIR}/{name}.parquet").schema)
        return vocabulary_text_recipe(pq.read_schema(self.root / VOCAB_DIR / f"{name}.parquet"))

    def vocabulary_categories(self, name: str) -> list[tuple[int, str]]:
        """(category id, name) of each class vocabulary ``name`` records (it must exist)."""
        relative = f"{VOCAB_DIR}/{name}.parquet"
        if self.location.remote:
            table = self.location.read_table(relative).select(["category_id", "name"])
        else:
            table = pq.read_table(self.root / relative, columns=["category_id", "name"])
        return list(zip(*table.to_pydict().values()))

    def write_vocabulary(
        self,
        name: str,
        categories: Sequence[Category],
        embeddings: np.ndarray,
        text_recipe: TextRecipe | str = DEFAULT_TEXT_RECIPE,
    ) -> None:
        """``text_recipe``: how ``embeddings`` were made, recorded in the file's schema metadata."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        recipe = TextRecipe.parse(text_recipe, "text recipe").value.encode()  # the word, as files before choices were objects
        table = pa.table(
            {
                "category_id": [c.id for c in categories],
                "name": [c.name for c in categories],
                "frequency": [c.frequency for c in categories],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1]),
            },
            schema=vocabulary_schema(embeddings.shape[1]).with_metadata({TEXT_RECIPE_KEY: recipe}),
        )
        if self.location.remote:
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            self.location.write_bytes(f"{VOCAB_DIR}/{name}.parquet", sink.getvalue().to_pybytes())
            return
        directory = self.root / VOCAB_DIR
        directory.mkdir(exist_ok=True)
        with atomic_path(directory / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp)

    def write_shard(
        self, shard_id: int, images: Sequence[ImageFeatures], input_digest: str | None = None, image_bytes: dict | None = None
    ) -> int:
        """Write one shard aside and commit it with a rename; returns bytes written. A shard
        that is already committed is never rewritten. ``input_digest``: of the images and boxes it
        was extracted from (``recorded_input_digest`` gives it back); ``image_bytes``: the content
        digest of each image file by image id (cache/contents.py), recorded beside it."""
        inputs = None if input_digest is None else ShardInput(input_digest, image_bytes)
        if self.location.remote:
            return self._upload_shard(shard_id, images, inputs)
        final = self.shards_dir / shard_name(shard_id)
        if final.is_dir():
            raise CacheFormatError(f"{final}: shard {shard_id} is already committed")
        # What a killed writer of this shard left aside (its pid is in the name).
        remove_abandoned_temps(self.shards_dir, re.escape(shard_name(shard_id)))
        try:
            with atomic_path(final) as tmp:
                tmp.mkdir()
                self._stage_shard(tmp, images, inputs)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFormatError(
                    f"{self.location}: no space left on the device while writing shard {shard_id}: nothing of "
                    "it was committed (committed shards are intact); free space and re-run to resume"
                ) from None
            raise
        return sum(p.stat().st_size for p in final.rglob("*") if p.is_file())

    def _stage_shard(self, directory: Path, images: Sequence[ImageFeatures], inputs: ShardInput | None) -> None:
        self._write_shard_files(directory, images)
        if inputs is not None:
            (directory / INPUT_FILE).write_text(inputs.to_json())
        write_checksums(directory)

    def _upload_shard(self, shard_id: int, images: Sequence[ImageFeatures], inputs: ShardInput | None) -> int:
        """Object storage: stage the shard in a local temporary directory, then upload it with its
        commit record last (``CacheLocation.publish_dir``), replacing what a killed writer left."""
        if shard_id in self.committed_shards():
            raise CacheFormatError(f"{self.location}: shard {shard_id} is already committed")
        with tempfile.TemporaryDirectory(prefix="rs-cache-shard-") as tmp:
            staged = Path(tmp) / shard_name(shard_id)
            staged.mkdir()
            self._stage_shard(staged, images, inputs)
            self.location.publish_dir(staged, f"{SHARDS_DIR}/{shard_name(shard_id)}")
            return sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())

    def _write_shard_files(self, directory: Path, images: Sequence[ImageFeatures]) -> None:
        rows, box_rows, maps, tokens, rejected_rows = [], [], [], [], []
        box_start = 0
        for image in images:
            ok = image.status == STATUS_OK
            count = len(image.boxes) if ok else 0
            rows.append(
                {
                    "image_id": image.image_id,
                    "file_name": image.file_name,
                    "width": image.width,
                    "height": image.height,
                    "status": image.status,
                    "reason": image.reason,
                    "map_row": len(maps) if ok and image.feature_map is not None else -1,
                    "box_start": box_start,
                    "box_count": count,
                }
            )
            if image.rejected_reasons:
                table = _box_columns(image.image_id, image.rejected_boxes)
                rejected_rows.append(table.append_column("reason", pa.array(image.rejected_reasons, pa.string())))
            if ok:
                if image.feature_map is not None:  # None in a cache that borrows its maps
                    maps.append(image.feature_map)
                tokens.append(image.box_tokens)
                box_rows.append(_box_columns(image.image_id, image.boxes))
                box_start += count
        pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), directory / IMAGES_FILE)
        boxes = pa.concat_tables(box_rows) if box_rows else BOXES_SCHEMA.empty_table()
        pq.write_table(boxes, directory / BOXES_FILE)
        rejected = pa.concat_tables(rejected_rows) if rejected_rows else REJECTED_SCHEMA.empty_table()
        pq.write_table(rejected, directory / REJECTED_FILE)
        group = zarr.open_group(directory / FEATURES_DIR, mode="w")
        dtype = self.provenance.feature_dtype
        _write_features(group, CLIP_MAPS, np.stack(maps) if maps else None, 1, dtype)
        _write_features(group, BOX_TOKENS, np.concatenate(tokens) if tokens else None, TOKENS_PER_CHUNK, dtype)


def write_checksums(shard_dir: Path) -> None:
    sums = shard_checksums(shard_dir)
    (shard_dir / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=0, sort_keys=True))


def _box_columns(image_id: int, boxes: BoxSet) -> pa.Table:
    xyxy = np.asarray(boxes.xyxy, dtype=np.float32).reshape(-1, 4)
    return pa.table(
        {
            "image_id": np.full(len(xyxy), image_id, dtype=np.int64),
            "x1": xyxy[:, 0],
            "y1": xyxy[:, 1],
            "x2": xyxy[:, 2],
            "y2": xyxy[:, 3],
            "category_id": np.asarray(boxes.category_ids, dtype=np.int64),
            "score": np.asarray(boxes.scores, dtype=np.float32),
        },
        schema=BOXES_SCHEMA,
    )


def _write_features(group: zarr.Group, name: str, data: np.ndarray | None, chunk_rows: int, dtype: FeatureDtype) -> None:
    """float16 rows, or int8 rows with ``<name>_scale`` (one float32 per row) for an int8 cache."""
    data = np.zeros((0, 1), np.float16) if data is None else np.asarray(data)
    if dtype.scaled:
        values, scale = quantize_rows(data)
        write_rows(group, name, values, "int8", chunk_rows)
        write_rows(group, name + SCALE_SUFFIX, scale, "float32", chunk_rows)
    else:
        write_rows(group, name, data.astype(np.float16, copy=False), "float16", chunk_rows)
