"""The one reader of the cache format.

>>> cache = CacheReader("runs/lvis_val.cache")
>>> item = cache.image(cache.image_ids()[0])
>>> item.boxes.shape, item.tokens.shape, item.feature_map.shape   # (N, 4) (N, 256) (1+g*g, width)
>>> vocab = cache.vocabulary(cache.vocabulary_names()[0])            # ids, names, embeddings
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from regionspot_cache.cache.arrays import RowArray, dequantize_rows, open_group, open_group_in_memory, place_rows
from regionspot_cache.cache.format import (
    BOX_TOKENS,
    BOXES_FILE,
    BOXES_SCHEMA,
    CLIP_MAPS,
    FEATURES_DIR,
    IMAGES_FILE,
    IMAGES_SCHEMA,
    REJECTED_FILE,
    REJECTED_SCHEMA,
    SCALE_SUFFIX,
    SHARDS_DIR,
    STATUS_OK,
    VOCAB_DIR,
    CacheFormatError,
    Provenance,
    shard_name,
    vocabulary_text_recipe,
)
from regionspot_cache.cache.storage import CacheLocation
from regionspot_cache.choices import FeatureDtype, TextRecipe


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
class ShardFeatures:
    """A shard's feature maps and box tokens (``*_scale``: per-row scales of an int8 cache)."""

    clip_maps: RowArray
    box_tokens: RowArray
    clip_maps_scale: RowArray | None = None
    box_tokens_scale: RowArray | None = None

    def maps(self, rows: np.ndarray | slice, out: np.ndarray | None = None, at: np.ndarray | None = None) -> np.ndarray:
        """The rows' maps; with ``out``, written into ``out[at]`` (see ``RowArray.rows``)."""
        if self.clip_maps_scale is None:
            return self.clip_maps.rows(rows, out, at)
        found = self._read(self.clip_maps, self.clip_maps_scale, rows)
        return found if out is None else place_rows(found, out, at)

    def tokens(self, rows: np.ndarray | slice) -> np.ndarray:
        return self._read(self.box_tokens, self.box_tokens_scale, rows)

    @staticmethod
    def _read(values: RowArray, scale: RowArray | None, rows: np.ndarray | slice) -> np.ndarray:
        return values.rows(rows) if scale is None else dequantize_rows(values.rows(rows), scale.rows(rows))

    @staticmethod
    def open(
        where: Path | str, expected: dict[str, tuple | None], dtype: FeatureDtype, files: Mapping[str, Any] | None = None
    ) -> "ShardFeatures":
        """Open and check the arrays against the shapes the manifest and cache.json call for; with
        ``files``, the group's files held in memory (``where`` then only names them)."""
        names = [CLIP_MAPS, BOX_TOKENS]
        if dtype.scaled:
            names += [CLIP_MAPS + SCALE_SUFFIX, BOX_TOKENS + SCALE_SUFFIX]
        try:
            arrays = open_group(Path(where), names) if files is None else open_group_in_memory(files, names, Path(where))
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise CacheFormatError(f"{where}: unreadable feature arrays: {err}") from None
        for name in names:
            shape = expected[name.removesuffix(SCALE_SUFFIX)]
            want_dtype = np.float32 if name.endswith(SCALE_SUFFIX) else np.dtype(dtype.value)
            shape = shape[:-1] if shape is not None and name.endswith(SCALE_SUFFIX) else shape
            array = arrays[name]
            if array.dtype != want_dtype or (shape is not None and tuple(array.shape) != shape):
                raise CacheFormatError(
                    f"{where}/{name}: {array.dtype} array of shape {tuple(array.shape)}, but the "
                    f"shard's manifest and cache.json call for {np.dtype(want_dtype)} {shape}"
                )
        return ShardFeatures(
            arrays[CLIP_MAPS], arrays[BOX_TOKENS], arrays.get(CLIP_MAPS + SCALE_SUFFIX), arrays.get(BOX_TOKENS + SCALE_SUFFIX)
        )


@dataclass
class Vocabulary:
    name: str
    category_ids: np.ndarray  # (C,) int64
    names: list[str]
    frequencies: list[str | None]
    embeddings: np.ndarray  # (C, text_dim) float32, L2-normalised
    text_recipe: TextRecipe = TextRecipe.OPENCLIP  # how the embeddings were made (extract.text_recipe)


