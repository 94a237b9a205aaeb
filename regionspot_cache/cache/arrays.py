"""The feature arrays of one shard, read at memory speed.

The writer stores each array uncompressed, as one zarr shard file whose chunks lie in row order.
The reader then memory-maps the chunk data: reading an image is a copy of its rows out of the
page cache, with no per-read call into zarr (about 1-4 ms each, which capped a worker at ~220
images/s). A file laid out otherwise (e.g. the zstd-compressed arrays of caches written before)
is read through zarr, one call per selection.

int8 caches store ``round(x / scale)`` with one float32 scale per row (per feature-map token,
per box token): ``scale = max|x| / 127``. Both kinds are returned as float16.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import zarr

from regionspot_cache.cache.format import CacheFormatError

log = logging.getLogger(__name__)

NO_CHUNK = 2**64 - 1  # a chunk missing from a zarr shard (all fill value)
INDEX_TRAILER = 4  # crc32c of the shard index


def quantize_rows(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale per row over the last axis) with ``x ~= q * scale``."""
    data = np.asarray(data, dtype=np.float32)
    scale = np.abs(data).max(axis=-1) / 127.0 if data.size else np.zeros(data.shape[:-1], np.float32)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    return np.clip(np.rint(data / safe), -127, 127).astype(np.int8), scale.astype(np.float32)


def dequantize_rows(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32) * scale[..., None]).astype(np.float16)


def write_rows(group: zarr.Group, name: str, data: np.ndarray, dtype: str, chunk_rows: int) -> None:
    """``data`` stored uncompressed, ``chunk_rows`` rows per chunk, all chunks in one zarr shard file."""
    chunks = (max(1, min(chunk_rows, len(data))), *data.shape[1:])
    shards = (_round_up(max(len(data), 1), chunks[0]), *data.shape[1:])
    # write_empty_chunks keeps all-zero rows in the file, so the chunks stay contiguous (mappable).
    array = group.create_array(
        name, shape=data.shape, chunks=chunks, shards=shards, dtype=dtype, compressors=None, config={"write_empty_chunks": True}
    )
    if len(data):
        array[:] = data


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class RowArray:
    """Rows of one stored array, by memory map when the layout allows it, else through zarr."""

    def __init__(self, array: zarr.Array, directory: Path):
        self.array, self.directory = array, directory
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self.mapped = _memory_map(array, directory) if len(array.shape) and array.shape[0] else None
        if self.mapped is None and self.shape and self.shape[0]:
            log.debug("%s: not laid out for memory mapping; reading through zarr", directory)

    def rows(self, rows: np.ndarray | slice) -> np.ndarray:
        if self.mapped is not None:
            return np.asarray(self.mapped[rows])  # fancy index or slice copy: one memcpy per row
        try:
            if isinstance(rows, slice):
                return np.asarray(self.array[rows])
            rows = np.asarray(rows, dtype=np.int64)
            if not len(rows):
                return np.zeros((0, *self.shape[1:]), self.dtype)
            return np.asarray(self.array.get_orthogonal_selection((rows,)))
        except (OSError, ValueError, RuntimeError) as err:  # truncated or corrupt chunk data
            raise CacheFormatError(
                f"{self.directory}: unreadable ({type(err).__name__}: {err}); run `rs-cache verify` and `rs-cache repair`"
            ) from None


def _memory_map(array: zarr.Array, directory: Path) -> np.memmap | None:
    """A memmap of all rows when the single shard file holds uncompressed chunks in row order."""
    metadata = array.metadata.to_dict()
    codecs = metadata.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    sharding = codecs[0]["configuration"]
    inner = sharding["codecs"]
    if sharding.get("index_location", "end") != "end" or [c["name"] for c in inner] != ["bytes"]:
        return None
    if inner[0].get("configuration", {}).get("endian", "little") != "little" and array.dtype.itemsize > 1:
        return None
    chunk_rows = int(sharding["chunk_shape"][0])
    if tuple(sharding["chunk_shape"][1:]) != array.shape[1:]:
        return None
    if int(metadata["chunk_grid"]["configuration"]["chunk_shape"][0]) < array.shape[0]:
        return None  # more than one shard file
    path = directory / "c" / "/".join(["0"] * len(array.shape))
    chunk_count = _round_up(array.shape[0], chunk_rows) // chunk_rows
    row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
    try:
        with open(path, "rb") as handle:
            handle.seek(-(chunk_count * 16 + INDEX_TRAILER), 2)
            index = np.frombuffer(handle.read(chunk_count * 16), "<u8").reshape(chunk_count, 2)
    except OSError:
        return None
    start = int(index[0, 0])
    expected = start + np.arange(chunk_count, dtype=np.uint64) * np.uint64(chunk_rows * row_bytes)
    in_order = (index[:, 0] == expected).all() and (index[:, 1] == chunk_rows * row_bytes).all()
    if (index[:, 0] == NO_CHUNK).any() or not in_order:
        return None
    mapped = np.memmap(
        path, dtype=array.dtype.newbyteorder("<"), mode="r", offset=start, shape=(chunk_count * chunk_rows, *array.shape[1:])
    )
    return mapped[: array.shape[0]]
