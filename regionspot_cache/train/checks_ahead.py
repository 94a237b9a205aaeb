"""The batch sampler that hands the shards of coming batches to a crc32c checker process
(``cache/checks_ahead.py``) before the loader reads them, so training's reads find their chunks
checked. The batches and their order are the sampler's own: only when each is handed on changes.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Callable, Iterator

from torch.utils.data import Sampler

from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.checks_ahead import ChecksAhead
from regionspot_cache.runtime.devices import usable_cpus
from regionspot_cache.train.data import Key, MultiSourceRegions

LEAD_BATCHES = 64  # how far ahead of the loader the checker is told: ~1,000 images at batch 16


def checks_ahead_have_a_core(num_workers: int) -> bool:
    """Whether the checker gets a core of its own beside the training process and its loader
    workers; else the reads check (on a copy still in the CPU's cache: less work in all than the
    checker's second pass over the bytes, which would take from the workers' cores)."""
    return min(num_workers, usable_cpus()) + 2 <= usable_cpus()


class CheckedAheadSampler(Sampler):
    """``sampler``'s batches, each yielded once the shards of the ``lead`` batches after it were
    requested from a checker process (started on the first request, ended with the iteration)."""

    def __init__(
        self,
        sampler: Sampler,
        regions: MultiSourceRegions,
        lead: int = LEAD_BATCHES,
        checks: Callable[[], ChecksAhead] = ChecksAhead,
    ):
        self.sampler, self.regions, self.lead, self.checks = sampler, regions, lead, checks

    def __iter__(self) -> Iterator[list[Key]]:
        checks = self.checks()
        shards = [source.shards() for source in self.regions.sources]
        requested: set[tuple[int, int]] = set()
        window: deque[list[Key]] = deque()
        try:
            for batch in self.sampler:
                for source, _, index in batch:
                    shard = (source, int(shards[source][index]))
                    if shard not in requested:
                        requested.add(shard)
                        for directory in self._features_dirs(*shard):
                            checks.request(directory)
                window.append(batch)
                if len(window) > self.lead:
                    yield window.popleft()
            yield from window
        finally:
            checks.close()

    def _features_dirs(self, source: int, shard: int) -> list[Path]:
        """The shard's feature directories in every view the source reads, where they are local
        files already (a remote cache's or a fetched copy's shards land later, read checked)."""
        readers = {id(r): r for view in self.regions.sources[source].views for r in (view.maps, view.boxes)}
        return [r.features_dir(shard) for r in readers.values() if type(r) is CacheReader and not r.location.remote]
