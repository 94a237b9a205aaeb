"""The demo end to end, smaller than the default so the suite stays fast."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from regionspot_cache.cli import app
from regionspot_cache.evaluate.lvis import METRICS
from regionspot_cache.progress import percent

DEMO = ["--train-images", "64", "--val-images", "16", "--iterations", "600"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One demo run, shared: its outputs, a second run, and the README's commands on its data.
    Two intra-op threads whatever the machine (or OMP_NUM_THREADS) says: CPU reductions, and so
    the AP of this short run, depend on the thread count (one thread: +0.03 AP instead of +0.05)."""
    workdir = tmp_path_factory.mktemp("demo") / "demo"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = CliRunner().invoke(app, ["demo", "--workdir", str(workdir), *DEMO])
    finally:
        torch.set_num_threads(threads)
    return workdir, result


def test_demo_runs_all_three_phases_and_training_helps(finished):
    workdir, result = finished
    assert result.exit_code == 0, result.output
    assert "untrained" in result.output and "trained" in result.output
    metrics = json.loads((workdir / "demo_metrics.json").read_text())
    for name in ("untrained", "trained"):
        assert set(METRICS) <= set(metrics[name])
        assert all(metrics[name][m] is None or 0 <= metrics[name][m] <= 1 for m in METRICS)
    # The same seeds give the same data, weights and order, so this is deterministic.
    assert metrics["trained"]["AP"] > metrics["untrained"]["AP"] + 0.05
    for path in (
        "models/sam_tiny.pth",
        "models/clip_tiny.pt",
        "head/head.safetensors",
        "head/head.json",
        "cache/train/cache.json",
        "cache/val/cache.json",
        "results/trained.json",
        "report/results.md",
        "report/ap_by_frequency.png",
    ):
        assert (workdir / path).is_file(), path
    assert list((workdir / "report" / "examples").glob("*.jpg"))  # predictions drawn on images
    # The report has the untrained-vs-trained table, AP per category, ground truth beside each
    # prediction and what made it; demo_metrics.json records the same provenance.
    page = (workdir / "report" / "results.md").read_text()
    for name in ("untrained", "trained"):
        assert f"| {name} | {percent(metrics[name]['AP'])} |" in page, name
    assert "AP untrained | AP trained" in page and "| ground truth |" in page and "## Provenance" in page
    assert metrics["provenance"]["head"]["path"] == str((workdir / "head" / "head.safetensors").resolve())
    assert f"| head.sha256 | `{metrics['provenance']['head']['sha256']}` |" in page
    assert str(workdir / "report" / "results.md") in result.output.replace("\n", "")


def test_a_second_run_reuses_everything_and_does_not_train_again(finished):
    workdir, first = finished
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, ["demo", "--workdir", str(workdir), *DEMO])
    said = " ".join(again.output.split())  # rich wraps long lines
    assert again.exit_code == 0 and "already trained: 600 steps" in said, said
    assert "nan" not in said and "shards written 0, skipped 1" in said


def test_the_demos_manifests_and_proposals_work_with_the_other_commands(finished):
    """As the README shows them."""
    workdir, first = finished
    assert first.exit_code == 0, first.output
    manifest = workdir / "data" / "demo_val.toml"
    models = [
        "--sam-variant",
        "tiny",
        "--sam-checkpoint",
        str(workdir / "models" / "sam_tiny.pth"),
        "--clip-model",
        "RS-Tiny-ViT",
        "--clip-pretrained",
        str(workdir / "models" / "clip_tiny.pt"),
    ]
    extracted = CliRunner().invoke(
        app,
        [
            "extract",
            "-m",
            str(manifest),
            "-c",
            str(workdir / "cache" / "val"),
            *models,
            "--in-process",
            "--set",
            "extract.shard_size=32",
        ],
    )
    assert extracted.exit_code == 0 and "skipped 1" in " ".join(extracted.output.split()), (
        extracted.output
    )  # same images and identity
    scored = CliRunner().invoke(
        app,
        [
            "eval",
            "-c",
            str(workdir / "cache" / "val"),
            "--head",
            str(workdir / "head" / "head.safetensors"),
            "-m",
            str(manifest),
            "--proposals",
            "jittered",
            "--set",
            "extract.num_workers=0",
            "-o",
            str(workdir / "results" / "jittered.json"),
        ],
    )
    assert scored.exit_code == 0, scored.output
    assert json.loads((workdir / "results" / "jittered.metrics.json").read_text())["AP"] > 0
