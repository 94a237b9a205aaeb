"""``kill -9`` during an extraction to object storage (S3, and the GCS and Azure emulators), then
the same command again: the cache equals an uninterrupted run's, object for object and byte for
byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from regionspot_cache.cache import CacheReader
from regionspot_cache.cli import app
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from tests.helpers import extract_args, wait_until
from tests.storage.roundtrip import objects, runner

IMAGES = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("store_resume")
    annotations = generate_split(root, "val", SyntheticSpec(images=IMAGES, seed=8, min_size=64, max_size=80, max_objects=2))
    manifest = root / "toy.toml"
    manifest.write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    return root, manifest, tiny_models


def _args(dataset, cache: str) -> list[str]:
    root, manifest, models = dataset
    return extract_args(manifest, root, cache, models, "extract.shard_size=1", "extract.threads=1")


def _committed(fs, key: str) -> list[str]:
    return fs.glob(f"{key}/shards/*/checksums.json")


def _extract_until_killed(dataset, store, cache: str, log) -> list[str]:
    """Run the extraction in a subprocess, SIGKILL it once a shard is committed; the commit records
    it left. The trigger is the store's own listing, not a clock."""
    key, fs = cache.partition("://")[2], store.filesystem()
    with open(log, "wb") as err:  # a file, not a pipe: nobody reads a pipe while we poll
        command = [sys.executable, "-m", "regionspot_cache", *_args(dataset, cache)]
        process = subprocess.Popen(command, env={**os.environ, **store.env()}, stdout=subprocess.DEVNULL, stderr=err)

    def committed_or_ended() -> bool:
        fs.invalidate_cache()
        return bool(_committed(fs, key)) or process.poll() is not None

    wait_until(committed_or_ended, "a committed shard", watched=[process], poll_s=0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    fs.invalidate_cache()
    return _committed(fs, key)


def test_kill_9_during_extraction_then_resume_is_bit_identical(store, dataset, tmp_path):
    reference = store.url("reference")
    result = runner.invoke(app, _args(dataset, reference))
    assert result.exit_code == 0, result.output

    cache = store.url("killed")
    log = tmp_path / "extract.log"
    committed = _extract_until_killed(dataset, store, cache, log)
    assert 1 <= len(committed) < IMAGES, f"the kill did not land during the extraction: {log.read_text()[-2000:]}"
    key, fs = cache.partition("://")[2], store.filesystem()
    # The dead run's lease, which the resume below must take over rather than wait for: on S3 and
    # Azure its creation is conditional, so the resume goes through the takeover (a dead holder on
    # this machine). The GCS emulator ignores ifGenerationMatch=0 (GCS honours it), so there the
    # resume overwrites the lease without the takeover: only the cache's bytes are checked on GCS.
    assert fs.exists(f"{key}/.extract.lock")

    # What a writer killed mid-upload leaves: objects of a shard without its commit record.
    fs.pipe_file(f"{key}/shards/{IMAGES - 1:06d}/images.parquet", b"half-written")
    assert len(CacheReader(cache)) == len(committed)  # only committed shards are read

    result = runner.invoke(app, _args(dataset, cache))
    assert result.exit_code == 0, result.output
    assert objects(store.filesystem(), cache) == objects(store.filesystem(), reference)
