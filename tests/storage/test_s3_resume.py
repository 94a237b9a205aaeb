"""``kill -9`` during an extraction to S3, then the same command again: the cache equals an
uninterrupted run's, object for object and byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from regionspot_cache.cache import CacheReader
from regionspot_cache.cli import app
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from tests.helpers import extract_args, wait_until

runner = CliRunner()
IMAGES = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("s3_resume")
    annotations = generate_split(root, "val", SyntheticSpec(images=IMAGES, seed=8, min_size=64, max_size=80, max_objects=2))
    manifest = root / "toy.toml"
    manifest.write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    return root, manifest, tiny_models


def _args(dataset, cache: str) -> list[str]:
    root, manifest, models = dataset
    return extract_args(manifest, root, cache, models, "extract.shard_size=1", "extract.threads=1")


def _objects(fs, key: str) -> dict[str, bytes]:
    found = {path.removeprefix(key + "/"): fs.cat_file(path) for path in fs.find(key)}
    found.pop("extraction_cost.json")  # wall seconds of the runs
    return found


def _committed(fs, key: str) -> list[str]:
    return fs.glob(f"{key}/shards/*/checksums.json")


def test_kill_9_during_extraction_then_resume_is_bit_identical(s3_env, dataset, tmp_path):
    reference = f"s3://{s3_env.new_prefix()}/reference"
    result = runner.invoke(app, _args(dataset, reference))
    assert result.exit_code == 0, result.output

    cache = f"s3://{s3_env.new_prefix()}/killed"
    key, fs = cache.removeprefix("s3://"), s3_env.filesystem()
    env = {**os.environ, **s3_env.env()}
    log = tmp_path / "extract.log"
    with open(log, "wb") as err:  # a file, not a pipe: nobody reads a pipe while we poll
        command = [sys.executable, "-m", "regionspot_cache", *_args(dataset, cache)]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)

    def committed_or_ended() -> bool:
        fs.invalidate_cache()
        return bool(_committed(fs, key)) or process.poll() is not None

    wait_until(committed_or_ended, "a committed shard", watched=[process], poll_s=0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    fs.invalidate_cache()
    committed = _committed(fs, key)
    assert 1 <= len(committed) < IMAGES, f"the kill did not land during the extraction: {log.read_text()[-2000:]}"
    assert fs.exists(f"{key}/.extract.lock")  # the dead run's lease: taken over, not waited for

    # What a writer killed mid-upload leaves: objects of a shard without its commit record.
    half = f"{key}/shards/{IMAGES - 1:06d}"
    fs.pipe_file(f"{half}/images.parquet", b"half-written")
    assert len(CacheReader(cache)) == len(committed)  # only committed shards are read

    result = runner.invoke(app, _args(dataset, cache))
    assert result.exit_code == 0, result.output
    fs.invalidate_cache()
    assert _objects(fs, key) == _objects(fs, reference.removeprefix("s3://"))
