"""The one reader of the cache format.

>>> cache = CacheReader("runs/lvis_val.cache")
>>> item = cache.image(cache.image_ids()[0])
>>> item.boxes.shape, item.tokens.shape, item.feature_map.shape   # (N, 4) (N, 256) (1+g*g, width)
>>> vocab = cache.vocabulary(cache.vocabulary_names()[0])            # ids, names, embeddings
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from regionspot_cache.cache.format import (
    BOX_TOKENS,
    BOXES_FILE,
    BOXES_SCHEMA,
    CLIP_MAPS,
    FEATURE_MAPS_BORROWED,
    FEATURE_MAPS_CACHE,
    FEATURES_DIR,
    IMAGES_FILE,
    IMAGES_SCHEMA,
    REJECTED_FILE,
    REJECTED_SCHEMA,
    SHARDS_DIR,
    STATUS_OK,
    VOCAB_DIR,
    CacheFormatError,
    Provenance,
    shard_name,
)


@dataclass
class CachedImage:
    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 x1 y1 x2 y2 in original pixels
    category_ids: np.ndarray  # (N,) int64, -1 for proposals
    scores: np.ndarray  # (N,) float32
    tokens: np.ndarray  # (N, 256) float16 position-aware tokens
    feature_map: np.ndarray  # (1 + grid^2, width) float16 CLIP tokens before ln_post


@dataclass
class Vocabulary:
    name: str
    category_ids: np.ndarray  # (C,) int64
    names: list[str]
    frequencies: list[str | None]
    embeddings: np.ndarray  # (C, text_dim) float32, L2-normalised


class CacheReader:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.provenance = Provenance.read(self.root)
        self.shard_dirs = committed_shard_dirs(self.root)
        self.images = self._concat(IMAGES_FILE, IMAGES_SCHEMA, with_shard=True)
        self.boxes = self._concat(BOXES_FILE, BOXES_SCHEMA, with_shard=False)
        self.rejected_boxes = self._concat(REJECTED_FILE, REJECTED_SCHEMA, with_shard=False)
        self._index = {
            image_id: row for row, image_id in enumerate(self.images.column("image_id").to_pylist())
        }
        self._box_offsets = self._box_offsets_per_shard()
        self.maps_source = self._borrowed_maps_source()

    def _borrowed_maps_source(self) -> "CacheReader | None":
        """The cache whose feature maps a proposals cache reads (it stores only SAM tokens)."""
        if self.provenance.feature_maps != FEATURE_MAPS_BORROWED:
            return None
        source = (self.root / str(self.provenance.paths.get(FEATURE_MAPS_CACHE))).resolve()
        try:
            base = CacheReader(source)
        except CacheFormatError as err:
            raise CacheFormatError(f"{self.root}: its feature maps come from {source}, which is unusable: {err}") from None
        if (base.provenance.dataset, base.provenance.clip) != (self.provenance.dataset, self.provenance.clip):
            raise CacheFormatError(f"{self.root}: the cache it borrows feature maps from ({source}) holds another "
                                   "dataset or CLIP model")
        return base

    def _concat(self, file_name: str, schema: pa.Schema, with_shard: bool) -> pa.Table:
        tables = []
        for shard_dir in self.shard_dirs:
            path = shard_dir / file_name
            try:
                table = pq.read_table(path)
            except (OSError, pa.ArrowInvalid) as err:
                raise CacheFormatError(f"{path}: unreadable manifest: {err}") from None
            if not table.schema.equals(schema):
                raise CacheFormatError(f"{path}: schema {table.schema} differs from the format's")
            if with_shard:
                table = table.append_column("shard", pa.array(np.full(len(table), int(shard_dir.name), np.int32)))
            tables.append(table)
        if not tables:
            empty = schema.empty_table()
            return empty.append_column("shard", pa.array([], pa.int32())) if with_shard else empty
        return pa.concat_tables(tables)

    def _box_offsets_per_shard(self) -> dict[int, int]:
        """Row in ``self.boxes`` where each shard's boxes begin."""
        offsets, total = {}, 0
        counts = self.images.group_by("shard").aggregate([("box_count", "sum")]).to_pylist()
        per_shard = {row["shard"]: row["box_count_sum"] for row in counts}
        for shard_dir in self.shard_dirs:
            offsets[int(shard_dir.name)] = total
            total += int(per_shard.get(int(shard_dir.name), 0) or 0)
        return offsets

    def __len__(self) -> int:
        return len(self._index)

    def image_ids(self, only_ok: bool = True) -> list[int]:
        ids = self.images.column("image_id").to_pylist()
        if not only_ok:
            return ids
        status = self.images.column("status").to_pylist()
        return [i for i, s in zip(ids, status) if s == STATUS_OK]

    def _row(self, image_id: int) -> dict:
        if image_id not in self._index:
            raise KeyError(f"image {image_id} is not in the cache {self.root}")
        return self.images.slice(self._index[image_id], 1).to_pylist()[0]

    def status(self, image_id: int) -> tuple[str, str]:
        """(status, reason) recorded for the image at extraction: ``ok`` or why it failed."""
        row = self._row(image_id)
        return row["status"], row["reason"]

    def image(self, image_id: int) -> CachedImage:
        row = self._row(image_id)
        if row["status"] != STATUS_OK:
            raise CacheFormatError(f"image {image_id} was not extracted: {row['status']}: {row['reason']}")
        clip_maps, box_tokens = self._arrays(row["shard"])
        start, count = row["box_start"], row["box_count"]
        box_table = self.boxes.slice(self._box_offsets[row["shard"]] + start, count)
        boxes = np.stack([box_table.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
        tokens = box_tokens[start : start + count] if count else np.zeros((0, 256), np.float16)
        return CachedImage(
            image_id=image_id,
            file_name=row["file_name"],
            width=row["width"],
            height=row["height"],
            boxes=boxes.astype(np.float32).reshape(-1, 4),
            category_ids=box_table.column("category_id").to_numpy(),
            scores=box_table.column("score").to_numpy(),
            tokens=np.asarray(tokens),
            feature_map=self._feature_map(row, clip_maps),
        )

    def _feature_map(self, row: dict, clip_maps: zarr.Array) -> np.ndarray:
        if self.maps_source is not None:
            return self.maps_source.feature_map(row["image_id"])
        return np.asarray(clip_maps[row["map_row"]])

    def feature_map(self, image_id: int) -> np.ndarray:
        """The image's CLIP feature map alone, (1 + grid^2, width) float16."""
        row = self._row(image_id)
        if row["status"] != STATUS_OK:
            raise CacheFormatError(f"image {image_id} was not extracted: {row['status']}: {row['reason']}")
        return self._feature_map(row, self._arrays(row["shard"])[0])

    @lru_cache(maxsize=256)
    def _arrays(self, shard: int) -> tuple[zarr.Array, zarr.Array]:
        """The shard's (clip_maps, box_tokens) arrays, opened once (opening reads metadata) and
        checked against the shard's manifest and the provenance before any value is used."""
        where = self.root / SHARDS_DIR / shard_name(shard) / FEATURES_DIR
        try:
            group = zarr.open_group(where, mode="r")
            clip_maps, box_tokens = group[CLIP_MAPS], group[BOX_TOKENS]
        except (OSError, KeyError, ValueError) as err:
            raise CacheFormatError(f"{where}: unreadable feature arrays: {err}") from None
        rows = self.images.filter(pc.equal(self.images["shard"], shard))
        maps = int(pc.sum(pc.greater_equal(rows["map_row"], 0)).as_py() or 0)
        boxes = int(pc.sum(rows["box_count"]).as_py() or 0)
        clip = self.provenance.clip
        expected = {
            CLIP_MAPS: ((maps, clip.num_tokens, clip.width) if maps else None, clip_maps),
            BOX_TOKENS: ((boxes, self.provenance.sam.token_dim) if boxes else None, box_tokens),
        }
        for name, (shape, array) in expected.items():
            if array.dtype != np.float16 or (shape is not None and tuple(array.shape) != shape):
                raise CacheFormatError(f"{where}/{name}: {array.dtype} array of shape {tuple(array.shape)}, but the "
                                       f"shard's manifest and cache.json call for float16 {shape}")
        return clip_maps, box_tokens

    def vocabulary_names(self) -> list[str]:
        directory = self.root / VOCAB_DIR
        return sorted(p.stem for p in directory.glob("*.parquet")) if directory.is_dir() else []

    def vocabulary(self, name: str) -> Vocabulary:
        path = self.root / VOCAB_DIR / f"{name}.parquet"
        if not path.is_file():
            raise CacheFormatError(f"{path}: no vocabulary {name!r}; the cache has {self.vocabulary_names()}")
        table = pq.read_table(path)
        embeddings = np.array(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
        return Vocabulary(
            name=name,
            category_ids=table.column("category_id").to_numpy(),
            names=table.column("name").to_pylist(),
            frequencies=table.column("frequency").to_pylist(),
            embeddings=embeddings.reshape(len(table), -1),
        )


def committed_shard_dirs(root: Path) -> list[Path]:
    shards_dir = root / SHARDS_DIR
    return sorted(p for p in shards_dir.iterdir() if p.name.isdigit() and p.is_dir()) if shards_dir.is_dir() else []
