"""``run_proposals`` and ``rs-cache propose``: the file, its provenance, resuming, bad images, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from regionspot_cache.cli import app
from regionspot_cache.data.datasets import DatasetError, load_manifest
from regionspot_cache.data.proposals import check_provenance, load_proposals, provenance_path, with_box_source
from regionspot_cache.demo.tiny_detectors import write_not_a_detector
from regionspot_cache.propose.runner import run_proposals
from regionspot_cache.propose.select import Selection
from tests.helpers import python

SELECTION = Selection(top_k=10, chunk_size=4)


def test_proposal_file_is_read_by_extract_and_records_its_provenance(toy_dataset, tiny_owlv2, tmp_path):
    output = tmp_path / "owl.json"
    summary = run_proposals(toy_dataset, output, str(tiny_owlv2), SELECTION, shard_size=2, device="cpu")
    assert summary.images == 5 and summary.shards_written == 3 and summary.failed_images == 0
    proposals = load_proposals(output, with_classes=True)
    assert proposals and set(proposals) <= {entry.id for entry in toy_dataset.images}  # random weights: some find nothing
    known = {c.id for c in toy_dataset.categories}
    for entry in (e for e in toy_dataset.images if e.id in proposals):
        boxes = proposals[entry.id]
        assert 0 < len(boxes) <= 10 and set(boxes.category_ids.tolist()) <= known
        assert (boxes.xyxy[:, 2] <= entry.width).all() and (boxes.xyxy[:, 3] <= entry.height).all()
    recorded = check_provenance(output, toy_dataset.categories)
    assert recorded.detector_family == "owlv2" and recorded.top_k == 10 and recorded.nms_iou == 0.7
    assert recorded.num_classes == len(toy_dataset.categories) and recorded.images == 5
    _, box_source = with_box_source(toy_dataset, None, str(output))  # extract --boxes FILE reads it class-agnostic
    assert box_source.startswith("proposals:owl.json:")


def test_an_edited_file_or_another_vocabulary_is_refused_naming_both_sides(toy_dataset, tiny_owlv2, tmp_path):
    output = tmp_path / "owl.json"
    run_proposals(toy_dataset, output, str(tiny_owlv2), SELECTION, shard_size=8, device="cpu")
    with pytest.raises(DatasetError, match="made for vocabulary .* the dataset's is"):
        check_provenance(output, toy_dataset.categories[:-1])
    output.write_text(output.read_text().replace('"score": 0.', '"score": 0.0', 1))
    with pytest.raises(DatasetError, match="records sha256 [0-9a-f]{64}, the file has [0-9a-f]{64}"):
        with_box_source(toy_dataset, None, str(output))


def test_a_run_stopped_after_one_shard_resumes_to_the_same_bytes(toy_dataset, tiny_owlv2, tmp_path):
    whole = tmp_path / "whole.json"
    run_proposals(toy_dataset, whole, str(tiny_owlv2), SELECTION, shard_size=2, device="cpu")
    resumed = tmp_path / "resumed.json"
    first = run_proposals(toy_dataset, resumed, str(tiny_owlv2), SELECTION, shard_size=2, device="cpu", max_shards=1)
    assert first.provenance is None and not resumed.exists()
    (resumed.parent / "resumed.json.shards" / ".tmp-000001.json-999999999-deadbeef").write_text("{half")  # a killed write
    rest = run_proposals(toy_dataset, resumed, str(tiny_owlv2), SELECTION, shard_size=2, device="cpu")
    assert rest.shards_skipped == 1 and rest.shards_written == 2
    assert resumed.read_bytes() == whole.read_bytes()
    with pytest.raises(DatasetError, match="other settings .*top_k"):
        run_proposals(toy_dataset, resumed, str(tiny_owlv2), Selection(top_k=5, chunk_size=4), shard_size=2, device="cpu")


def test_a_run_killed_with_sigkill_resumes_to_the_same_bytes(toy_split, tiny_owlv2, tmp_path):
    root, manifest, _ = toy_split
    command = [
        "propose",
        "-m",
        str(manifest),
        "--data-root",
        str(root),
        "-d",
        str(tiny_owlv2),
        "--in-process",
        "--top-k",
        "10",
        "--chunk-size",
        "4",
        "--shard-size",
        "1",
        "--device",
        "cpu",
    ]
    whole = tmp_path / "whole.json"
    assert CliRunner().invoke(app, [*command, "-o", str(whole)]).exit_code == 0
    killed = tmp_path / "killed.json"
    script = "import sys; from regionspot_cache.cli import main; sys.argv = ['rs-cache', *sys.argv[1:]]; main()"
    process = python(["-c", script, *command, "-o", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_shard = tmp_path / "killed.json.shards" / "000000.json"
    while process.poll() is None and not first_shard.exists():
        pass  # busy-waits only until the first shard file appears (no timing assumption)
    process.kill()
    process.wait()
    result = CliRunner().invoke(app, [*command, "-o", str(killed)])
    assert result.exit_code == 0, result.output
    assert killed.read_bytes() == whole.read_bytes()


def test_unreadable_images_are_recorded_not_fatal(toy_split, tiny_owlv2, tmp_path):
    root, manifest, _ = toy_split
    dataset = load_manifest(manifest, root).load()
    images = sorted(dataset.images, key=lambda e: e.id)
    broken = tmp_path / "images"
    broken.mkdir()
    for entry in images:  # a copy of the images: truncated, missing, another size, intact
        (broken / entry.file_name).parent.mkdir(parents=True, exist_ok=True)
        (broken / entry.file_name).write_bytes((dataset.image_root / entry.file_name).read_bytes())
    (broken / images[0].file_name).write_bytes((broken / images[0].file_name).read_bytes()[:200])
    (broken / images[1].file_name).unlink()
    (broken / images[2].file_name).write_bytes((broken / images[3].file_name).read_bytes())
    dataset.image_root = broken
    summary = run_proposals(dataset, tmp_path / "p.json", str(tiny_owlv2), SELECTION, shard_size=2, device="cpu")
    failed = summary.provenance.failed_images
    assert summary.failed_images == 3 and sorted(failed) == sorted(str(e.id) for e in images[:3])
    assert "cannot decode" in failed[str(images[0].id)] and "not found" in failed[str(images[1].id)]
    assert "differs from the recorded" in failed[str(images[2].id)]
    assert set(load_proposals(tmp_path / "p.json")) <= {e.id for e in images[3:]}
    assert json.loads(provenance_path(tmp_path / "p.json").read_text())["images"] == 5


@pytest.mark.parametrize("case", ["missing id", "no detection head"])
def test_a_model_that_is_no_detector_is_one_error_line(case, toy_split, tmp_path, monkeypatch):
    root, manifest, _ = toy_split
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps at the terminal's width: keep the message on its line
    model = "no-such-org/no-such-detector" if case == "missing id" else str(write_not_a_detector(tmp_path / "bert"))
    script = "import sys; from regionspot_cache.cli import main; sys.argv = ['rs-cache', *sys.argv[1:]]; main()"
    # A fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE when it is imported (helpers.python's
    # processes imported it before the variable was set).
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "propose",
            "-m",
            str(manifest),
            "--data-root",
            str(root),
            "-d",
            model,
            "-o",
            str(tmp_path / "p.json"),
            "--in-process",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "Traceback" not in result.stderr, result.stderr
