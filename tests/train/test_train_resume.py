"""Training killed with SIGKILL and resumed gives the same losses, step for step."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import textwrap
from dataclasses import replace

import numpy as np
import pytest

from regionspot_cache.config import ExtractConfig, TrainConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import load_head
from regionspot_cache.train.loop import run_dir_for, train_head
from tests.helpers import python, run_python, wait_until

CONFIG = TrainConfig(
    iterations=120,
    batch_size=2,
    lr=1e-3,
    warmup_iters=10,
    lr_steps=[60, 100],
    max_boxes_per_image=3,
    checkpoint_every=10,
    device="cpu",
)
WORKER = textwrap.dedent(
    """
    import sys
    from regionspot_cache.config import TrainConfig
    from regionspot_cache.train.loop import train_head
    train_head(sys.argv[1], sys.argv[2], TrainConfig(iterations=120, batch_size=2, lr=1e-3, warmup_iters=10,
               lr_steps=[60, 100], max_boxes_per_image=3, checkpoint_every=10, device="cpu"))
    """
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_models, encoders):
    root = tmp_path_factory.mktemp("train_cache")
    annotations = generate_split(root, "train", SyntheticSpec(images=6, seed=2, min_size=64, max_size=80))
    dataset = load_coco_format(annotations, root / "images", name="toy")
    run_extraction(dataset, CacheTarget(root / "cache"), encoders, ExtractConfig(num_workers=0, device="cpu"))
    return root / "cache"


def _losses(output) -> list[tuple[int, str]]:
    with open(run_dir_for(output) / "metrics.csv") as handle:
        return [(int(row["step"]), row["loss"]) for row in csv.DictReader(handle)]


def test_sigkill_then_resume_repeats_the_losses_exactly(cache, tmp_path):
    # Every run a process of its own, as a user's runs are (forked from a server that only imported
    # the package): the comparison then cannot depend on what earlier tests left in this one
    # (bit-for-bit float results depend on process-wide settings).
    reference = tmp_path / "reference" / "head.safetensors"
    done = run_python(["-c", WORKER, str(cache), str(reference)], tmp_path / "reference.log")
    assert done.returncode == 0, done.stdout[-3000:]
    output = tmp_path / "killed" / "head.safetensors"
    process = python(["-c", WORKER, str(cache), str(output)], stderr=subprocess.DEVNULL)
    metrics = run_dir_for(output) / "metrics.csv"
    wait_until(  # no deadline: it fails if the run stalls, and ends the wait if the run ends
        lambda: process.poll() is not None or (metrics.is_file() and len(metrics.read_text().splitlines()) > 35),
        "35 steps",
        watched=[process],
        poll_s=0.01,
    )
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(metrics.read_text().splitlines()) - 1
    assert 10 < done < 120, "the kill must land mid-run"
    assert not output.exists()
    done = run_python(["-c", WORKER, str(cache), str(output)], tmp_path / "resume.log")
    assert done.returncode == 0, done.stdout[-3000:]
    expected, resumed = _losses(reference), _losses(output)
    assert [step for step, _ in resumed] == list(range(120))
    assert resumed == expected  # same loss, bit for bit, at every step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir_for(output) / "tensorboard"))
    events.Reload()  # the killed run's events past the resumed step are purged
    assert [(e.step, repr(e.value)) for e in events.Scalars("train/loss")] == [
        (step, repr(float(np.float32(loss)))) for step, loss in expected
    ]
    (head_a, _), (head_b, _) = load_head(reference), load_head(output)
    for key, value in head_a.state_dict().items():
        assert head_b.state_dict()[key].equal(value), key


def test_resume_refuses_other_settings_and_a_finished_run_is_not_redone(cache, tmp_path):
    output = tmp_path / "head.safetensors"
    short = replace(CONFIG, iterations=30)
    train_head(cache, output, short)
    assert sorted(p.name for p in (run_dir_for(output) / "state").iterdir()) == ["step-00000020", "step-00000030"]
    again = train_head(cache, output, short)  # resumes at the end: no step is run
    # A finished run is not redone: it says so and reports the recorded loss, not nan.
    assert len(_losses(output)) == 30 and again.already_trained
    assert again.final_loss == float(_losses(output)[-1][1])
    with pytest.raises(ValueError, match="lr was 0.001, now 0.002"):
        train_head(cache, output, replace(short, lr=2e-3))
    train_head(cache, output, replace(short, lr=2e-3), resume=False)
    assert len(_losses(output)) == 30


def test_nan_loss_stops_and_keeps_the_last_good_state(cache, tmp_path):
    import json
    import shutil

    broken = shutil.copytree(cache, tmp_path / "cache")
    provenance = json.loads((broken / "cache.json").read_text())
    provenance["clip"]["logit_scale"] = float("inf")  # logits become inf - inf: the loss is NaN
    (broken / "cache.json").write_text(json.dumps(provenance))
    output = tmp_path / "head.safetensors"
    with pytest.raises(FloatingPointError, match="loss became nan at step 0; stopped. Last good state: none saved yet"):
        train_head(broken, output, replace(CONFIG, iterations=5))
    assert not output.exists()
