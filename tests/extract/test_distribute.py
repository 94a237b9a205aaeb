"""Shards as tasks on a real multi-process local dask cluster."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import psutil

from regionspot_cache.cache import CacheReader, verify_cache
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.distribute import Dask, dask_client
from regionspot_cache.extract.runner import CacheTarget, run_extraction

CONFIG = ExtractConfig(shard_size=2, batch_size=2, num_workers=0, device="cpu")


def test_two_worker_cluster_matches_in_process_run_and_reports_a_bad_shard(tmp_path, tiny_models, encoders):
    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=7, seed=8, min_size=64, max_size=96))
    dataset = load_coco_format(annotations, tmp_path / "images", name="toy")
    run_extraction(dataset, CacheTarget(tmp_path / "reference"), encoders, CONFIG)
    # A shard whose final name is taken by a file cannot commit: it fails every try, alone.
    (tmp_path / "dask" / "shards").mkdir(parents=True)
    blocker = tmp_path / "dask" / "shards" / "000002"
    blocker.write_text("in the way")
    environ = dict(os.environ)
    summary = run_extraction(dataset, CacheTarget(tmp_path / "dask"), encoders, CONFIG, distributor=Dask(workers=2, retries=1))
    assert dict(os.environ) == environ  # starting dask workers must not change our environment
    assert summary.shards_written == 3 and list(summary.failed_shards) == [2]
    assert "000002" in summary.failed_shards[2]
    reference, distributed = CacheReader(tmp_path / "reference"), CacheReader(tmp_path / "dask")
    assert sorted(distributed.image_ids()) == sorted(i for i in reference.image_ids() if i not in (5, 6))
    for image_id in distributed.image_ids():
        # Workers run the encoders with the caller's thread count: the same bits as in-process.
        for field in ("tokens", "feature_map"):
            np.testing.assert_array_equal(getattr(distributed.image(image_id), field), getattr(reference.image(image_id), field))
    blocker.unlink()
    again = run_extraction(dataset, CacheTarget(tmp_path / "dask"), encoders, CONFIG, distributor=Dask(workers=1))
    assert (again.shards_written, again.shards_skipped, again.failed_shards) == (1, 3, {})
    assert verify_cache(tmp_path / "dask") == [] and len(CacheReader(tmp_path / "dask").image_ids()) == 7


def test_repair_and_proposals_run_on_dask_through_the_one_runner(tmp_path, tiny_models, encoders):
    import json

    from regionspot_cache.data.proposals import with_box_source
    from regionspot_cache.extract.proposals import cache_with_boxes
    from regionspot_cache.extract.repair import repair_cache

    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=4, seed=9, min_size=64, max_size=80))
    dataset = load_coco_format(annotations, tmp_path / "images", name="toy")
    cache = tmp_path / "cache"
    run_extraction(dataset, CacheTarget(cache), encoders, CONFIG)
    before = CacheReader(cache).image(CacheReader(cache).image_ids()[0]).tokens
    (cache / "shards" / "000000" / "boxes.parquet").write_bytes(b"damaged")
    repaired = repair_cache(cache, dataset, "gt", CONFIG, tiny_models, encoders, distributor=Dask(workers=1))
    assert list(repaired.damaged) == ["000000"] and repaired.extraction.shards_written == 1
    assert verify_cache(cache) == []
    np.testing.assert_array_equal(CacheReader(cache).image(CacheReader(cache).image_ids()[0]).tokens, before)

    proposals = {str(i): {"boxes": [[1, 1, 30, 30]], "scores": [0.5], "labels": [1]} for i in CacheReader(cache).image_ids()}
    (tmp_path / "glip.json").write_text(json.dumps(proposals))
    boxed, source = with_box_source(dataset, None, str(tmp_path / "glip.json"))
    target = cache_with_boxes(cache, boxed, source, CONFIG, tiny_models, encoders, distributor=Dask(workers=1))
    assert target != cache and len(CacheReader(target).boxes) == 4 and verify_cache(target) == []


def test_a_local_cluster_is_closed_when_the_run_fails(monkeypatch):
    import pytest

    from regionspot_cache.extract import distribute

    closed = []

    @contextmanager
    def cluster(workers):
        try:
            yield None
        finally:
            closed.append(True)

    class BrokenClient:
        def __init__(self, cluster):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, *args, **kwargs):
            raise RuntimeError("scheduler went away")

    monkeypatch.setattr(distribute, "local_cluster", cluster)
    monkeypatch.setattr(distribute, "Client", BrokenClient)
    work = distribute.ExtractionWork(None, None, None, CONFIG, None)
    monkeypatch.setattr(distribute, "_task_work", lambda work, entries: work)
    with pytest.raises(RuntimeError, match="went away"):
        list(Dask(workers=1).run(work, [(0, [])], None, None, lambda images, boxes: None))
    assert closed == [True]


def test_local_workers_start_from_the_preloaded_server_in_the_callers_environment_of_now(monkeypatch):
    """Workers are forked from a server that imported the extraction code once, and run in the
    caller's environment as it is when the cluster starts, not the one the server started with."""
    monkeypatch.setenv("RS_CACHE_PROBE_GONE", "set before the first cluster")
    with dask_client(None, 1) as client:
        assert client.submit(os.getenv, "RS_CACHE_PROBE_GONE", pure=False).result() == "set before the first cluster"
    monkeypatch.delenv("RS_CACHE_PROBE_GONE")
    monkeypatch.setenv("RS_CACHE_PROBE_NEW", "set since")
    with dask_client(None, 1) as client:
        assert client.submit(os.getenv, "RS_CACHE_PROBE_GONE", pure=False).result() is None
        assert client.submit(os.getenv, "RS_CACHE_PROBE_NEW", pure=False).result() == "set since"
        assert client.submit(os.getenv, "OMP_NUM_THREADS", pure=False).result() == "1"  # the nanny's settings stay
        server = psutil.Process(client.submit(os.getppid, pure=False).result()).cmdline()
    assert "multiprocessing.forkserver" in " ".join(server) and "regionspot_cache.extract.distribute" in " ".join(server)


def test_workers_are_spawned_where_a_too_long_tmpdir_leaves_no_room_for_the_servers_socket(request):
    from regionspot_cache.extract.distribute import worker_start_method

    assert worker_start_method() == "forkserver"
    request.getfixturevalue("too_long_tmpdir")
    assert worker_start_method() == "spawn"
