"""What each shard was extracted from (its ``input.json``), and whether the dataset's image files
still hold the bytes it was extracted from.

``input.json`` records at commit ``sha256``, over the shard's image ids, file names, sizes and boxes
(compared whenever a re-run would skip the shard: extract/plan.py, cheap), and ``image_bytes``, the
content digest of each image file (data/images.py). Comparing those means reading every image file
again, so it runs on demand: ``rs-cache verify --images``, ``extract --check-images``, ``repair
--images``. Shards committed before the digests were recorded have only ``sha256``: their images
cannot be checked, and each check says how many such shards it met.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from regionspot_cache.cache.format import INPUT_FILE
from regionspot_cache.cache.storage import SHARDS_DIR, CacheLocation, shard_name
from regionspot_cache.data.datasets import DatasetError, DetectionDataset
from regionspot_cache.errors import CacheFormatError
from regionspot_cache.runtime.devices import usable_cpus
from regionspot_cache.runtime.files import CONTENT_DIGEST, file_content_digest

IMAGE_BYTES_KEY = "image_bytes"
MAX_READ_THREADS = 32  # file reads and hashing both release the GIL; network file systems like many readers


@dataclass(frozen=True)
class ShardInput:
    """A shard's ``input.json``: ``sha256`` of its images and boxes as given, and ``images``, the
    content digest of each image file by image id (None: the shard predates them)."""

    sha256: str
    images: dict[int, str] | None = None

    def to_json(self) -> str:
        data: dict = {"sha256": self.sha256}
        if self.images is not None:
            digests = {str(image_id): digest for image_id, digest in sorted(self.images.items())}
            data[IMAGE_BYTES_KEY] = {"algorithm": CONTENT_DIGEST, "digests": digests}
        return json.dumps(data)

    @staticmethod
    def read(location: CacheLocation, shard_id: int) -> ShardInput | None:
        """The record of committed shard ``shard_id``; None for shards written before records were."""
        relative = f"{SHARDS_DIR}/{shard_name(shard_id)}/{INPUT_FILE}"
        try:
            data = json.loads(location.read_bytes(relative).decode("utf-8"))
            recorded, images = data.get(IMAGE_BYTES_KEY), None
            if recorded is not None and recorded["algorithm"] == CONTENT_DIGEST:
                images = {int(image_id): str(digest) for image_id, digest in recorded["digests"].items()}
            return ShardInput(str(data["sha256"]), images)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CacheFormatError(
                f"{location.path(relative)}: damaged ({err}); run `rs-cache verify` and `rs-cache repair`"
            ) from None


class ImageDigests:
    """The content digests of a dataset's image files, each file read once however many caches
    (a cache, its views, its proposals caches) ask for it, by a pool of reading threads."""

    def __init__(self, dataset: DetectionDataset, threads: int | None = None):
        self.dataset = dataset
        self.entries = {entry.id: entry for entry in dataset.images}
        self.threads = threads or min(MAX_READ_THREADS, 2 * usable_cpus())
        self.known: dict[int, str | None] = {}
        self.read_files = 0

    def of(self, image_ids: Iterable[int]) -> dict[int, str | None]:
        """Digest by image id (of the dataset's images; None: the file cannot be read now)."""
        wanted = [i for i in dict.fromkeys(image_ids) if i in self.entries and i not in self.known]
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="rs-cache-digest") as pool:
            self.known.update(zip(wanted, pool.map(self._digest, wanted)))
        self.read_files += len(wanted)
        return {i: self.known[i] for i in image_ids if i in self.known}

    def _digest(self, image_id: int) -> str | None:
        try:
            return file_content_digest(self.dataset.image_path(self.entries[image_id]))
        except DatasetError:
            return None


@dataclass(frozen=True)
class ImageProblem:
    shard: int
    image_id: int
    file_name: str
    problem: str
    stale: bool  # its bytes differ from those extracted: the shard's features are stale


@dataclass
class ImageCheck:
    """What ``check_image_contents`` found in one cache."""

    cache: str
    problems: list[ImageProblem] = field(default_factory=list)
    checked_images: int = 0
    unrecorded_shards: list[int] = field(default_factory=list)  # committed before digests were recorded
    unreadable_shards: list[int] = field(default_factory=list)  # input.json damaged: verify names it, repair mends it

    @property
    def stale_shards(self) -> list[int]:
        return sorted({p.shard for p in self.problems if p.stale})


def check_image_contents(
    cache: Path | str | CacheLocation, digests: ImageDigests, only_shards: Iterable[int] | None = None
) -> ImageCheck:
    """Compare the image bytes each committed shard of ``cache`` (or of ``only_shards``) recorded
    with the files of ``digests.dataset`` now: a replaced image, one no longer readable, one no
    longer in the dataset."""
    location = CacheLocation.parse(cache)
    committed = sorted(location.committed_shards(SHARDS_DIR))
    if only_shards is not None:
        committed = sorted(set(committed) & set(only_shards))
    check = ImageCheck(str(location))
    for shard in committed:
        try:
            record = ShardInput.read(location, shard)
        except CacheFormatError:  # damage the checksums find too: reported, the other shards still checked
            check.unreadable_shards.append(shard)
            continue
        if record is None or record.images is None:
            check.unrecorded_shards.append(shard)
            continue
        current = digests.of(record.images)
        for image_id, recorded in record.images.items():
            entry = digests.entries.get(image_id)
            if entry is None:
                check.problems.append(ImageProblem(shard, image_id, "?", "no longer in the dataset", False))
                continue
            check.checked_images += 1
            now = current[image_id]
            if now is None:
                problem = ImageProblem(shard, image_id, entry.file_name, "cannot be read now", False)
            elif now != recorded:
                problem = ImageProblem(shard, image_id, entry.file_name, "bytes differ from those extracted", True)
            else:
                continue
            check.problems.append(problem)
    return check


def describe(problem: ImageProblem) -> str:
    return f"shard {shard_name(problem.shard)}: image {problem.image_id} ({problem.file_name}): {problem.problem}"
