"""Shards as tasks on a real multi-process local dask cluster."""

from __future__ import annotations

import os

import numpy as np

from regionspot_cache.cache import CacheReader, verify_cache
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.distribute import run_distributed
from regionspot_cache.extract.runner import run_extraction

CONFIG = ExtractConfig(shard_size=2, batch_size=2, num_workers=0, device="cpu")


def test_two_worker_cluster_matches_in_process_run_and_reports_a_bad_shard(tmp_path, tiny_models, encoders):
    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=7, seed=8, min_size=64, max_size=96))
    dataset = load_coco_format(annotations, tmp_path / "images", name="toy")
    run_extraction(dataset, tmp_path / "reference", tiny_models, CONFIG, encoders=encoders)
    # A shard whose final name is taken by a file cannot commit: it fails every try, alone.
    (tmp_path / "dask" / "shards").mkdir(parents=True)
    blocker = tmp_path / "dask" / "shards" / "000002"
    blocker.write_text("in the way")
    environ = dict(os.environ)
    summary = run_distributed(dataset, tmp_path / "dask", tiny_models, CONFIG, workers=2, retries=1, encoders=encoders)
    assert dict(os.environ) == environ  # starting dask workers must not change our environment
    assert summary.shards_written == 3 and list(summary.failed_shards) == [2]
    assert "000002" in summary.failed_shards[2]
    reference, distributed = CacheReader(tmp_path / "reference"), CacheReader(tmp_path / "dask")
    assert sorted(distributed.image_ids()) == sorted(i for i in reference.image_ids() if i not in (5, 6))
    for image_id in distributed.image_ids():
        # Workers run torch single-threaded: equal up to the last bit of float16.
        for field in ("tokens", "feature_map"):
            np.testing.assert_allclose(getattr(distributed.image(image_id), field), getattr(reference.image(image_id), field),
                                       rtol=2e-3, atol=2e-3)
    blocker.unlink()
    again = run_distributed(dataset, tmp_path / "dask", tiny_models, CONFIG, workers=1, encoders=encoders)
    assert (again.shards_written, again.shards_skipped, again.failed_shards) == (1, 3, {})
    assert verify_cache(tmp_path / "dask") == [] and len(CacheReader(tmp_path / "dask").image_ids()) == 7
