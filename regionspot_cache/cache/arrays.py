"""The feature arrays of one shard, read at memory speed.

The writer stores each array uncompressed, as one zarr shard file whose chunks lie in row order,
each chunk followed by its crc32c (zarr v3's ``crc32c`` codec). The reader memory-maps the chunk
data: reading an image is a copy of its rows out of the page cache, with no per-read call into
zarr (about 1-4 ms each, which capped a worker at ~220 images/s). Before the first row of a chunk
reaches a caller, the reader checks the chunk's crc32c, once per chunk and file version on the
machine (``cache/ledger.py``), so a flipped byte is an error instead of a wrong value. A file laid
out otherwise is read through zarr, one call per selection (zarr checks the crc32c itself); the
files of caches written before chunks carried a crc32c have no read-path check (``rs-cache
verify`` checks them whole).

int8 caches store ``round(x / scale)`` with one float32 scale per row (per feature-map token,
per box token): ``scale = max|x| / 127``. Both kinds are returned as float16.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import zarr
from fastcrc import crc32 as fast_crc32
from zarr.codecs import Crc32cCodec

from regionspot_cache.cache.format import CacheFormatError
from regionspot_cache.cache.ledger import checked_flags

log = logging.getLogger(__name__)

NO_CHUNK = 2**64 - 1  # a chunk missing from a zarr shard (all fill value)
INDEX_TRAILER = 4  # crc32c of the shard index
NUMERIC_TYPES = frozenset(
    {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64"}
)


def quantize_rows(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale per row over the last axis) with ``x ~= q * scale``."""
    data = np.asarray(data, dtype=np.float32)
    scale = np.abs(data).max(axis=-1) / 127.0 if data.size else np.zeros(data.shape[:-1], np.float32)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    return np.clip(np.rint(data / safe), -127, 127).astype(np.int8), scale.astype(np.float32)


def dequantize_rows(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32) * scale[..., None]).astype(np.float16)


def write_rows(group: zarr.Group, name: str, data: np.ndarray, dtype: str, chunk_rows: int) -> None:
    """``data`` stored uncompressed, ``chunk_rows`` rows per chunk each followed by its crc32c, all
    chunks in one zarr shard file."""
    chunks = (max(1, min(chunk_rows, len(data))), *data.shape[1:])
    shards = (_round_up(max(len(data), 1), chunks[0]), *data.shape[1:])
    # write_empty_chunks keeps all-zero rows in the file, so the chunks stay contiguous (mappable).
    array = group.create_array(
        name,
        shape=data.shape,
        chunks=chunks,
        shards=shards,
        dtype=dtype,
        compressors=[Crc32cCodec()],
        config={"write_empty_chunks": True},
    )
    if len(data):
        array[:] = data


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class RowArray:
    """Rows of one stored array, by memory map when the layout allows it, else through zarr."""

    check_reads = True  # False only to measure what the check costs (benchmarks/cache_read.py)

    def __init__(self, directory: Path, shape: tuple, dtype: np.dtype, mapped: "MappedChunks | None", array: zarr.Array | None):
        self.directory, self.shape, self.dtype, self.mapped, self.array = directory, shape, dtype, mapped, array

    @classmethod
    def open(cls, directory: Path) -> "RowArray":
        """The array stored at ``directory``. Its metadata is read here, without zarr, when it is a
        plain zarr v3 array document: opening through zarr cost 2-3 ms per array (its event loop),
        as much as reading a shard's worth of rows when a training window moves on."""
        metadata = _array_metadata(directory)
        if metadata is None:  # another zarr layout or version: zarr reads it (and raises what is wrong)
            array = zarr.open_array(directory, mode="r")
            return cls(directory, tuple(array.shape), array.dtype, None, array)
        shape, dtype = tuple(int(n) for n in metadata["shape"]), np.dtype(metadata["data_type"])
        mapped = MappedChunks.open(metadata, shape, dtype, directory) if shape and shape[0] else None
        if mapped is None and shape and shape[0]:
            log.debug("%s: not laid out for memory mapping; reading through zarr", directory)
        return cls(directory, shape, dtype, mapped, None if mapped else zarr.open_array(directory, mode="r"))

    @classmethod
    def in_memory(cls, files: Mapping[str, Any], name: str, label: Path) -> "RowArray":
        """Array ``name`` of a zarr v3 group held in memory (``files``: each path under the group,
        ``<name>/zarr.json`` and its shard file ``<name>/c/0/...``, to its bytes), read as a mapped
        one is. Only the layout the writer makes can be read so; another is a ValueError."""
        metadata = _numeric_array(_document(files.get(f"{name}/zarr.json"), "array"))
        if metadata is None:
            raise ValueError(f"{label}: not a zarr v3 array of a numeric type")
        shape, dtype = tuple(int(n) for n in metadata["shape"]), np.dtype(metadata["data_type"])
        mapped = None
        if shape and shape[0]:
            data = files.get(f"{name}/c/" + "/".join(["0"] * len(shape)))
            mapped = None if data is None else MappedChunks.of_buffer(metadata, shape, dtype, data, label / "c")
            if mapped is None:
                raise ValueError(f"{label}: not one file of uncompressed chunks in row order")
        return cls(label, shape, dtype, mapped, None)

    def rows(self, rows: np.ndarray | slice, out: np.ndarray | None = None, at: np.ndarray | None = None) -> np.ndarray:
        """The rows; with ``out``, written into ``out[at]`` (default ``at``: 0, 1, ...) and ``out`` returned."""
        if self.mapped is not None:
            return self.mapped.rows(rows, self.check_reads, out, at)
        try:
            if isinstance(rows, slice):
                found = np.asarray(self.array[rows])
            else:
                rows = np.asarray(rows, dtype=np.int64)
                found = (
                    np.asarray(self.array.get_orthogonal_selection((rows,)))
                    if len(rows)
                    else np.zeros((0, *self.shape[1:]), self.dtype)
                )
        except (OSError, ValueError, RuntimeError) as err:  # truncated or corrupt chunk data, a failed crc32c
            raise CacheFormatError(
                f"{self.directory}: unreadable ({type(err).__name__}: {err}); run `rs-cache verify` and `rs-cache repair`"
            ) from None
        return found if out is None else place_rows(found, out, at)


