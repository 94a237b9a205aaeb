"""``propose``: an open-vocabulary detector over a dataset, into a proposal file.

The runner has extraction's shape: the dataset's images in id order, ``shard_size`` per shard;
a distributor (``InProcess`` or ``Dask``) runs ``worker.propose_shard`` on each pending shard,
which writes the shard's file atomically; shard files already present (same identity) are
skipped, so re-running after a kill resumes. When every shard is written, the proposal file (a
COCO results list: ``image_id``, ``bbox`` x, y, w, h in original pixels, ``score``, and the
detector's class as ``category_id``, -1 when prompted class-agnostic) is assembled from them and written atomically, with its
``ProposalProvenance`` beside it (``<file>.provenance.json``), which ``extract --boxes`` and
``eval --proposals`` check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from regionspot_cache import __version__
from regionspot_cache.data.datasets import DetectionDataset
from regionspot_cache.data.proposals import ProposalProvenance, images_digest, vocabulary_digest
from regionspot_cache.errors import ConfigError
from regionspot_cache.extract.plan import shard_entries
from regionspot_cache.progress import progress_bar
from regionspot_cache.propose.detectors import Detector, detector_family, load_detector, resolve_model_dir, weights_digest
from regionspot_cache.propose.distribute import Distributor, InProcess
from regionspot_cache.propose.select import Selection
from regionspot_cache.propose.worker import Prompting, ProposeWork, ShardOutcome
from regionspot_cache.propose.writer import ProposalWriter
from regionspot_cache.runtime.devices import resolve_device


@dataclass
class ProposeSummary:
    output: Path
    images: int = 0
    boxes: int = 0
    failed_images: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    failed_shards: dict[int, str] = field(default_factory=dict)
    provenance: ProposalProvenance | None = None  # None while shards failed (no proposal file written)

    def record(self, outcome: ShardOutcome) -> None:
        if outcome.error:
            self.failed_shards[outcome.shard_id] = outcome.error
            return
        self.images += outcome.images
        self.boxes += outcome.boxes
        self.failed_images += outcome.failed
        self.shards_written += 1


def run_proposals(
    dataset: DetectionDataset,
    output: Path | str,
    detector: str,
    selection: Selection = Selection(),
    shard_size: int = 64,
    device: str = "auto",
    distributor: Distributor | None = None,
    max_shards: int | None = None,
    loaded: Detector | None = None,
    prompting: Prompting = Prompting(),
) -> ProposeSummary:
    """Detect on every image of ``dataset`` and write the proposal file ``output``.

    Arguments:
      dataset: the images (id order decides the shards) and the vocabulary the detector is
        prompted with (``categories``; names with ``_`` read as spaces).
      output: the proposal file; its shards go to ``<output>.shards/``.
      detector: a Hugging Face model id or a local directory (``resolve_model_dir``).
      selection: score floor, class-agnostic NMS IoU, top K per image, names per chunk.
      shard_size: images per shard file.
      device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
      distributor: ``InProcess()`` (default) or ``Dask(...)``.
      max_shards: write at most this many pending shards, then stop without assembling (tests
        and partial runs; a later run resumes).
      loaded: a detector already loaded from ``detector`` (benchmarks reuse one), for ``InProcess``.
      prompting: the dataset's names (``vocabulary``, each box with its class) or one generic
        prompt (``agnostic``, each box with category id -1).

    Returns:
      A ``ProposeSummary``; its ``provenance`` is that of the file written, None when shards
      are still missing or failed.
    """
    selection.validate()
    prompting = prompting.validate()
    if shard_size < 1:
        raise ConfigError(f"shard_size {shard_size} must be at least 1")
    started = time.perf_counter()
    output = Path(output)
    model_dir = resolve_model_dir(detector)
    provenance = make_provenance(dataset, detector, model_dir, selection, shard_size, prompting)
    writer = ProposalWriter(output, provenance).open()
    shards = list(shard_entries(dataset.images, shard_size))
    committed = writer.committed_shards()
    pending = [(shard_id, entries) for shard_id, entries in shards if shard_id not in committed]
    summary = ProposeSummary(output, shards_skipped=len(shards) - len(pending))
    work = ProposeWork(
        dataset.image_root,
        *prompting.prompts(dataset.categories),
        selection,
        output,
        provenance,
        model_dir,
        device,
    )
    to_run = pending if max_shards is None else pending[:max_shards]
    distributor = distributor or InProcess()

    def load() -> Detector:
        return loaded or load_detector(model_dir, resolve_device(device))

    with progress_bar(f"propose {dataset.name}", sum(len(entries) for _, entries in to_run)) as (bar, task):
        for outcome in distributor.run(work, to_run, load, writer):
            summary.record(outcome)
            bar.update(task, advance=outcome.images)
    if len(to_run) == len(pending) and not summary.failed_shards:
        summary.provenance = writer.assemble([shard_id for shard_id, _ in shards])
    summary.seconds = time.perf_counter() - started
    return summary


def make_provenance(
    dataset: DetectionDataset,
    detector: str,
    model_dir: Path,
    selection: Selection,
    shard_size: int,
    prompting: Prompting = Prompting(),
) -> ProposalProvenance:
    import transformers

    return ProposalProvenance(
        detector=detector,
        detector_family=detector_family(model_dir),
        weights_sha256=weights_digest(model_dir),
        dataset=dataset.name,
        vocabulary_sha256=vocabulary_digest(dataset.categories),
        num_classes=len(dataset.categories),
        images_sha256=images_digest(dataset),
        chunk_size=selection.chunk_size,
        min_score=selection.min_score,
        top_k=selection.top_k,
        nms_iou=selection.nms_iou,
        shard_size=shard_size,
        package_version=__version__,
        transformers_version=transformers.__version__,
        prompt=prompting.mode,
        prompt_text=prompting.recorded_text,
    )