class FetchedShards:
    """The feature arrays of shards of a cache on object storage, fetched whole into a local
    temporary directory of this process and then read by memory map like a local cache's: one
    concurrent GET per object instead of a ranged GET per image (~5x the throughput on loopback).
    A process forked from the one that fetched them (a loader worker) fetches its own."""

    def __init__(self, location: CacheLocation):
        self.location, self.pid, self.directory = location, os.getpid(), None

    def features(self, shard: int, relative: str) -> Path:
        if self.directory is None or self.pid != os.getpid():
            self.pid, self.directory = os.getpid(), Path(tempfile.mkdtemp(prefix="rs-cache-shards-"))
            weakref.finalize(self, _remove_own_directory, self.directory, self.pid)
        return self.location.fetch_dir(relative, self.directory / shard_name(shard))

    def forget(self, shard: int) -> None:
        """Delete a fetched shard (open memory maps of it stay valid until dropped)."""
        if self.directory is not None and self.pid == os.getpid():
            shutil.rmtree(self.directory / shard_name(shard), ignore_errors=True)


def _remove_own_directory(directory: Path, pid: int) -> None:
    if os.getpid() == pid:  # not a forked child's copy of the finalizer
        shutil.rmtree(directory, ignore_errors=True)


class CacheReader:
    """Reads a cache written by ``CacheWriter``: its committed shards, vocabularies and identity.

    Arguments:
      root: the cache directory (holding ``cache.json``). A proposals cache reads the feature
        maps of the cache it borrows them from (``maps_borrowed_from``).
    """

    remote_shards_kept = 4  # shards of a cache on object storage kept fetched, per process

    def __init__(self, root: Path | str | CacheLocation):
        self.location = CacheLocation.parse(root)
        self.root = self.location.local or Path(self.location.url)  # a Path for local caches
        self.provenance = Provenance.read(self.location)
        self.shard_ids = self.location.committed_shards(SHARDS_DIR)
        # Others read ``.name`` of these (the shard's id); only a local cache's are directories.
        self.shard_dirs = [self.root / SHARDS_DIR / shard_name(shard) for shard in self.shard_ids]
        self.images = self._concat(IMAGES_FILE, IMAGES_SCHEMA, with_shard=True)
        self.boxes = self._concat(BOXES_FILE, BOXES_SCHEMA, with_shard=False)
        self.rejected_boxes = self._concat(REJECTED_FILE, REJECTED_SCHEMA, with_shard=False)
        self._index = {image_id: row for row, image_id in enumerate(self.images.column("image_id").to_pylist())}
        self._box_offsets = self._box_offsets_per_shard()
        self._numpy_columns()
        self._opened: dict[int, ShardFeatures] = {}
        self._fetched = FetchedShards(self.location)
        self.maps_borrowed_from = self._open_maps_borrowed_from()

    def _open_maps_borrowed_from(self) -> "CacheReader | None":
        """The cache whose feature maps a proposals cache reads (it stores only SAM tokens)."""
        kind = self.provenance.kind
        if kind.owns_feature_maps:
            return None
        source = self.location.child(str(kind.base))
        try:
            base = CacheReader(source)
        except CacheFormatError as err:
            raise CacheFormatError(f"{self.location}: its feature maps come from {source}, which is unusable: {err}") from None
        if (base.provenance.dataset, base.provenance.clip) != (self.provenance.dataset, self.provenance.clip):
            raise CacheFormatError(
                f"{self.location}: the cache it borrows feature maps from ({source}) holds another dataset or CLIP model"
            )
        return base

    def _concat(self, file_name: str, schema: pa.Schema, with_shard: bool) -> pa.Table:
        tables = []
        for shard in self.shard_ids:
            relative = f"{SHARDS_DIR}/{shard_name(shard)}/{file_name}"
            path = self.location.path(relative)
            try:
                table = self.location.read_table(relative)
            except (OSError, pa.ArrowInvalid) as err:
                raise CacheFormatError(f"{path}: unreadable manifest: {err}") from None
            if not table.schema.equals(schema):
                raise CacheFormatError(f"{path}: schema {table.schema} differs from the format's")
            if with_shard:
                table = table.append_column("shard", pa.array(np.full(len(table), shard, np.int32)))
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
        for shard in self.shard_ids:
            offsets[shard] = total
            total += int(per_shard.get(shard, 0) or 0)
        return offsets

    def _numpy_columns(self) -> None:
        """The manifest columns a read needs, as numpy arrays: reading an image indexes them
        instead of slicing Arrow tables (tens of microseconds each)."""
        images = self.images
        self._shard = images.column("shard").to_numpy()
        self._map_row = images.column("map_row").to_numpy()
        self._box_start = images.column("box_start").to_numpy()
        self._box_count = images.column("box_count").to_numpy()
        self._ok = np.asarray(images.column("status").to_pylist(), dtype=object) == STATUS_OK
        offsets = np.asarray([self._box_offsets.get(int(s), 0) for s in range(int(self._shard.max(initial=-1)) + 1)])
        # First row in ``self.boxes`` of each image's boxes.
        self.box_row = (offsets[self._shard] if len(self._shard) else np.zeros(0, np.int64)) + self._box_start
        self._xyxy = np.stack([self.boxes.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
        self._xyxy = self._xyxy.astype(np.float32).reshape(-1, 4)
        self.box_category_ids = self.boxes.column("category_id").to_numpy()
        self._box_scores = self.boxes.column("score").to_numpy()

    def __len__(self) -> int:
        return len(self._index)

    def image_ids(self, only_ok: bool = True) -> list[int]:
        ids = self.images.column("image_id").to_pylist()
        if not only_ok:
            return ids
        status = self.images.column("status").to_pylist()
        return [i for i, s in zip(ids, status) if s == STATUS_OK]

    def row_of(self, image_id: int) -> int:
        """The image's row in ``self.images`` (and in the arrays indexed like it)."""
        if image_id not in self._index:
            raise KeyError(f"image {image_id} is not in the cache {self.location}")
        return self._index[image_id]

    def box_rows(self, image_id: int) -> slice:
        """The image's rows in ``self.boxes`` (and in ``box_category_ids``, indexed like it)."""
        row = self.row_of(image_id)
        first = int(self.box_row[row])
        return slice(first, first + int(self._box_count[row]))

    def image_boxes(self, image_id: int) -> np.ndarray:
        """(N, 4) float32 x1 y1 x2 y2 of the image's cached boxes, without reading its features."""
        return self._xyxy[self.box_rows(image_id)]

    def _row(self, image_id: int) -> dict:
        return self.images.slice(self.row_of(image_id), 1).to_pylist()[0]

    def _ok_row(self, image_id: int) -> int:
        row = self.row_of(image_id)
        if not self._ok[row]:
            record = self._row(image_id)
            raise CacheFormatError(f"image {image_id} was not extracted: {record['status']}: {record['reason']}")
        return row

    def status(self, image_id: int) -> tuple[str, str]:
        """(status, reason) recorded for the image at extraction: ``ok`` or why it failed."""
        row = self._row(image_id)
        return row["status"], row["reason"]

    def image(self, image_id: int) -> CachedImage:
        """Everything cached of one extracted image.

        Arguments:
          image_id: an id of ``image_ids()`` (a failed image raises CacheFormatError with its reason).

        Returns:
          A ``CachedImage``: ``boxes`` (N, 4) float32 x1 y1 x2 y2 in original pixels,
          ``category_ids`` (N,) int64 (-1 for proposals), ``scores`` (N,) float32, ``tokens``
          (N, 256) float16 SAM position-aware tokens, ``feature_map`` (1 + grid^2, width) float16
          CLIP tokens before ln_post, class token first (int8 caches are dequantised to float16).
        """
        self._ok_row(image_id)
        record = self._row(image_id)
        rows = self.box_rows(image_id)
        return CachedImage(
            image_id=image_id,
            file_name=record["file_name"],
            width=record["width"],
            height=record["height"],
            boxes=self._xyxy[rows],
            category_ids=self.box_category_ids[rows],
            scores=self._box_scores[rows],
            tokens=self.box_tokens(image_id),
            feature_map=self.feature_maps([image_id])[0],
        )

    def box_tokens(self, image_id: int, boxes: np.ndarray | None = None) -> np.ndarray:
        """(N, 256) float16 SAM tokens of the image's boxes (``boxes``: indices among them; default all)."""
        row = self._ok_row(image_id)
        start, count = int(self._box_start[row]), int(self._box_count[row])
        features = self._arrays(int(self._shard[row]))
        if boxes is None and not count:
            return np.zeros((0, self.provenance.sam.token_dim), np.float16)
        if boxes is None:
            return features.tokens(slice(start, start + count))
        return features.tokens(start + np.asarray(boxes, dtype=np.int64))

    def feature_maps(self, image_ids: Sequence[int], out: np.ndarray | None = None, at: np.ndarray | None = None) -> np.ndarray:
        """(len(image_ids), 1 + grid^2, width) float16 CLIP feature maps, gathered shard by shard
        (one memory-mapped fancy-index copy per shard). With ``out`` (float16, of that row shape),
        image ``k``'s map is written straight into ``out[at[k]]`` (default ``at``: 0, 1, ...) and
        ``out`` returned: a training batch's maps copied once, into the batch itself."""
        if self.maps_borrowed_from is not None:
            return self.maps_borrowed_from.feature_maps(image_ids, out, at)
        rows = np.asarray([self._ok_row(i) for i in image_ids], dtype=np.int64)
        shards = self._shard[rows]
        if out is None and len(rows) and (shards == shards[0]).all():
            return self._arrays(int(shards[0])).maps(self._map_row[rows])
        clip = self.provenance.clip
        if out is None:
            out = np.empty((len(rows), clip.num_tokens, clip.width), np.float16)
        at = np.arange(len(rows)) if at is None else np.asarray(at, dtype=np.int64)
        for shard in np.unique(shards).tolist():
            where = np.flatnonzero(shards == shard)
            self._arrays(shard).maps(self._map_row[rows[where]], out, at[where])
        return out

    def feature_map(self, image_id: int) -> np.ndarray:
        """The image's CLIP feature map alone, (1 + grid^2, width) float16."""
        return self.feature_maps([image_id])[0]

    def __getstate__(self) -> dict:
        # Loader workers reopen the shards they read: memory maps must not be pickled (copied).
        return {**self.__dict__, "_opened": {}, "_fetched": FetchedShards(self.location)}

    def _arrays(self, shard: int) -> ShardFeatures:
        """The shard's feature arrays, opened once (opening reads metadata and maps the files)
        and checked against the shard's manifest and the provenance before any value is used."""
        if shard not in self._opened:
            self._opened[shard] = self._open_arrays(shard)
            if self._fetched.directory is not None and len(self._opened) > self.remote_shards_kept:
                self._fetched.forget(next(iter(self._opened)))  # the oldest: its rows were copied out
                del self._opened[next(iter(self._opened))]
        return self._opened[shard]

    def shard_dir(self, shard: int) -> Path:
        """Where the shard's files are read from (a local copy's reader overrides it: train/shard_cache.py)."""
        return self.root / SHARDS_DIR / shard_name(shard)

    def features_dir(self, shard: int) -> Path:
        """The local directory of the shard's feature arrays: fetched by this process from object
        storage, or the cache's own (a local copy's reader overrides it: train/shard_cache.py)."""
        if self.location.remote:
            return self._fetched.features(shard, f"{SHARDS_DIR}/{shard_name(shard)}/{FEATURES_DIR}")
        return self.shard_dir(shard) / FEATURES_DIR

    def _open_arrays(self, shard: int) -> ShardFeatures:
        return ShardFeatures.open(self.features_dir(shard), self.expected_shapes(shard), self.provenance.feature_dtype)

    def expected_shapes(self, shard: int) -> dict[str, tuple | None]:
        """The shapes of the shard's arrays that its manifest and cache.json call for (None: empty)."""
        in_shard = self._shard == shard
        maps = int((self._map_row[in_shard] >= 0).sum())
        boxes = int(self._box_count[in_shard].sum())
        clip = self.provenance.clip
        return {
            CLIP_MAPS: (maps, clip.num_tokens, clip.width) if maps else None,
            BOX_TOKENS: (boxes, self.provenance.sam.token_dim) if boxes else None,
        }

    def vocabulary_names(self) -> list[str]:
        return self.location.names(VOCAB_DIR, ".parquet")

    def vocabulary(self, name: str) -> Vocabulary:
        relative = f"{VOCAB_DIR}/{name}.parquet"
        if not self.location.exists(relative):
            raise CacheFormatError(
                f"{self.location.path(relative)}: no vocabulary {name!r}; the cache has {self.vocabulary_names()}"
            )
        table = self.location.read_table(relative)
        embeddings = np.array(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
        return Vocabulary(
            name=name,
            category_ids=table.column("category_id").to_numpy(),
            names=table.column("name").to_pylist(),
            frequencies=table.column("frequency").to_pylist(),
            embeddings=embeddings.reshape(len(table), -1),
            text_recipe=vocabulary_text_recipe(table.schema),
        )


def committed_shard_dirs(root: Path) -> list[Path]:
    """The committed shard directories of a local cache."""
    return [Path(root) / SHARDS_DIR / shard_name(shard) for shard in CacheLocation.parse(root).committed_shards(SHARDS_DIR)]
