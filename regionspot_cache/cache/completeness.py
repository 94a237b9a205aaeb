"""What a cache holds now: its content digest, and whether it holds every shard it planned.

``content_digest`` changes whenever a shard is committed, removed or re-extracted (it hashes each
shard's recorded checksums), so an artifact built from a cache (the region index) can tell that
it is stale. ``check_complete`` is called by each command that reads a cache whole (``train``,
``eval``, ``search``): a cache with shards missing (a killed extraction, a shard that failed)
would otherwise be trained on or scored as if it were all of the dataset, giving a lower AP
without a word. Refused by default; ``allow_partial`` proceeds and says which fraction it read.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from regionspot_cache.cache.format import CHECKSUMS_FILE, SHARDS_DIR, shard_name
from regionspot_cache.cache.reader import CacheReader
from regionspot_cache.errors import CacheFormatError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completeness:
    """The shards a cache planned and those committed: ``fraction`` of them is there."""

    cache: Path
    planned: int
    missing: tuple[int, ...]

    @property
    def fraction(self) -> float:
        return 1.0 if not self.planned else (self.planned - len(self.missing)) / self.planned

    @property
    def complete(self) -> bool:
        return not self.missing

    def to_dict(self) -> dict:
        return {
            "cache": str(self.cache),
            "shards_planned": self.planned,
            "shards_missing": list(self.missing),
            "fraction_of_shards": round(self.fraction, 6),
        }


def completeness(reader: CacheReader) -> Completeness:
    committed = {int(path.name) for path in reader.shard_dirs}
    planned = reader.provenance.planned_shards
    return Completeness(reader.root, planned, tuple(sorted(set(range(planned)) - committed)))


def check_complete(reader: CacheReader, allow_partial: bool, kind: str = "") -> Completeness:
    """The cache's completeness; refused (naming the missing shards and the command that completes
    them) unless it is complete or ``allow_partial``, in which case the fraction is logged."""
    found = completeness(reader)
    if found.complete:
        return found
    shown = ", ".join(map(str, found.missing[:8])) + (", ..." if len(found.missing) > 8 else "")
    what = f"{len(found.missing)} of its {found.planned} planned shards are not committed ({shown})"
    if not allow_partial:
        raise CacheFormatError(
            f"{reader.location}: {what}; complete it by running the same `rs-cache extract`{kind} again (it resumes "
            "and extracts only those), or pass --allow-partial to use the committed shards alone"
        )
    logger.warning("%s: %s; --allow-partial: using %.1f%% of the planned shards", reader.location, what, 100 * found.fraction)
    return found


def content_digest(reader: CacheReader) -> str:
    """SHA-256 over the committed shards' names and recorded checksums (no feature byte is read:
    each shard's checksums.json already hashes its files; on object storage, fetched concurrently)."""
    digest = hashlib.sha256()
    names = [shard_name(shard) for shard in reader.shard_ids]
    recorded = reader.location.read_many([f"{SHARDS_DIR}/{name}/{CHECKSUMS_FILE}" for name in names])
    for name, checksums in zip(names, recorded):
        digest.update(name.encode())
        digest.update(b"-" if checksums is None else checksums)
    return digest.hexdigest()