def place_rows(found: np.ndarray, out: np.ndarray, at: np.ndarray | None) -> np.ndarray:
    """``out`` with ``found[k]`` written into ``out[at[k]]`` (default ``at``: 0, 1, ...)."""
    out[np.arange(len(found)) if at is None else at] = found
    return out


def open_group(directory: Path, names: list[str]) -> dict[str, "RowArray"]:
    """The arrays ``names`` of the zarr v3 group at ``directory``, whose own ``zarr.json`` must say
    it is one (a damaged group document is an error even though the arrays can be read without it)."""
    if _zarr_document(directory, "group") is None:
        raise ValueError(f"{directory / 'zarr.json'}: not a zarr v3 group document")
    return {name: RowArray.open(directory / name) for name in names}


def open_group_in_memory(files: Mapping[str, Any], names: list[str], label: Path) -> dict[str, "RowArray"]:
    """``open_group`` of a group held in memory (``RowArray.in_memory``'s ``files``); ``label``
    names it in errors."""
    if _document(files.get("zarr.json"), "group") is None:
        raise ValueError(f"{label / 'zarr.json'}: not a zarr v3 group document")
    return {name: RowArray.in_memory(files, name, label / name) for name in names}


def _array_metadata(directory: Path) -> dict | None:
    """The array's ``zarr.json`` when it is a zarr v3 array of a plain numeric type, else None."""
    return _numeric_array(_zarr_document(directory, "array"))


def _numeric_array(metadata: dict | None) -> dict | None:
    if metadata is None or not isinstance(metadata.get("data_type"), str) or metadata["data_type"] not in NUMERIC_TYPES:
        return None
    return metadata


def _zarr_document(directory: Path, node_type: str) -> dict | None:
    """``directory/zarr.json`` when it is a zarr v3 document of a ``node_type`` node, else None
    (missing too; text that is not JSON raises ValueError)."""
    try:
        return _document((directory / "zarr.json").read_bytes(), node_type)
    except FileNotFoundError:
        return None


