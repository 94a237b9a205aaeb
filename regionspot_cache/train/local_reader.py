"""Reading a cache through a ``ShardCache``'s local copies: its directory, or its memory.

``LocalShardReader`` is a ``CacheReader`` whose shards come from the shard cache, waiting for each
to be fetched; the loader's sources are re-opened through it (``open_local_sources``)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.format import FEATURES_DIR, SHARDS_DIR, shard_name
from regionspot_cache.cache.reader import ShardFeatures
from regionspot_cache.errors import CacheFormatError
from regionspot_cache.train.data import TrainSource
from regionspot_cache.train.shard_cache import FAILED_FILE, WAIT_LIMIT_S, WAIT_POLL_S
from regionspot_cache.train.views import open_views

if TYPE_CHECKING:
    from regionspot_cache.train.shard_cache import ShardCache


def open_local_sources(sources: Sequence[TrainSource], cache: "ShardCache", views: Sequence[str]) -> list[TrainSource]:
    """``sources`` read through ``cache``'s local copies (view caches other than the identity are
    still read where they are)."""
    local = []
    for i, source in enumerate(sources):
        reader = LocalShardReader.of(source.reader, cache.local_dir(i), cache if cache.in_memory else None)
        local.append(replace(source, reader=reader, views=open_views(reader, views)))
    return local


class LocalShardReader(CacheReader):
    """A ``CacheReader`` of ``root`` whose shard files are read from ``local_dir`` (a ``ShardCache``'s
    ``local_dir(source)``), waiting for each shard to be fetched there. The maps of shards evicted
    meanwhile are closed whenever it opens another shard (once per window), freeing their blocks."""

    def __init__(self, root: Path | str, local_dir: Path, memory: "ShardCache | None" = None):
        super().__init__(root)
        self.local_dir, self.memory = Path(local_dir), memory
        self._identities: dict[int, tuple[int, int]] = {}

    @classmethod
    def of(cls, reader: CacheReader, local_dir: Path, memory: "ShardCache | None" = None) -> "LocalShardReader":
        """``reader``'s manifests and identity as they are (on object storage, not read again);
        ``memory``: the shard cache holding the shards in this process's memory (``in_memory``)."""
        local = cls.__new__(cls)
        local.__dict__.update(reader.__getstate__())
        local.local_dir, local.memory, local._identities = Path(local_dir), memory, {}
        return local

    def shard_dir(self, shard: int) -> Path:
        if self.memory is not None:  # its arrays are opened from memory (_open_arrays): no directory to wait for
            raise RuntimeError(f"shard {shard} of {self.local_dir} is held in memory, not in a directory")
        where = self.local_dir / SHARDS_DIR / shard_name(shard)
        waited = 0.0
        while not where.is_dir():
            failed = self.local_dir.parent / FAILED_FILE
            if failed.is_file():
                raise CacheFormatError(f"{where}: never fetched: {failed.read_text()}")
            if waited > WAIT_LIMIT_S:
                raise CacheFormatError(f"{where}: not fetched after {WAIT_LIMIT_S:.0f} s")
            time.sleep(WAIT_POLL_S)
            waited += WAIT_POLL_S
        return where

    def features_dir(self, shard: int) -> Path:
        return self.shard_dir(shard) / FEATURES_DIR  # the local copy, of a cache on object storage too

    def _arrays(self, shard: int):  # noqa: ANN202 - ShardFeatures
        if shard not in self._opened:
            self._close_evicted()
            features = super()._arrays(shard)
            self._identities[shard] = self._identity(shard)
            return features
        return self._opened[shard]

    def _open_arrays(self, shard: int):  # noqa: ANN202 - ShardFeatures
        if self.memory is None:
            return super()._open_arrays(shard)
        files, prefix = self.memory.files_of(self.local_dir, shard), f"{FEATURES_DIR}/"
        features = {name.removeprefix(prefix): data for name, data in files.items() if name.startswith(prefix)}
        where = self.local_dir / SHARDS_DIR / shard_name(shard) / FEATURES_DIR  # in errors: the shard, in memory
        return ShardFeatures.open(where, self.expected_shapes(shard), self.provenance.feature_dtype, features)

    def _identity(self, shard: int) -> tuple[int, int]:
        """Which copy of the shard is there now: its directory's inode and change time, or in
        memory its files' identity; (-1, -1) when evicted."""
        if self.memory is None:
            return _identity(self.local_dir / SHARDS_DIR / shard_name(shard))
        files = self.memory.present_files(self.local_dir, shard)
        return (-1, -1) if files is None else (id(files), 0)

    def _close_evicted(self) -> None:
        """Drop the maps of shards evicted (or evicted and fetched again) since they were opened."""
        for shard in list(self._opened):
            if self._identity(shard) != self._identities.get(shard):
                del self._opened[shard]
                self._identities.pop(shard, None)

    def __getstate__(self) -> dict:
        if self.memory is not None:
            raise RuntimeError("a shard cache in memory is read in its own process only (train.num_workers=0)")
        return {**super().__getstate__(), "_identities": {}}


def _identity(path: Path) -> tuple[int, int]:
    try:
        status = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    return (status.st_ino, status.st_ctime_ns)
