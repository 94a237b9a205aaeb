"""What made a set of metrics, as ``results.md`` and ``*.metrics.json`` both record it: the
methods and head, the cache's identity, the annotation file, the proposal source, the protocol
and this package's version. A page or a metrics file found later says, with hashes, what it is of."""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from regionspot_cache import __version__
from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.format import PROVENANCE_FILE
from regionspot_cache.data.proposals import GROUND_TRUTH
from regionspot_cache.runtime.files import sha256_file

PACKAGE = "regionspot-cache"


def package_version() -> str:
    """The installed distribution's version; the source tree's when it is run uninstalled."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return __version__


@dataclass(frozen=True)
class FileRecord:
    """A file read by the run: its absolute path and the SHA-256 of its bytes."""

    path: str
    sha256: str

    @staticmethod
    def of(path: Path | str) -> FileRecord:
        return FileRecord(str(Path(path).resolve()), sha256_file(path))


@dataclass(frozen=True)
class CacheRecord:
    """The cache that was scored: where, the SHA-256 of its ``cache.json``, and the identity
    fields worth reading without opening it (dataset, boxes, SAM, CLIP, feature dtype)."""

    path: str
    cache_json_sha256: str
    dataset: str
    box_source: str
    feature_dtype: str
    sam: dict[str, Any]
    clip: dict[str, Any]
    weights: dict[str, str | None]  # the weight files the models were read from

    @staticmethod
    def of(cache_dir: Path | str) -> CacheRecord:
        reader = CacheReader(cache_dir)
        recorded = reader.location.read_bytes(PROVENANCE_FILE)
        provenance = reader.provenance
        local = reader.location.local
        root = str(local.resolve()) if local is not None else str(reader.location)
        return CacheRecord(
            root,
            hashlib.sha256(recorded).hexdigest(),
            provenance.dataset,
            provenance.box_source,
            str(provenance.feature_dtype),
            provenance.sam.to_dict(),
            provenance.clip.to_dict(),
            provenance.weights.to_paths(),
        )


@dataclass(frozen=True)
class ProposalSource:
    """The boxes scored: ``gt``, a proposal set named in the manifest, or a file given by path;
    for the last two, the file that was read."""

    name: str
    file: FileRecord | None = None


@dataclass(frozen=True)
class EvalProvenance:
    methods: tuple[str, ...]
    head: FileRecord | None  # the head of ``regionspot``; None when no method used one
    cache: CacheRecord
    annotations: FileRecord
    proposals: ProposalSource
    settings: dict[str, Any]  # the protocol, the open-set rule, a partial cache's share (``api.run_settings``)
    package_version: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "methods": list(self.methods)}

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) lines for a page's table: the JSON, flattened to dotted keys."""
        return list(_flat(self.to_json(), ""))


def _flat(value: Any, prefix: str):
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _flat(inner, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, "-" if value is None else (", ".join(map(str, value)) if isinstance(value, list) else str(value))


def record_provenance(
    cache_dir: Path | str,
    annotation_file: Path | str,
    settings: dict[str, Any],
    methods: Sequence[str],
    head_file: Path | str | None = None,
    proposals: str = GROUND_TRUTH,
    proposals_file: Path | str | None = None,
) -> EvalProvenance:
    """The provenance of one evaluation (one or several methods on the same boxes): each file
    hashed as it is now, so that record it before anything can change it."""
    return EvalProvenance(
        tuple(str(m) for m in methods),
        FileRecord.of(head_file) if head_file is not None else None,
        CacheRecord.of(cache_dir),
        FileRecord.of(annotation_file),
        ProposalSource(proposals, FileRecord.of(proposals_file) if proposals_file is not None else None),
        {key: value for key, value in settings.items()},
        package_version(),
    )
