"""Multi-dataset training, batch plans, loader determinism, DDP and the stage-1 -> stage-2 recipes."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from regionspot_cache.cli import app
from regionspot_cache.config import ExtractConfig, TrainConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import load_head
from regionspot_cache.train.data import CachedRegions, MultiSourceRegions, open_sources, region_loader
from regionspot_cache.train.loop import run_dir_for, train_head
from regionspot_cache.train.order import CHOICE_BLOCK, BatchPlan, RankBatchSampler
from tests.helpers import run_python, run_to_end

REPO = Path(__file__).resolve().parents[2]
# Dataset name -> (category ids kept from the synthetic set, offset added to ids): each dataset
# has a vocabulary of its own, with ids that mean nothing to the others.
DATASETS = {"alpha": (range(1, 13), 0), "beta": (range(1, 7), 100), "gamma": (range(7, 13), 200)}


def _relabel(annotation_file: Path, keep: range, offset: int) -> None:
    data = json.loads(annotation_file.read_text())
    data["categories"] = [dict(c, id=c["id"] + offset) for c in data["categories"] if c["id"] in keep]
    data["annotations"] = [
        dict(a, category_id=a["category_id"] + offset) for a in data["annotations"] if a["category_id"] in keep
    ]
    annotation_file.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_models, encoders) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi")
    made = {}
    for seed, (name, (keep, offset)) in enumerate(DATASETS.items()):
        annotations = generate_split(root / name, "train", SyntheticSpec(images=6, seed=10 + seed, min_size=64, max_size=80))
        _relabel(annotations, keep, offset)
        dataset = load_coco_format(annotations, root / name / "images", name=name)
        made[name] = root / name / "cache"
        run_extraction(dataset, CacheTarget(made[name]), encoders, ExtractConfig(num_workers=0, device="cpu"))
    return made


def _metrics(output: Path) -> list[dict]:
    with open(run_dir_for(output) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_batch_plan_follows_weights_and_resumes_anywhere():
    plan = BatchPlan([5, 7, 3], [3.0, 1.0, 0.0], batch_size=2, seed=1)
    steps = CHOICE_BLOCK + 20
    full = list(itertools.islice(plan.global_batches(0), steps))
    sources = np.array([{key[0] for key in batch}.pop() for batch in full])
    assert all(len({key[0] for key in batch}) == 1 for batch in full)  # one dataset per batch
    assert 0.72 < np.mean(sources == 0) < 0.78 and not np.any(sources == 2)
    # Each dataset walks through all of its images before repeating one.
    first = [key[2] for batch in full if batch[0][0] == 1 for key in batch][:7]
    assert sorted(first) == list(range(7))
    for start in (1, 37, CHOICE_BLOCK - 1, CHOICE_BLOCK + 3):  # across a block boundary too
        assert list(itertools.islice(plan.global_batches(start), 10)) == full[start : start + 10]
    with pytest.raises(ValueError, match="must be 3 non-negative numbers"):
        BatchPlan([5, 7, 3], [1.0, 1.0], batch_size=2, seed=1)


def test_rank_shares_make_up_the_global_batch():
    plan = BatchPlan([9, 4], [1.0, 1.0], batch_size=4, seed=0)
    shares = [list(itertools.islice(iter(RankBatchSampler(plan, 5, rank, 2)), 6)) for rank in (0, 1)]
    whole = list(itertools.islice(iter(RankBatchSampler(plan, 5)), 6))
    assert [a + b for a, b in zip(*shares)] == whole
    with pytest.raises(ValueError, match="not divisible by the 3"):
        RankBatchSampler(plan, 0, 0, 3)


def test_batches_do_not_depend_on_the_number_of_workers(caches):
    sources = open_sources([caches["alpha"], caches["beta"]], [])
    regions = MultiSourceRegions([CachedRegions(s.reader, s.vocabulary, 2, 0, i) for i, s in enumerate(sources)])
    plan = BatchPlan(regions.sizes(), [1.0, 1.0], batch_size=3, seed=4)

    def batches(workers: int) -> list:
        loader = region_loader(regions, RankBatchSampler(plan, 2), workers, 2, pin_memory=False)
        return list(itertools.islice(iter(loader), 8))

    serial, parallel = batches(0), batches(2)
    assert {b.source for b in serial} == {0, 1}
    for a, b in zip(serial, parallel):
        assert a.source == b.source and a.labels.equal(b.labels) and a.tokens.equal(b.tokens)
        assert a.feature_maps.equal(b.feature_maps)
    assert max(int(b.box_mask.sum(1).max()) for b in serial) <= 2  # boxes capped at max_boxes_per_image


def test_caches_from_other_models_are_refused(caches, tmp_path):
    import shutil

    other = shutil.copytree(caches["beta"], tmp_path / "other")
    provenance = json.loads((other / "cache.json").read_text())
    provenance["clip"]["width"] = 999
    (other / "cache.json").write_text(json.dumps(provenance))
    with pytest.raises(ValueError, match=r"other: extracted with another CLIP than .*alpha.* \(differs in width\)"):
        open_sources([caches["alpha"], other], [])


def test_stage1_then_stage2_recipes_end_to_end(caches, tmp_path):
    """The shipped BL recipes, with the tiny caches and a short schedule."""
    runner = CliRunner()
    short = [
        "--set",
        "train.iterations=12",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.warmup_iters=2",
        "--set",
        "train.lr_steps=[8]",
        "--set",
        "train.lr=1e-3",
        "--set",
        "train.num_workers=0",
        "--set",
        "train.device=cpu",
        "--set",
        "train.checkpoint_every=6",
        "--set",
        "train.max_boxes_per_image=4",
    ]
    stage1 = tmp_path / "heads" / "stage1.safetensors"
    result = runner.invoke(
        app,
        ["train", "-r", str(REPO / "pipelines/regionspot_bl_stage1.toml"), "-c", str(caches["alpha"]), "-o", str(stage1), *short],
    )
    assert result.exit_code == 0, result.output
    assert {row["dataset"] for row in _metrics(stage1)} == {"alpha"}

    stage2 = tmp_path / "heads" / "stage2.safetensors"
    args = [
        "train",
        "-r",
        str(REPO / "pipelines/regionspot_bl_stage2.toml"),
        "-o",
        str(stage2),
        *(arg for name in DATASETS for arg in ("-c", str(caches[name]))),
        "--init-from",
        str(stage1),
        *short,
        "--set",
        "train.dataset_weights=[1,1,2]",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _metrics(stage2)
    assert [int(r["step"]) for r in rows] == list(range(12))
    assert {r["dataset"] for r in rows} == set(DATASETS)
    head, config = load_head(stage2)
    assert config.vocabularies == list(DATASETS) and config.train["init_from"] == str(stage1)

    # Zero steps from stage 1 must give back exactly the stage-1 weights.
    unchanged = tmp_path / "heads" / "zero.safetensors"
    result = runner.invoke(app, args[:4] + [str(unchanged)] + args[5:] + ["--set", "train.iterations=0"])
    assert result.exit_code == 0, result.output
    (first, _), (again, _) = load_head(stage1), load_head(unchanged)
    assert all(again.state_dict()[k].equal(v) for k, v in first.state_dict().items())


def test_init_from_a_head_of_another_width_is_refused(caches, tmp_path):
    from regionspot_cache.head.model import HeadConfig, RegionSpotHead, save_head

    wrong = tmp_path / "wrong.safetensors"
    save_head(RegionSpotHead(HeadConfig(clip_width=32, text_dim=16)), wrong)
    config = TrainConfig(iterations=1, batch_size=2, device="cpu", init_from=str(wrong), tensorboard=False)
    with pytest.raises(ValueError, match=r"wrong.safetensors: head does not fit this training run: clip_width is 32"):
        train_head(caches["alpha"], tmp_path / "out.safetensors", config)


def test_tensorboard_events_hold_the_losses(caches, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "head.safetensors"
    train_head(
        [caches["alpha"], caches["gamma"]],
        output,
        TrainConfig(iterations=6, batch_size=2, lr=1e-3, device="cpu", checkpoint_every=3),
    )
    events = EventAccumulator(str(run_dir_for(output) / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(int(r["step"]), float(r["loss"])) for r in _metrics(output)]
    assert [s for s, _ in losses] == list(range(6))
    assert np.allclose([v for _, v in losses], [v for _, v in expected])
    assert "train/lr" in events.Tags()["scalars"]


def _train(processes: int, caches: list[Path], output: Path, *more: str) -> subprocess.CompletedProcess:
    """`rs-cache train` in ``processes`` processes: torchrun's for more than one."""
    settings = [
        *more,
        "train.iterations=8",
        "train.batch_size=4",
        "train.lr=1e-3",
        "train.warmup_iters=2",
        "train.lr_steps=[6]",
        "train.dropout=0.0",
        "train.device=cpu",
        "train.max_boxes_per_image=3",
        "train.checkpoint_every=4",
        "train.tensorboard=false",
    ]
    train = ["-m", "regionspot_cache", "train", "-o", str(output)]
    train += [arg for cache in caches for arg in ("-c", str(cache))]
    train += [arg for setting in settings for arg in ("--set", setting)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    output.parent.mkdir(parents=True, exist_ok=True)
    if processes == 1:  # one process, as a user runs it without torchrun
        return run_python(train, output.parent / "train.log", env=env)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return run_to_end([*launcher, *train], output.parent / "torchrun.log", env=env)  # no deadline; a stuck run fails


def test_two_gloo_processes_train_exactly_like_one(caches, tmp_path):
    """DDP over two CPU processes, each with half of every batch, equals one process with the
    whole batch (dropout off: each process draws its own masks); the two read through the node's
    one local shard cache (train.local_cache_dir), the one process reads the caches themselves."""
    pair = [caches["alpha"], caches["beta"]]
    one, two = tmp_path / "one" / "head.safetensors", tmp_path / "two" / "head.safetensors"
    local = tmp_path / "local"
    for count, output, more in ((1, one, []), (2, two, [f"train.local_cache_dir={local}"])):
        done = _train(count, pair, output, *more)
        assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in local.iterdir()) == ["node-0"]  # one directory for the node's two processes
    single, double = _metrics(one), _metrics(two)
    assert [r["dataset"] for r in single] == [r["dataset"] for r in double]
    assert np.allclose([float(r["loss"]) for r in single], [float(r["loss"]) for r in double], rtol=1e-5, atol=1e-6)
    (a, _), (b, _) = load_head(one), load_head(two)
    for key, value in a.state_dict().items():
        other = b.state_dict()[key]
        if key.endswith("in_proj_bias"):
            # The key bias cannot change attention (softmax is shift-invariant), so its gradient is
            # 0 up to rounding, which Adam scales up to lr-sized noise; compare query and value bias.
            width = value.shape[0] // 3
            value, other = torch.cat([value[:width], value[2 * width :]]), torch.cat([other[:width], other[2 * width :]])
        # Adam divides by the gradient's magnitude, so entries whose gradient is ~0 (hidden units
        # that ReLU nearly shuts off) turn reduction-order rounding into visible steps: nearly all
        # entries agree to 1e-5, and none differs by a quarter of the most that 8 Adam steps at lr 1e-3 move.
        close = torch.isclose(other, value, rtol=1e-4, atol=1e-5)
        assert close.float().mean() > 0.999, key
        assert torch.allclose(other, value, atol=2e-3), key
    saved = sorted(p.name for p in (run_dir_for(two) / "state").iterdir())
    assert saved == ["step-00000004", "step-00000008"]
    from safetensors.torch import load_file

    rng = load_file(str(run_dir_for(two) / "state" / "step-00000008" / "tensors.safetensors"))
    assert {"rng.0.torch", "rng.1.torch"} <= set(rng)  # each process's RNG, for exact resume
