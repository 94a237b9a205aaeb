"""An extraction killed with SIGKILL mid-shard resumes to a cache equal to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

import numpy as np

from regionspot_cache.cache import CacheReader, verify_cache
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from tests.helpers import python, wait_until

# One intra-op thread in both processes: CPU results in the last float16 bit depend on the count.
CONFIG = ExtractConfig(shard_size=2, batch_size=1, num_workers=0, device="cpu", threads=1)

WORKER = textwrap.dedent(
    """
    import sys
    from regionspot_cache.config import ClipSpec, ExtractConfig, ModelsConfig, SamSpec
    from regionspot_cache.data.datasets import load_coco_format
    from regionspot_cache.extract.runner import CacheTarget, extract_dataset
    annotations, images, cache, sam, clip_model, clip = sys.argv[1:]
    models = ModelsConfig(SamSpec("tiny", sam), ClipSpec(clip_model, clip))
    config = ExtractConfig(shard_size=2, batch_size=1, num_workers=0, device="cpu", threads=1)
    extract_dataset(load_coco_format(annotations, images, name="toy"), CacheTarget(cache), models, config)
    """
)


def _values(cache) -> dict:
    reader = CacheReader(cache)
    return {i: (reader.image(i).boxes, reader.image(i).tokens, reader.image(i).feature_map) for i in reader.image_ids(False)}


def test_sigkill_mid_shard_then_resume_equals_uninterrupted(tmp_path, tiny_models, encoders):
    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=10, seed=4, min_size=64, max_size=96))
    dataset = load_coco_format(annotations, tmp_path / "images", name="toy")
    reference = tmp_path / "reference"
    run_extraction(dataset, CacheTarget(reference), encoders, CONFIG)

    killed = tmp_path / "killed"
    args = [
        str(annotations),
        str(tmp_path / "images"),
        str(killed),
        tiny_models.sam.checkpoint,
        tiny_models.clip.model,
        tiny_models.clip.pretrained,
    ]
    process = python(["-c", WORKER, *args], stderr=subprocess.DEVNULL)
    shards = killed / "shards"
    wait_until(  # no deadline: it fails if the run stalls, and ends the wait if the run ends
        lambda: process.poll() is not None or (shards.is_dir() and any(p.name.isdigit() for p in shards.iterdir())),
        "a committed shard",
        watched=[process],
        poll_s=0.01,
    )
    time.sleep(0.15)  # into the next shard
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    committed = [p.name for p in shards.iterdir() if p.name.isdigit()]
    assert 1 <= len(committed) < 5, "the kill must land mid-run"
    assert len(CacheReader(killed).image_ids(False)) == 2 * len(committed)  # readers see whole shards only

    summary = run_extraction(dataset, CacheTarget(killed), encoders, CONFIG)
    assert summary.shards_skipped == len(committed) and summary.shards_written == 5 - len(committed)
    assert not any(p.name.startswith(".tmp-") for p in shards.iterdir())
    assert verify_cache(killed) == []
    expected, resumed = _values(reference), _values(killed)
    assert expected.keys() == resumed.keys()
    for image_id, arrays in expected.items():
        for want, got in zip(arrays, resumed[image_id]):
            np.testing.assert_array_equal(got, want)
