"""The results page and chart (report.py) and `rs-cache eval --scoring/--fixed-ap/--report`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

from regionspot_cache.cache import CacheReader
from regionspot_cache.cli import app
from regionspot_cache.config import EvalConfig, ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.evaluate import evaluate
from regionspot_cache.evaluate.cached import score_cache
from regionspot_cache.evaluate.ground_truth import GroundTruthBoxes
from regionspot_cache.evaluate.lvis import CategoryAP
from regionspot_cache.evaluate.provenance import record_provenance
from regionspot_cache.evaluate.report import (
    ReportData,
    ap_chart,
    draw_predictions,
    per_category_table,
    percent,
    write_report,
)
from regionspot_cache.evaluate.scoring import Detections, protocol_for
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, load_head, save_head
from regionspot_cache.runtime.files import sha256_file

METRICS = {
    "AP": 0.4321,
    "AP50": 0.61,
    "AP75": 0.45,
    "APs": 0.2,
    "APm": 0.35,
    "APl": 0.5,
    "APr": None,
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
        {"toy": METRICS},
        protocol_for(EvalConfig(scoring="sigmoid", protocol="fixed")).settings(),
        "toy AP",
        _predictions(),
        {1: "cat", 2: "dog"},
        {1: "a/1.png", 2: "a/2.png", 3: "a/gone.png"},
        image_root,
        {"results": results, "metrics": tmp_path / "not-written.json"},
        ground_truth=_ground_truth(),
    )


def _ground_truth() -> GroundTruthBoxes:
    # image 1: its first box is a cat, its second (30, 10, 15, 25) unannotated; image 2: a dog.
    return GroundTruthBoxes(np.array([1, 2]), np.array([1, 2]), np.array([[5, 5, 20, 20], [1, 1, 38, 39]], np.float32))


def test_page_has_the_numbers_the_chart_and_drawn_examples(tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    for name in ("1.png", "2.png"):
        Image.new("RGB", (64, 48), (40, 90, 160)).save(root / "a" / name)
    page_path = write_report(tmp_path / "report", _data(tmp_path, root))
    page = page_path.read_text()
    for name, value in METRICS.items():
        assert f"| {percent(value)} " in page, name
    assert "43.2" in page and "| toy | 43.2 | 61.0 |" in page and "| n/a |" in page  # APr: no ground truth
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
    # image 1 lists each box once, with its best class: cat .900 and dog .600, not dog .300; beside
    # each, the class annotated on it (none for the second box; image 2's box overlaps its dog by 0.93).
    assert "| cat | 0.900 | cat |" in page and "| dog | 0.600 | none |" in page and "0.300" not in page
    assert "| cat | 0.800 | dog |" in page


def test_page_without_image_root_says_so(tmp_path):
    page = write_report(tmp_path / "report", _data(tmp_path, None)).read_text()
    assert "No image root was given" in page and "examples/" not in page
    assert "| cat | 0.900 | cat |" in page


def test_drawn_labels_carry_the_ground_truth_beside_the_prediction():
    image = Image.new("RGB", (64, 48), (40, 90, 160))
    shown = _predictions().take(np.array([0]))  # a cat box near the top-left: its tag is drawn inside the image
    plain = np.asarray(draw_predictions(image, shown, {1: "cat"}))
    labelled = np.asarray(draw_predictions(image, shown, {1: "cat"}, truth=["a-longer-true-name"]))
    changed = np.flatnonzero((plain != labelled).any(axis=(0, 2)))
    # Enlarged x8, the tag starts at x 40; with " | gt a-longer-true-name" it is over twice as wide.
    plain_width = ImageDraw.Draw(image).textlength("cat 0.90", font=ImageFont.load_default())
    assert len(changed) and changed.min() >= 40 and changed.max() - 40 > 2 * plain_width


def _category(category_id: int, ap: float | None, instances: int = 3) -> CategoryAP:
    return CategoryAP(category_id, f"class{category_id:02d}", "c", ap, instances)


def test_per_category_table_is_sorted_and_shows_the_best_and_the_worst():
    first = [_category(i, i / 100) for i in range(1, 41)] + [_category(99, None, instances=0)]
    second = [_category(i, 0.5) for i in range(1, 41)]
    lines = per_category_table({"b": second, "a": first}, shown=5)  # sorted by the last
    rows = [line for line in lines if line.startswith("| class")]
    assert [row.split(" | ")[0] for row in rows] == [f"| class{i:02d}" for i in (40, 39, 38, 37, 36, 5, 4, 3, 2, 1)]
    assert rows[0] == "| class40 | c | 3 | 50.0 | 40.0 |"
    assert any("30 more" in line for line in lines) and any("1 without ground truth" in line for line in lines)
    assert "class99" not in "\n".join(lines)  # no ground truth here: left out of the page
    short = per_category_table({"a": first[:3]})
    assert [line.split(" | ")[0] for line in short if line.startswith("| class")] == ["| class03", "| class02", "| class01"]


def test_page_shows_a_row_per_method_and_the_provenance(tmp_path, toy_cache):
    root, annotations = toy_cache
    data = _data(tmp_path, None)
    data.rows = {"detector": {"AP": 0.1, "APr": None}, "regionspot (head.safetensors)": {"AP": 0.25, "APr": 0.5}}
    data.provenance = record_provenance(
        root / "cache", annotations, data.settings, ["detector", "regionspot"], root / "head.safetensors"
    )
    page = write_report(tmp_path / "report", data).read_text()
    assert "| detector | 10.0 | n/a |" in page and "| regionspot (head.safetensors) | 25.0 | 50.0 |" in page
    assert "## Provenance" in page and f"| head.sha256 | `{sha256_file(root / 'head.safetensors')}` |" in page
    assert f"| annotations.path | `{annotations.resolve()}` |" in page and "| cache.cache_json_sha256 |" in page
    assert "| package_version | `" in page and "| methods | `detector, regionspot` |" in page


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
    assert percent(metrics["AP"]) in page and "[val.json](" in page
    drawn = {f"examples/{image_id}.jpg" for image_id in {d["image_id"] for d in detections}}
    assert drawn & set(_links(page)), "no image with detections is drawn"
    for link in _links(page):
        assert (root / "report" / link).is_file(), link
    # What made the numbers, in the metrics file and on the page alike.
    recorded = metrics["provenance"]
    assert recorded["head"] == {
        "path": str((root / "head.safetensors").resolve()),
        "sha256": sha256_file(root / "head.safetensors"),
    }
    assert recorded["annotations"]["sha256"] == sha256_file(annotations) and recorded["proposals"] == {"name": "gt", "file": None}
    assert recorded["cache"]["cache_json_sha256"] == sha256_file(root / "cache" / "cache.json")
    assert recorded["cache"]["dataset"] == "toy" and recorded["cache"]["feature_dtype"] == "float16"
    assert recorded["cache"]["sam"]["variant"] == "tiny" and recorded["methods"] == ["regionspot"]
    assert recorded["settings"]["protocol"] == "fixed" and recorded["package_version"]
    assert f"| head.sha256 | `{recorded['head']['sha256']}` |" in page
    # AP per category: every category with its name, frequency and ground-truth count; n/a without any.
    (block,) = metrics["methods"].values()
    assert block["metrics"] == {name: metrics[name] for name in block["metrics"]} and block["detections"] == len(detections)
    vocabulary = {c["id"]: c for c in json.loads(annotations.read_text())["categories"]}
    assert {int(i) for i in block["per_category"]} == set(vocabulary)
    counts = np.bincount(
        [a["category_id"] for a in json.loads(annotations.read_text())["annotations"]], minlength=max(vocabulary) + 1
    )
    for category_id, entry in block["per_category"].items():
        assert entry["name"] == vocabulary[int(category_id)]["name"] and entry["gt_instances"] == counts[int(category_id)]
        assert (entry["AP"] is None) == (entry["gt_instances"] == 0)
    assert "## AP per category (%)" in page and "| ground truth |" in page


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
