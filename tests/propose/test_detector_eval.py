"""``eval --method detector``: the proposal file's own classes, through the same LVIS evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from regionspot_cache.cli import app
from regionspot_cache.evaluate.lvis import lvis_ap
from regionspot_cache.propose.select import Selection
from regionspot_cache.runtime.files import sha256_file
from tests.helpers import model_args

runner = CliRunner()


@pytest.fixture(scope="module")
def cached(toy_split, tiny_models, tmp_path_factory):
    """A feature cache of the toy split (it supplies the vocabulary eval scores against)."""
    root, manifest, _ = toy_split
    cache = tmp_path_factory.mktemp("detector-eval") / "cache"
    result = runner.invoke(
        app,
        [
            "extract",
            "-m",
            str(manifest),
            "--data-root",
            str(root),
            "-c",
            str(cache),
            "--in-process",
            *model_args(tiny_models),
            "--set",
            "extract.num_workers=0",
        ],
    )
    assert result.exit_code == 0, result.output
    return cache


def _eval(cached, toy_split, *options):
    """``rs-cache eval`` of the cached toy split with ``options``."""
    root, manifest, _ = toy_split
    return runner.invoke(app, ["eval", "-c", str(cached), "-m", str(manifest), "--data-root", str(root), *options])


def _eval_detector(cached, toy_split, proposals, *options):
    return _eval(cached, toy_split, "--proposals", str(proposals), "--method", "detector", *options)


def _owl_proposals(toy_split, tiny_owlv2, path, top_k: int):
    """The tiny OWLv2's proposal file for the toy split, top ``top_k`` boxes per image."""
    from regionspot_cache.data.datasets import load_manifest
    from regionspot_cache.propose.runner import run_proposals

    root, manifest, _ = toy_split
    run_proposals(load_manifest(manifest, root).load(), path, str(tiny_owlv2), Selection(top_k=top_k), device="cpu")
    return path


def test_eval_method_detector_gives_the_lvis_ap_of_the_files_own_classes(toy_split, cached, tiny_owlv2, tmp_path):

    root, manifest, annotations = toy_split
    proposals = tmp_path / "owl.json"
    _owl_proposals(toy_split, tiny_owlv2, proposals, 50)
    output = tmp_path / "detector.json"
    result = _eval_detector(cached, toy_split, proposals, "-o", str(output))
    assert result.exit_code == 0, result.output
    metrics = json.loads(output.with_suffix(".metrics.json").read_text())
    expected = lvis_ap(annotations, json.loads(proposals.read_text()))  # the official code on the file as written
    assert {name: metrics[name] for name in expected} == pytest.approx(expected)


def test_eval_method_detector_needs_proposals_and_refuses_an_edited_file(toy_split, cached, tiny_owlv2, tmp_path):
    result = _eval(cached, toy_split, "--method", "detector")
    assert result.exit_code != 0 and "pass --proposals" in str(result.exception)
    proposals = tmp_path / "owl.json"
    _owl_proposals(toy_split, tiny_owlv2, proposals, 5)
    proposals.write_text(proposals.read_text() + "\n")
    result = _eval_detector(cached, toy_split, proposals)
    assert result.exit_code != 0 and "edited or replaced" in str(result.exception)


