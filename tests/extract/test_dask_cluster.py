"""``rs-cache extract --scheduler`` on a real dask cluster: a scheduler and two workers started as
their own processes on loopback. One worker is killed while it encodes a shard: its shards run
again on the other, and the cache equals an in-process extraction bit for bit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from regionspot_cache.cache import CacheReader, verify_cache
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from tests.helpers import model_args, wait_until


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    environ = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    with open(log, "wb") as out:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, env=environ, start_new_session=True
        )


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture
def cluster(tmp_path):
    """A dask scheduler and two single-threaded workers (no nanny: a killed worker stays dead)."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    port = address.rsplit(":", 1)[1]
    scheduler = _start(
        ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"], tmp_path / "scheduler.log"
    )
    workers = {
        name: _start(
            ["distributed.cli.dask_worker", address, "--name", name, "--nthreads", "1", "--no-nanny", "--no-dashboard"],
            tmp_path / f"{name}.log",
        )
        for name in ("w0", "w1")
    }
    from distributed import Client

    everyone, clients = [scheduler, *workers.values()], []

    def connected() -> bool:  # retried while the scheduler lives: a slow start only takes longer
        try:
            clients.append(Client(address))
        except (OSError, TimeoutError):
            return False
        return True

    # No deadline: each wait fails as soon as the scheduler or a worker dies, or all of them stall.
    wait_until(connected, "the dask scheduler", must_live=everyone)
    client = clients[0]
    wait_until(lambda: len(client.scheduler_info()["workers"]) >= 2, "two dask workers", must_live=everyone)
    try:
        yield address, client, workers, scheduler
    finally:
        client.close()
        for process in [*workers.values(), scheduler]:
            _kill(process)


def _extract_command(manifest: Path, cache: Path, models, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "regionspot_cache",
        "extract",
        "-m",
        str(manifest),
        "-c",
        str(cache),
        *model_args(models),
        # one shard per image, one thread in every process: the same bits wherever a shard runs
        "--set",
        "extract.shard_size=1",
        "--set",
        "extract.batch_size=1",
        "--set",
        "extract.num_workers=0",
        "--set",
        "extract.device=cpu",
        "--set",
        "extract.threads=1",
        *extra,
    ]


def _busy_worker(client, cache: Path) -> str | None:
    """The name of a worker encoding a shard once at least one shard is committed, else None."""
    shards = cache / "shards"
    if not shards.is_dir() or not any(not p.name.startswith(".") for p in shards.iterdir()):
        return None
    names = {address: info["name"] for address, info in client.scheduler_info()["workers"].items()}
    busy = [names[address] for address, keys in client.processing().items() if keys and address in names]
    return busy[0] if busy else None


def test_worker_killed_mid_run_its_shards_run_on_the_other_and_the_cache_is_bit_identical(
    tmp_path, tiny_models, encoders, cluster
):
    address, client, workers, scheduler = cluster
    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=6, seed=5, min_size=64, max_size=96))
    manifest = tmp_path / "toy.toml"
    manifest.write_text(f'name = "toy"\nannotations = "{annotations}"\nimage_root = "{tmp_path / "images"}"\n')
    reference = tmp_path / "reference"
    dataset = load_coco_format(annotations, tmp_path / "images", name="toy")
    run_extraction(
        dataset,
        CacheTarget(reference),
        encoders,
        ExtractConfig(shard_size=1, batch_size=1, num_workers=0, device="cpu", threads=1),
    )

    cache = tmp_path / "cluster"
    log = tmp_path / "extract.log"
    with open(log, "wb") as out:  # a file, not a pipe: nobody reads a pipe while we poll
        command = _extract_command(manifest, cache, tiny_models, "--scheduler", address, "--retries", "2")
        run = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    busy: list[str] = []

    def busy_or_ended() -> bool:
        busy.extend(filter(None, [_busy_worker(client, cache)]))
        return bool(busy) or run.poll() is not None

    everyone = [scheduler, *workers.values()]
    wait_until(busy_or_ended, "a worker encoding a shard", must_live=everyone, watched=[run], poll_s=0.05)
    assert busy, "the extraction ended before a worker could be killed mid-shard:\n" + log.read_text()
    _kill(workers[busy[0]])
    survivors = [scheduler, *(process for name, process in workers.items() if name != busy[0])]
    wait_until(lambda: run.poll() is not None, "the extraction to end", must_live=survivors, watched=[run])
    assert run.returncode == 0, log.read_text()

    assert verify_cache(cache) == []
    mine, theirs = CacheReader(cache), CacheReader(reference)
    assert sorted(mine.image_ids()) == sorted(theirs.image_ids()) and len(mine.image_ids()) == 6
    for image_id in theirs.image_ids():
        for field in ("boxes", "tokens", "feature_map"):
            np.testing.assert_array_equal(getattr(mine.image(image_id), field), getattr(theirs.image(image_id), field))
