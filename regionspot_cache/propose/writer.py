"""Where ``propose`` writes: one JSON file per shard under ``<file>.shards/``, then the proposal
file (a COCO results list) assembled from them, and its provenance beside it.

Every file is written aside and renamed (``runtime.write_json``), so a run killed at any moment
leaves whole shard files or none; the next run skips the shards it finds and assembles the same
bytes as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from regionspot_cache.data.datasets import DatasetError, read_json
from regionspot_cache.data.proposals import ProposalProvenance, provenance_path
from regionspot_cache.runtime.files import remove_abandoned_temps, sha256_file, write_json
from regionspot_cache.runtime.records import differences

RUN_FILE = "run.json"  # the shards' identity: a resumed run must match it


@dataclass
class ShardRecord:
    """One shard's proposals: COCO results records, in image id order, and its failed images."""

    shard_id: int
    images: int
    results: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # image id -> reason

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard_id, "images": self.images, "results": self.results, "failed": self.failed}

    @classmethod
    def from_json(cls, path: Path, data: Any) -> ShardRecord:
        try:
            return cls(int(data["shard"]), int(data["images"]), list(data["results"]), dict(data["failed"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{path}: not a proposal shard file: {err!r}") from None


def records(image_id: int, xyxy: np.ndarray, category_ids: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
    """COCO results of one image: ``bbox`` x, y, w, h in original pixels (float32 values)."""
    xyxy = np.asarray(xyxy, np.float32).reshape(-1, 4)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    return [
        {"image_id": image_id, "category_id": c, "bbox": box, "score": s}
        for box, c, s in zip(xywh.tolist(), np.asarray(category_ids).tolist(), np.asarray(scores, np.float32).tolist())
    ]


class ProposalWriter:
    """The shard directory of one proposal file, tied to one identity (``ProposalProvenance``)."""

    def __init__(self, output: Path, provenance: ProposalProvenance):
        self.output = Path(output)
        self.shard_dir = self.output.with_name(f"{self.output.name}.shards")
        self.provenance = provenance

    def open(self) -> ProposalWriter:
        """Create the shard directory, or reopen it if it was made with the same identity."""
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned_temps(self.shard_dir, r"\d{6}\.json|run\.json")
        run_file = self.shard_dir / RUN_FILE
        wanted = self.provenance.identity()
        if run_file.is_file():
            # Read as a record, so that a field added since (with its default) is no difference.
            recorded = ProposalProvenance.from_json(run_file, read_json(run_file, "proposal run record")).identity()
            changed = differences(recorded, wanted, "{key}")
            if changed:
                raise DatasetError(
                    f"{self.shard_dir}: shards were made with other settings ({', '.join(changed)}); "
                    "delete the directory to start afresh, or write to another file"
                )
        else:
            write_json(run_file, wanted, indent=2)
        return self

    def shard_path(self, shard_id: int) -> Path:
        return self.shard_dir / f"{shard_id:06d}.json"

    def committed_shards(self) -> set[int]:
        return {int(p.stem) for p in self.shard_dir.glob("[0-9]" * 6 + ".json")}

    def write_shard(self, record: ShardRecord) -> Path:
        return write_json(self.shard_path(record.shard_id), record.to_json())

    def read_shard(self, shard_id: int) -> ShardRecord:
        path = self.shard_path(shard_id)
        return ShardRecord.from_json(path, read_json(path, "proposal shard"))

    def assemble(self, shard_ids: Sequence[int]) -> ProposalProvenance:
        """Write the proposal file from the shards (in id order) and its provenance beside it."""
        results: list[dict[str, Any]] = []
        failed: dict[str, str] = {}
        images = 0
        for shard_id in sorted(shard_ids):
            shard = self.read_shard(shard_id)
            results += shard.results
            failed.update(shard.failed)
            images += shard.images
        write_json(self.output, results)
        provenance = ProposalProvenance(
            **{
                **self.provenance.to_json(),
                "proposals_sha256": sha256_file(self.output),
                "images": images,
                "failed_images": failed,
            }
        )
        write_json(provenance_path(self.output), provenance.to_json(), indent=2)
        return provenance
