"""The results page and chart (report.py) and `rs-cache eval --scoring/--fixed-ap/--report`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from regionspot_cache.cache import CacheReader
from regionspot_cache.cli import app
from regionspot_cache.config import EvalConfig, ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.evaluate import evaluate
from regionspot_cache.evaluate.cached import score_cache
from regionspot_cache.evaluate.report import ReportData, ap_chart, percent, write_report
from regionspot_cache.evaluate.scoring import Detections, protocol_for
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, load_head, save_head

METRICS = {
    "AP": 0.4321,
    "AP50": 0.61,
    "AP75": 0.45,
    "APs": 0.2,
    "APm": 0.35,
    "APl": 0.5,
    "APr": -1.0,
    "APc": 0.287,
    "APf": 0.5555,
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _links(page: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", page)


def test_chart_is_a_png_of_plausible_size(tmp_path):
    path = ap_chart({"trained": METRICS, "untrained": {"AP": 0.01, "APr": 0.0, "APc": 0.02, "APf": 0.01}}, tmp_path / "c.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE and 5_000 < path.stat().st_size < 500_000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 400)
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # bars, labels: not a blank canvas


def _predictions() -> Detections:
    # image 1: one box twice (cat .9, dog .3) and a second box; image 2: one box; image 3: missing file.
    return Detections(
        np.array([1, 1, 1, 2, 3]),
        np.array([1, 2, 2, 1, 2]),
        np.array([[5, 5, 20, 20], [5, 5, 20, 20], [30, 10, 15, 25], [0, 0, 40, 40], [1, 1, 5, 5]], np.float32),
        np.array([0.9, 0.3, 0.6, 0.8, 0.7]),
    )


def _data(tmp_path: Path, image_root: Path | None) -> ReportData:
    results = tmp_path / "results.json"
    results.write_text("[]")
    return ReportData(
        METRICS,
        protocol_for(EvalConfig(scoring="sigmoid", protocol="fixed")).settings(),
        "toy AP",
        _predictions(),
        {1: "cat", 2: "dog"},
        {1: "a/1.png", 2: "a/2.png", 3: "a/gone.png"},
        image_root,
        {"results": results, "metrics": tmp_path / "not-written.json"},
    )


def test_page_has_the_numbers_the_chart_and_drawn_examples(tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    for name in ("1.png", "2.png"):
        Image.new("RGB", (64, 48), (40, 90, 160)).save(root / "a" / name)
    page_path = write_report(tmp_path / "report", _data(tmp_path, root))
    page = page_path.read_text()
    for name, value in METRICS.items():
        assert f"| {percent(value)} " in page, name
    assert "43.2" in page and "n/a" in page  # AP 0.4321 -> 43.2; APr -1 -> n/a
    assert "fixed AP (Dave et al. 2021)" in page and "| scoring | sigmoid |" in page
    links = _links(page)
    assert "ap_by_frequency.png" in links and "examples/1.jpg" in links and "examples/2.jpg" in links
    for link in links:
        assert (page_path.parent / link).is_file(), link
    assert "not-written.json" not in page  # only existing files are linked
    assert "Not drawn" in page and "gone.png" in page  # the missing image is named, the page still renders
    with Image.open(page_path.parent / "examples" / "1.jpg") as drawn:
        assert drawn.size == (512, 384)  # enlarged 8x so that labels fit
        assert drawn.getpixel((40, 120)) != (40, 90, 160)  # the box's left edge, x = 5 (x 8)
    # image 1 lists each box once, with its best class: cat .900 and dog .600, not dog .300.
    assert "| cat | 0.900 |" in page and "| dog | 0.600 |" in page and "0.300" not in page


def test_page_without_image_root_says_so(tmp_path):
    page = write_report(tmp_path / "report", _data(tmp_path, None)).read_text()
    assert "No image root was given" in page and "examples/" not in page
    assert "| cat | 0.900 |" in page


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory, tiny_models, encoders):
    root = tmp_path_factory.mktemp("eval_cli")
    annotations = generate_split(root, "val", SyntheticSpec(images=3, seed=4, min_size=64, max_size=80))
    dataset = load_coco_format(annotations, root / "images", name="toy")
    config = ExtractConfig(shard_size=2, num_workers=0, device="cpu")
    run_extraction(dataset, CacheTarget(root / "cache"), encoders, config)
    torch.manual_seed(0)
    head = RegionSpotHead(HeadConfig(clip_width=encoders.clip.width, text_dim=encoders.clip.text_dim))
    save_head(head, root / "head.safetensors")
    return root, annotations


def test_eval_command_with_protocol_options_and_report(toy_cache):
    root, annotations = toy_cache
    output = root / "out" / "val.json"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "eval",
            "-c",
            str(root / "cache"),
            "--head",
            str(root / "head.safetensors"),
            "-a",
            str(annotations),
            "-o",
            str(output),
            "--scoring",
            "sigmoid",
            "--fixed-ap",
            "--set",
            "eval.fixed_dets_per_class=3",
            "--set",
            "eval.device=cpu",
            "--report",
            str(root / "report"),
            "--image-root",
            str(root / "images"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "fixed AP" in result.output and "sigmoid" in result.output
    metrics = json.loads(output.with_suffix(".metrics.json").read_text())
    assert metrics["eval"]["protocol"] == "fixed" and metrics["eval"]["scoring"] == "sigmoid"
    assert metrics["eval"]["dets_per_class"] == 3 and metrics["eval"]["max_dets_per_image"] == -1
    detections = json.loads(output.read_text())
    per_class = np.bincount([d["category_id"] for d in detections])
    assert len(detections) == metrics["eval"]["detections"] and per_class.max() <= 3
    page = (root / "report" / "results.md").read_text()
    assert percent(metrics["AP"]) in page and "examples/1.jpg" in page and "[val.json](" in page
    for link in _links(page):
        assert (root / "report" / link).is_file(), link


def test_eval_command_refuses_unknown_scoring(toy_cache):
    root, annotations = toy_cache
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "-c",
            str(root / "cache"),
            "--head",
            str(root / "head.safetensors"),
            "-a",
            str(annotations),
            "--scoring",
            "softmin",
        ],
    )
    assert result.exit_code != 0 and "softmax, sigmoid" in str(result.exception)


def test_evaluate_scores_the_cache_with_the_head_and_names_the_protocol(toy_cache, tmp_path):
    root, annotations = toy_cache
    head = load_head(root / "head.safetensors")[0]
    config = EvalConfig(protocol="fixed", fixed_dets_per_class=2, device="cpu")
    result = evaluate(root / "cache", annotations, config, head=head, results_file=tmp_path / "r.json")
    reader = CacheReader(root / "cache")
    expected = score_cache(reader, head, reader.vocabulary("toy"), config)
    assert result.detections.records() == expected.records() == json.loads((tmp_path / "r.json").read_text())
    assert result.num_detections == len(expected) and result.segm_metrics is None
    assert result.settings == protocol_for(config).settings() and set(result.metrics) >= {"AP", "APr"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "clip-boxes", "image_root": "."}, "unknown method 'clip-boxes'; known: regionspot, clip-box, clip-mask"),
        ({}, "method regionspot needs a head"),
        ({"method": "clip-box"}, "method clip-box reads the original images: give their image_root"),
        ({"head": object(), "masks": True}, "method regionspot with masks reads the original images"),
    ],
)
def test_evaluate_refuses_a_method_without_what_it_needs(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate(tmp_path / "no-cache", tmp_path / "no.json", EvalConfig(device="cpu"), **kwargs)