def _document(text: Any, node_type: str) -> dict | None:
    """``text`` (bytes of a ``zarr.json``; None: missing) when it is a zarr v3 document of a
    ``node_type`` node, else None (text that is not JSON raises ValueError)."""
    if text is None:
        return None
    metadata = json.loads(bytes(text))
    if not isinstance(metadata, dict) or metadata.get("zarr_format") != 3 or metadata.get("node_type") != node_type:
        return None
    return metadata


class MappedChunks:
    """The chunks of a single zarr shard file, memory-mapped: ``chunks[c, i]`` is row
    ``c * chunk_rows + i``; with ``crc`` each chunk is checked once, before its first read."""

    def __init__(self, path: Path, chunks: np.ndarray, crc: np.ndarray | None, length: int, version: os.stat_result | None):
        self.path, self.chunks, self.crc, self.length = path, chunks, crc, length
        self.chunk_rows = chunks.shape[1]
        # 1 where the chunk's crc32c has passed, in this process or another of the user's (cache/ledger.py);
        # bytes in memory (no file version) are this process's alone
        if crc is None:
            self.checked = None
        else:
            self.checked = checked_flags(path, version, len(chunks)) if version is not None else np.zeros(len(chunks), np.uint8)

    @classmethod
    def open(cls, metadata: dict, shape: tuple, dtype: np.dtype, directory: Path) -> "MappedChunks | None":
        """The mapping when the single shard file holds uncompressed chunks in row order (each
        followed by its crc32c, or not: caches written before), else None."""
        layout = _contiguous_layout(metadata, shape, dtype)
        if layout is None:
            return None
        path = directory / "c" / "/".join(["0"] * len(shape))
        record, count, index_bytes = _chunk_record(shape, dtype, *layout)
        try:
            with open(path, "rb") as handle:  # one open: the map, its index and its version are one file's
                data_end = handle.seek(-index_bytes, 2)
                start = _first_chunk(handle.read(index_bytes - INDEX_TRAILER), record, count, data_end)
                if start is None:
                    return None
                mapped = np.memmap(handle, dtype=record, mode="r", offset=start, shape=(count,))
                version = os.fstat(handle.fileno())  # of the file mapped, even if the path is replaced meanwhile
        except OSError:
            return None
        return cls._of_records(path, np.asarray(mapped), shape[0], version)  # without np.memmap's per-index Python code

    @classmethod
    def of_buffer(cls, metadata: dict, shape: tuple, dtype: np.dtype, data: Any, path: Path) -> "MappedChunks | None":
        """``open`` of the shard file's bytes held in memory (``path`` names them in errors)."""
        layout = _contiguous_layout(metadata, shape, dtype)
        if layout is None:
            return None
        record, count, index_bytes = _chunk_record(shape, dtype, *layout)
        data = np.frombuffer(data, np.uint8)
        data_end = len(data) - index_bytes
        start = _first_chunk(data[data_end : len(data) - INDEX_TRAILER], record, count, data_end) if data_end >= 0 else None
        if start is None:
            return None
        return cls._of_records(path, np.frombuffer(data, record, count, start), shape[0], None)

    @classmethod
    def _of_records(cls, path: Path, records: np.ndarray, length: int, version: os.stat_result | None) -> "MappedChunks":
        crc = records["crc"] if "crc" in records.dtype.names else None
        return cls(path, records["rows"], crc, length, version)

    def rows(
        self, rows: np.ndarray | slice, check: bool, out: np.ndarray | None = None, at: np.ndarray | None = None
    ) -> np.ndarray:
        """The rows (see ``RowArray.rows``), each chunk's crc32c checked before its first read when ``check``."""
        if isinstance(rows, slice):
            rows = np.arange(self.length)[rows]
        rows = np.asarray(rows, dtype=np.int64)
        chunk, within = np.divmod(rows, self.chunk_rows)
        unchecked = check and self.checked is not None and not self.checked[chunk].all()
        if out is None and not unchecked:  # the usual case: checked before
            return self.chunks[chunk, within]  # fancy index: one memcpy per row
        if unchecked and self.chunk_rows > 1:  # a chunk shared by many selections: checked whole, once
            self._check_mapped(chunk)
            if out is None:
                return self.chunks[chunk, within]
            unchecked = False
        if out is None:
            out = np.empty((len(rows), *self.chunks.shape[2:]), self.chunks.dtype)
        # Row by row into its place (a batch's own buffer: no copy of the gather afterwards). One
        # row per chunk (a feature map) is checked right after its copy, while it is still in the
        # CPU's cache (a second pass over the pages, or over a whole batch's copy, reads memory
        # again: about three times the check's own cost).
        chunks, checked, crc = self.chunks, self.checked, self.crc  # the loop is the read's overhead: kept bare
        places = range(len(rows)) if at is None else np.asarray(at).tolist()
        for place, chunk_index, row_index in zip(places, chunk.tolist(), within.tolist()):
            out[place] = chunks[chunk_index, row_index]
            if unchecked and not checked[chunk_index]:
                if fast_crc32.iscsi(out[place : place + 1]) != int(crc[chunk_index]):
                    self._fail(chunk_index)
                checked[chunk_index] = 1
        return out

    def _check_mapped(self, chunks: np.ndarray) -> None:
        for chunk in np.unique(chunks[self.checked[chunks] == 0]).tolist():
            if fast_crc32.iscsi(np.ascontiguousarray(self.chunks[chunk])) != int(self.crc[chunk]):
                self._fail(chunk)
            self.checked[chunk] = 1

    def _fail(self, chunk: int) -> None:
        first = chunk * self.chunk_rows
        raise CacheFormatError(
            f"{self.path}: rows {first}-{min(first + self.chunk_rows, self.length) - 1} fail their crc32c "
            "check: the file is damaged; run `rs-cache verify` and `rs-cache repair` on the cache"
        )


