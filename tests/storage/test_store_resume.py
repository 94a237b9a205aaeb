"""``kill -9`` during an extraction to object storage (S3, and the GCS and Azure emulators), then
the same command again: the cache equals an uninterrupted run's, object for object and byte for
byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import psutil
import pytest

from regionspot_cache.cache import CacheReader
from regionspot_cache.cli import app
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from tests.helpers import extract_args, python, wait_until
from tests.storage.roundtrip import objects, runner

IMAGES = 6  # one shard each: the kill lands with shards still to write, and three stores stay quick


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("store_resume")
    annotations = generate_split(root, "val", SyntheticSpec(images=IMAGES, seed=8, min_size=64, max_size=80, max_objects=2))
    manifest = root / "toy.toml"
    manifest.write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    return root, manifest, tiny_models


def _args(dataset, cache: str) -> list[str]:
    """The extraction, in the calling process: what is tested is the store's commit and resume,
    which the writer does alike under either distributor (a local dask cluster started in the
    killed process cost it a fork server of its own, 5-8 s)."""
    root, manifest, models = dataset
    return [*extract_args(manifest, root, cache, models, "extract.shard_size=1", "extract.threads=1"), "--in-process"]


def _committed(fs, key: str) -> list[str]:
    return fs.glob(f"{key}/shards/*/checksums.json")


def _gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _extract_until_killed(dataset, store, cache: str, log) -> tuple[list[str], int]:
    """Run the extraction in a process of its own, SIGKILL it once a shard is committed; the commit records
    it left and its pid. The trigger is the store's own listing, not a clock."""
    key, fs = cache.partition("://")[2], store.filesystem()
    # stderr to a file, not a pipe: nobody reads a pipe while we poll
    process = python(["-m", "regionspot_cache", *_args(dataset, cache)], {**os.environ, **store.env()}, subprocess.DEVNULL, log)

    def committed_or_ended() -> bool:
        fs.invalidate_cache()
        return bool(_committed(fs, key)) or process.poll() is not None

    wait_until(committed_or_ended, "a committed shard", watched=[process], poll_s=0.1)
    try:
        workers = psutil.Process(process.pid).children(recursive=True)  # any it started
    except psutil.Error:  # it ended on its own (the assertion on the shards says so)
        workers = []
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # None may write while the resume runs.
    wait_until(lambda: all(map(_gone, workers)), "the dead run's workers")
    fs.invalidate_cache()
    return _committed(fs, key), process.pid


def test_kill_9_during_extraction_then_resume_is_bit_identical(store, dataset, tmp_path):
    reference = store.url("reference")
    result = runner.invoke(app, _args(dataset, reference))
    assert result.exit_code == 0, result.output

    cache = store.url("killed")
    log = tmp_path / "extract.log"
    committed, pid = _extract_until_killed(dataset, store, cache, log)
    assert 1 <= len(committed) < IMAGES, f"the kill did not land during the extraction: {log.read_text()[-2000:]}"
    key, fs = cache.partition("://")[2], store.filesystem()
    # The dead run's lease, which the resume below must take over rather than wait for. SeaweedFS
    # and Azurite honour the conditional create, so there the resume succeeds only through the
    # takeover (a dead holder on this machine). The GCS emulator ignores ifGenerationMatch=0 (GCS
    # honours it): there the resume overwrites the lease, and only the cache's bytes are checked.
    assert json.loads(fs.cat_file(f"{key}/.extract.lock"))["pid"] == pid

    # What a writer killed mid-upload leaves: objects of a shard without its commit record.
    fs.pipe_file(f"{key}/shards/{IMAGES - 1:06d}/images.parquet", b"half-written")
    assert len(CacheReader(cache)) == len(committed)  # only committed shards are read

    result = runner.invoke(app, _args(dataset, cache))
    assert result.exit_code == 0, result.output
    assert objects(store.filesystem(), cache) == objects(store.filesystem(), reference)
