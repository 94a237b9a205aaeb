"""SIGKILL at seeded random moments, then resume: every trial must end identical to an
uninterrupted run, with ``verify`` clean. Runs are forked from the test process (models already
loaded), so a trial costs a second, not an interpreter start."""

from __future__ import annotations

import csv
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from regionspot_cache.cache import CacheReader, verify_cache
from regionspot_cache.config import ExtractConfig, TrainConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import load_head
from regionspot_cache.train.loop import run_dir_for, train_head

TRIALS = 20
BATCHES = 4  # trials run as BATCHES tests of TRIALS // BATCHES each, so no test runs long
SEED = 20261124
EXTRACT = ExtractConfig(shard_size=2, batch_size=1, num_workers=0, device="cpu")
TRAIN = TrainConfig(
    iterations=40, batch_size=2, lr=1e-3, warmup_iters=4, lr_steps=[30], max_boxes_per_image=3, checkpoint_every=4, device="cpu"
)
FORK = multiprocessing.get_context("fork")


def _in_child(work: Callable[[], object]) -> None:
    torch.set_num_threads(1)  # the same in every run: results are then bit-reproducible
    work()


def _run(work: Callable[[], object], kill_after: float | None = None) -> bool:
    """Run ``work`` in a forked process, SIGKILLed after ``kill_after`` seconds; True if the kill
    landed before it finished."""
    process = FORK.Process(target=_in_child, args=(work,))
    process.start()
    if kill_after is None:
        process.join()
        assert process.exitcode == 0, f"run failed with exit code {process.exitcode}"
        return False
    process.join(kill_after)
    if process.exitcode is None:
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    return process.exitcode == -signal.SIGKILL


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    _run(work)
    return time.perf_counter() - started


def _kill_moments(duration: float, rng: np.random.Generator) -> list[float]:
    """One or two kills per trial (the second during the resume), at random moments of a run."""
    return [float(rng.uniform(0.05, 1.0) * duration) for _ in range(1 + int(rng.random() < 0.3))]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_trials")
    annotations = generate_split(
        root, "train", SyntheticSpec(images=6, seed=6, min_size=64, max_size=80, min_objects=1, max_objects=2)
    )
    return root, load_coco_format(annotations, root / "images", name="toy")


def _cache_values(cache: Path) -> dict:
    reader = CacheReader(cache)
    return {
        i: [reader.image(i).boxes, reader.image(i).tokens, reader.image(i).feature_map]
        if reader.status(i)[0] == "ok"
        else reader.status(i)
        for i in reader.image_ids(only_ok=False)
    }


@pytest.fixture(scope="module")
def extraction_reference(toy, encoders, tmp_path_factory):
    """How long an uninterrupted extraction takes, and what it writes."""
    _, dataset = toy
    cache = tmp_path_factory.mktemp("reference_cache") / "cache"
    duration = _timed(_extraction(dataset, encoders, cache))
    return duration, _cache_values(cache)


def _extraction(dataset, encoders, cache: Path) -> Callable[[], object]:
    return lambda: run_extraction(dataset, CacheTarget(cache), encoders, EXTRACT)


@pytest.mark.parametrize("batch", range(BATCHES))
def test_extraction_killed_at_random_moments_resumes_identically(toy, encoders, extraction_reference, tmp_path, batch):
    _, dataset = toy
    duration, expected = extraction_reference
    rng, landed, trials = np.random.default_rng([SEED, batch]), 0, TRIALS // BATCHES
    for trial in range(trials):
        cache = tmp_path / f"trial{trial}"
        for moment in _kill_moments(duration, rng):
            landed += _run(_extraction(dataset, encoders, cache), kill_after=moment)
        _run(_extraction(dataset, encoders, cache))  # resume to the end
        assert verify_cache(cache) == [], f"trial {trial}"
        assert not list((cache / "shards").glob(".tmp-*")), f"trial {trial}: a killed writer's leftovers remain"
        got = _cache_values(cache)
        assert got.keys() == expected.keys(), f"trial {trial}"
        for image_id, values in expected.items():
            for want, have in zip(values, got[image_id]):
                np.testing.assert_array_equal(have, want, err_msg=f"trial {trial}, image {image_id}")
        shutil.rmtree(cache)
    print(f"extraction: {trials} trials, {landed} kills landed mid-run, {trials} resumed identical")
    assert landed >= 1, f"no kill of {trials} trials landed mid-run"


def _losses(output: Path) -> list[tuple[str, str]]:
    with open(run_dir_for(output) / "metrics.csv") as handle:
        return [(row["step"], row["loss"]) for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def training_reference(toy, encoders, tmp_path_factory):
    """The cache trained on, how long an uninterrupted training takes, its losses and head."""
    _, dataset = toy
    cache = tmp_path_factory.mktemp("training_cache") / "cache"
    run_extraction(dataset, CacheTarget(cache), encoders, EXTRACT)
    reference = tmp_path_factory.mktemp("reference_head") / "head.safetensors"
    duration = _timed(_training(cache, reference))
    expected = _losses(reference)
    assert len(expected) == TRAIN.iterations
    return cache, duration, expected, load_head(reference)[0]


def _training(cache: Path, output: Path) -> Callable[[], object]:
    return lambda: train_head(cache, output, TRAIN)


@pytest.mark.parametrize("batch", range(BATCHES))
def test_training_killed_at_random_moments_resumes_identically(training_reference, tmp_path, batch):
    cache, duration, expected, expected_head = training_reference
    rng, landed, trials = np.random.default_rng([SEED + 1, batch]), 0, TRIALS // BATCHES
    for trial in range(trials):
        output = tmp_path / f"trial{trial}" / "head.safetensors"
        for moment in _kill_moments(duration, rng):
            landed += _run(_training(cache, output), kill_after=moment)
        _run(_training(cache, output))
        assert _losses(output) == expected, f"trial {trial}: losses differ from the uninterrupted run"
        head, _ = load_head(output)
        for key, value in expected_head.state_dict().items():
            assert head.state_dict()[key].equal(value), f"trial {trial}: {key}"
        assert not list((run_dir_for(output) / "state").glob(".tmp-*")), f"trial {trial}: temp state left"
        shutil.rmtree(output.parent)
    print(f"training: {trials} trials, {landed} kills landed mid-run, {trials} resumed identical")
    assert landed >= 1, f"no kill of {trials} trials landed mid-run"
