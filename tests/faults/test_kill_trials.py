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
        process.join(300)
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


def test_extraction_killed_at_random_moments_resumes_identically(toy, tiny_models, encoders, tmp_path):
    root, dataset = toy
    extract = lambda cache: lambda: run_extraction(dataset, CacheTarget(cache), encoders, EXTRACT)  # noqa: E731
    duration = _timed(extract(tmp_path / "reference"))
    expected = _cache_values(tmp_path / "reference")
    rng, landed = np.random.default_rng(SEED), 0
    for trial in range(TRIALS):
        cache = tmp_path / f"trial{trial}"
        for moment in _kill_moments(duration, rng):
            landed += _run(extract(cache), kill_after=moment)
        _run(extract(cache))  # resume to the end
        assert verify_cache(cache) == [], f"trial {trial}"
        assert not list((cache / "shards").glob(".tmp-*")), f"trial {trial}: a killed writer's leftovers remain"
        got = _cache_values(cache)
        assert got.keys() == expected.keys(), f"trial {trial}"
        for image_id, values in expected.items():
            for want, have in zip(values, got[image_id]):
                np.testing.assert_array_equal(have, want, err_msg=f"trial {trial}, image {image_id}")
        shutil.rmtree(cache)
    print(f"extraction: {TRIALS} trials, {landed} kills landed mid-run, {TRIALS} resumed identical")
    assert landed >= TRIALS // 2, f"only {landed} kills landed mid-run"


def _losses(output: Path) -> list[tuple[str, str]]:
    with open(run_dir_for(output) / "metrics.csv") as handle:
        return [(row["step"], row["loss"]) for row in csv.DictReader(handle)]


def test_training_killed_at_random_moments_resumes_identically(toy, tiny_models, encoders, tmp_path):
    root, dataset = toy
    cache = root / "cache"
    if not cache.is_dir():
        run_extraction(dataset, CacheTarget(cache), encoders, EXTRACT)
    train = lambda output: lambda: train_head(cache, output, TRAIN)  # noqa: E731
    reference = tmp_path / "reference" / "head.safetensors"
    duration = _timed(train(reference))
    expected, (expected_head, _) = _losses(reference), load_head(reference)
    assert len(expected) == TRAIN.iterations
    rng, landed = np.random.default_rng(SEED + 1), 0
    for trial in range(TRIALS):
        output = tmp_path / f"trial{trial}" / "head.safetensors"
        for moment in _kill_moments(duration, rng):
            landed += _run(train(output), kill_after=moment)
        _run(train(output))
        assert _losses(output) == expected, f"trial {trial}: losses differ from the uninterrupted run"
        head, _ = load_head(output)
        for key, value in expected_head.state_dict().items():
            assert head.state_dict()[key].equal(value), f"trial {trial}: {key}"
        assert not list((run_dir_for(output) / "state").glob(".tmp-*")), f"trial {trial}: temp state left"
        shutil.rmtree(output.parent)
    print(f"training: {TRIALS} trials, {landed} kills landed mid-run, {TRIALS} resumed identical")
    assert landed >= TRIALS // 2, f"only {landed} kills landed mid-run"