def _chunk_record(shape: tuple, dtype: np.dtype, chunk_rows: int, with_crc: bool) -> tuple[np.dtype, int, int]:
    """(one chunk's record: its rows, then its crc32c if it has one; the chunk count; the bytes of
    the shard index at the file's end)."""
    fields = [("rows", dtype.newbyteorder("<"), (chunk_rows, *shape[1:]))]
    count = _round_up(shape[0], chunk_rows) // chunk_rows
    return np.dtype(fields + ([("crc", "<u4")] if with_crc else [])), count, count * 16 + INDEX_TRAILER


def _first_chunk(index_data: bytes | np.ndarray, record: np.dtype, count: int, data_end: int) -> int | None:
    """Offset of the first chunk when the shard index puts all ``count`` chunks in row order, one
    record apart, before ``data_end``; else None (not this layout, or a damaged index: zarr's read
    checks the index's crc32c)."""
    index = np.frombuffer(index_data, "<u8").reshape(count, 2)
    start = int(index[0, 0])
    expected = start + np.arange(count, dtype=np.uint64) * np.uint64(record.itemsize)
    in_order = (index[:, 0] == expected).all() and (index[:, 1] == record.itemsize).all()
    if (index[:, 0] == NO_CHUNK).any() or not in_order or start + count * record.itemsize > data_end:
        return None
    return start


def _contiguous_layout(metadata: dict, shape: tuple, dtype: np.dtype) -> tuple[int, bool] | None:
    """(rows per chunk, whether each chunk carries a crc32c) when the array (its ``zarr.json``) is
    one shard file of uncompressed little-endian chunks of whole rows, else None."""
    codecs = metadata.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    sharding = codecs[0]["configuration"]
    names = [c["name"] for c in sharding["codecs"]]
    if sharding.get("index_location", "end") != "end" or names not in (["bytes"], ["bytes", "crc32c"]):
        return None
    if sharding["codecs"][0].get("configuration", {}).get("endian", "little") != "little" and dtype.itemsize > 1:
        return None
    if tuple(sharding["chunk_shape"][1:]) != shape[1:]:
        return None
    if metadata.get("chunk_grid", {}).get("name") != "regular" or metadata.get("storage_transformers"):
        return None
    if int(metadata["chunk_grid"]["configuration"]["chunk_shape"][0]) < shape[0]:
        return None  # more than one shard file
    return int(sharding["chunk_shape"][0]), names[-1] == "crc32c"
