"""Two extractions on one cache, a full disk during a shard commit, NaN/Inf from an encoder,
and decompression bombs: clear errors or per-image statuses, nothing committed half-way."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from regionspot_cache.cache import CacheBusyError, CacheFormatError, CacheReader, exclusive_extraction, verify_cache
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction

CONFIG = ExtractConfig(shard_size=2, batch_size=2, num_workers=0, device="cpu")


@pytest.fixture()
def toy(tmp_path):
    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=5, seed=3, min_size=64, max_size=80))
    return load_coco_format(annotations, tmp_path / "images", name="toy")


def test_a_second_extraction_on_the_same_cache_is_refused(toy, tmp_path, tiny_models, encoders):
    holder = textwrap.dedent(
        """
        import sys, time
        from regionspot_cache.cache import exclusive_extraction
        with exclusive_extraction(sys.argv[1]):
            print("held", flush=True)
            time.sleep(60)
        """
    )
    cache = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-c", holder, str(cache)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(CacheBusyError, match=rf"{cache}: another rs-cache extract \(pid {process.pid} on .*\) is writing"):
            run_extraction(toy, CacheTarget(cache), encoders, CONFIG)
        assert not (cache / "shards").exists()  # refused before touching anything
    finally:
        process.kill()
        process.wait()
    # The lock died with its holder (even by SIGKILL): the next run goes ahead.
    summary = run_extraction(toy, CacheTarget(cache), encoders, CONFIG)
    assert summary.shards_written == 3 and verify_cache(cache) == []
    with exclusive_extraction(cache):  # and released it when done
        pass


def test_full_disk_during_a_commit_commits_nothing_and_a_later_run_completes(toy, tmp_path, tiny_models, encoders, monkeypatch):
    cache = tmp_path / "cache"
    real_write = pq.write_table
    calls = {"n": 0}

    def write_until_full(table, where, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the 2nd file of the 2nd shard
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_until_full)
    with pytest.raises(
        CacheFormatError, match=rf"{cache}: no space left on the device while writing shard 1: nothing of it was committed"
    ):
        run_extraction(toy, CacheTarget(cache), encoders, CONFIG)
    monkeypatch.setattr(pq, "write_table", real_write)
    shards = sorted(p.name for p in (cache / "shards").iterdir())
    assert shards == ["000000"]  # shard 0 intact, no half-written shard 1, no temp left
    assert verify_cache(cache) == []
    summary = run_extraction(toy, CacheTarget(cache), encoders, CONFIG)
    assert summary.shards_skipped == 1 and summary.shards_written == 2
    assert len(CacheReader(cache).image_ids()) == 5


def test_non_finite_encoder_output_fails_the_image_not_the_cache(toy, tmp_path, tiny_models, encoders, monkeypatch):
    real = encoders.clip.feature_maps

    def poisoned(pixels):
        maps = real(pixels)
        maps[0, 3, 1] = float("nan")  # the first image of every batch
        return maps

    monkeypatch.setattr(encoders.clip, "feature_maps", poisoned)
    cache = tmp_path / "cache"
    summary = run_extraction(toy, CacheTarget(cache), encoders, CONFIG)
    reader = CacheReader(cache)
    statuses = {i: reader.status(i) for i in reader.image_ids(only_ok=False)}
    failed = {i for i, (status, _) in statuses.items() if status == "failed"}
    assert summary.failed == len(failed) == 3  # batches of 2 over shards of 2, 2 and 1 images
    assert all(statuses[i][1] == "non-finite values (NaN or Inf) in the CLIP feature map" for i in failed)
    for image_id in reader.image_ids():
        assert np.isfinite(reader.image(image_id).feature_map).all()


def test_float16_overflow_counts_as_non_finite(toy, tmp_path, tiny_models, encoders, monkeypatch):
    real = encoders.sam.box_tokens
    monkeypatch.setattr(encoders.sam, "box_tokens", lambda *a, **k: real(*a, **k) * 1e6)  # beyond float16's 65504
    summary = run_extraction(toy, CacheTarget(tmp_path / "cache"), encoders, CONFIG)
    reasons = {CacheReader(tmp_path / "cache").status(i)[1] for i in range(1, 6)}
    assert summary.failed == 5 and reasons == {"non-finite values (NaN or Inf) in the SAM box tokens"}


def test_images_over_the_pixel_limit_are_refused_before_decoding(toy, tmp_path, tiny_models, encoders):
    entry = toy.images[0]
    limit = entry.width * entry.height - 1
    cache = tmp_path / "cache"
    config = ExtractConfig(shard_size=2, batch_size=2, num_workers=0, device="cpu", max_image_pixels=limit)
    summary = run_extraction(toy, CacheTarget(cache), encoders, config)
    status, reason = CacheReader(cache).status(entry.id)
    assert status == "failed" and f"more than the limit of {limit} (extract.max_image_pixels)" in reason
    assert summary.failed == sum(e.width * e.height > limit for e in toy.images)