def test_detector_and_regionspot_side_by_side_in_one_table_file_and_page(toy_split, cached, tiny_owlv2, tmp_path):
    from regionspot_cache.cache import CacheReader
    from regionspot_cache.head.model import HeadConfig, RegionSpotHead, save_head

    root, manifest, annotations = toy_split
    proposals = tmp_path / "owl.json"
    _owl_proposals(toy_split, tiny_owlv2, proposals, 20)
    clip = CacheReader(cached).provenance.clip
    torch.manual_seed(0)
    save_head(
        RegionSpotHead(HeadConfig(clip_width=clip.width, text_dim=clip.text_dim, num_layers=1, ffn_dim=64)),
        tmp_path / "h.safetensors",
    )
    output = tmp_path / "both.json"
    result = _eval(
        cached,
        toy_split,
        *("--proposals", str(proposals), "--head", str(tmp_path / "h.safetensors"), "--method", "detector,regionspot"),
        *("--set", "extract.num_workers=0", "-o", str(output), "--report", str(tmp_path / "report")),
    )
    assert result.exit_code == 0, result.output
    table = " ".join(result.output.split())
    assert table.count("│ detector") == 1 and table.count("│ regionspot") == 1, result.output  # one table, both rows
    metrics = json.loads(output.with_suffix(".metrics.json").read_text())
    assert list(metrics["methods"]) == ["detector", "regionspot (h.safetensors)"]
    detector, regionspot = metrics["methods"].values()
    expected = lvis_ap(annotations, json.loads(proposals.read_text()))
    assert detector["metrics"] == pytest.approx(expected) and {k: metrics[k] for k in expected} == pytest.approx(expected)
    # Each method's detections in a file of its own; the RegionSpot ones are the proposals' boxes.
    assert detector["results_file"] == str(tmp_path / "both.detector.json")
    scored = json.loads((tmp_path / "both.regionspot.json").read_text())
    assert len(scored) == regionspot["detections"] > 0 and set(regionspot["metrics"]) >= {"AP", "APr", "APc", "APf"}
    recorded = metrics["provenance"]
    assert recorded["methods"] == ["detector", "regionspot"] and recorded["proposals"]["file"]["sha256"] == sha256_file(proposals)
    page = (tmp_path / "report" / "results.md").read_text()
    assert "| detector |" in page and "| regionspot (h.safetensors) |" in page
    assert "AP detector | AP regionspot (h.safetensors)" in page  # per category, side by side


def test_eval_refuses_a_method_given_twice(toy_split, cached):
    result = _eval(cached, toy_split, "--method", "clip-box", "--method", "clip-box")
    assert result.exit_code != 0 and "--method clip-box is given twice" in str(result.exception)


def test_eval_method_detector_refuses_class_agnostic_proposals(toy_split, cached, tiny_owlv2, tmp_path):
    from regionspot_cache.data.datasets import load_manifest
    from regionspot_cache.propose.runner import run_proposals
    from regionspot_cache.propose.worker import Prompting

    root, manifest, _ = toy_split
    proposals = tmp_path / "agnostic.json"
    prompting = Prompting("agnostic", "object")
    run_proposals(
        load_manifest(manifest, root).load(), proposals, str(tiny_owlv2), Selection(top_k=5), device="cpu", prompting=prompting
    )
    result = _eval_detector(cached, toy_split, proposals)
    assert result.exit_code != 0
    assert "class-agnostic proposals (rs-cache propose --prompt agnostic, prompt 'object'): no classes" in str(result.exception)
    (tmp_path / "agnostic.json.provenance.json").unlink()  # a file without provenance: told by its classes
    result = _eval_detector(cached, toy_split, proposals)
    assert result.exit_code != 0 and "every box has category_id -1 (class-agnostic proposals)" in str(result.exception)


def test_eval_method_detector_keeps_the_fixed_protocols_best_per_class(toy_split, cached, tiny_owlv2, tmp_path):

    root, manifest, annotations = toy_split
    proposals = tmp_path / "owl.json"
    _owl_proposals(toy_split, tiny_owlv2, proposals, 50)
    output = tmp_path / "fixed.json"
    result = _eval_detector(cached, toy_split, proposals, "--fixed-ap", "--set", "eval.fixed_dets_per_class=2", "-o", str(output))
    assert result.exit_code == 0, result.output
    written = json.loads(proposals.read_text())
    # The expected list, by hand: each class's 2 best scores over the dataset, earlier first on ties.
    by_class: dict[int, list[int]] = {}
    for index in sorted(range(len(written)), key=lambda i: -written[i]["score"]):
        by_class.setdefault(written[index]["category_id"], []).append(index)
    kept = sorted(i for indices in by_class.values() for i in indices[:2])
    assert max(len(v) for v in by_class.values()) > 2  # the cap drops something
    scored = json.loads(output.read_text())
    assert [(d["image_id"], d["category_id"], d["score"]) for d in scored] == [
        (written[i]["image_id"], written[i]["category_id"], pytest.approx(written[i]["score"])) for i in kept
    ]
    metrics = json.loads(output.with_suffix(".metrics.json").read_text())
    expected = lvis_ap(annotations, [written[i] for i in kept], max_dets=-1)
    assert {name: metrics[name] for name in expected} == pytest.approx(expected)
