"""``propose --prompt agnostic``: one generic prompt, boxes without a class, recorded and checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from regionspot_cache.choices import ProposalPrompt
from regionspot_cache.cli import app
from regionspot_cache.data.datasets import DatasetError
from regionspot_cache.data.images import ImageSource
from regionspot_cache.data.proposals import ProposalProvenance, check_provenance, load_proposals, with_box_source
from regionspot_cache.propose.detectors import load_detector
from regionspot_cache.propose.runner import run_proposals
from regionspot_cache.propose.select import Selection, detect_image
from regionspot_cache.propose.worker import Prompting

SELECTION = Selection(top_k=8, chunk_size=4)
AGNOSTIC = Prompting(ProposalPrompt.AGNOSTIC, "object")


def test_agnostic_boxes_are_the_detectors_for_the_one_prompt_without_a_class(toy_dataset, tiny_owlv2, tmp_path):
    output = tmp_path / "owl.json"
    run_proposals(toy_dataset, output, str(tiny_owlv2), SELECTION, shard_size=2, device="cpu", prompting=AGNOSTIC)
    written = load_proposals(output, with_classes=True)
    detector = load_detector(tiny_owlv2, torch.device("cpu"))
    source = ImageSource(toy_dataset.image_root, {entry.id: entry for entry in toy_dataset.images})
    assert written  # random weights: some images may have no box
    for entry in toy_dataset.images:
        expected = detect_image(detector, source.load(entry.id), ["object"], SELECTION)
        if entry.id not in written:
            assert len(expected) == 0
            continue
        boxes = written[entry.id]
        np.testing.assert_allclose(boxes.xyxy, expected.xyxy, atol=1e-4)  # through x, y, w, h and back
        np.testing.assert_array_equal(boxes.scores, expected.scores)
        assert boxes.category_ids.tolist() == [-1] * len(expected)
    recorded = json.loads((tmp_path / "owl.json.provenance.json").read_text())
    assert recorded["prompt"] == "agnostic" and recorded["prompt_text"] == "object"
    # The boxes do not depend on the vocabulary: another one reads them (a prompted file is refused: test_runner).
    assert check_provenance(output, toy_dataset.categories[:-1]).prompt is ProposalPrompt.AGNOSTIC
    assert with_box_source(toy_dataset, None, str(output))[1].startswith("proposals:owl.json:")


def test_a_run_resumed_with_the_other_prompt_is_refused(toy_dataset, tiny_owlv2, tmp_path):
    output = tmp_path / "p.json"
    run_proposals(toy_dataset, output, str(tiny_owlv2), SELECTION, shard_size=2, device="cpu", prompting=AGNOSTIC, max_shards=1)
    with pytest.raises(DatasetError, match="other settings .*prompt"):
        run_proposals(toy_dataset, output, str(tiny_owlv2), SELECTION, shard_size=2, device="cpu")
    with pytest.raises(DatasetError, match="other settings .*prompt_text"):
        run_proposals(
            toy_dataset, output, str(tiny_owlv2), SELECTION, shard_size=2, device="cpu", prompting=Prompting("agnostic", "thing")
        )


def test_a_provenance_without_a_prompt_reads_as_vocabulary_and_a_bad_one_is_refused(tmp_path):
    fields = {
        "detector": "d",
        "detector_family": "owlv2",
        "weights_sha256": "0",
        "dataset": "toy",
        "vocabulary_sha256": "0",
        "num_classes": 3,
        "images_sha256": "0",
        "chunk_size": 4,
        "min_score": 0.0,
        "top_k": 8,
        "nms_iou": 0.7,
        "shard_size": 2,
        "package_version": "0",
        "transformers_version": "0",
    }
    path = tmp_path / "p.json.provenance.json"
    assert ProposalProvenance.from_json(path, fields).prompt is ProposalPrompt.VOCABULARY  # written before --prompt
    with pytest.raises(DatasetError, match="p.json.provenance.json: not a proposal provenance record: prompt 'none'"):
        ProposalProvenance.from_json(path, {**fields, "prompt": "none"})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--prompt", "classless"], "--prompt 'classless': expected one of vocabulary, agnostic"),
        (["--agnostic-prompt", "thing"], "--agnostic-prompt is the prompt of --prompt agnostic, not of --prompt vocabulary"),
        (["--prompt", "agnostic", "--agnostic-prompt", " _ "], "the agnostic prompt is empty"),
    ],
)
def test_propose_refuses_a_bad_prompt_before_running(options, message, toy_split, tiny_owlv2, tmp_path):
    root, manifest, _ = toy_split
    command = ["propose", "-m", str(manifest), "--data-root", str(root), "-d", str(tiny_owlv2), "-o", str(tmp_path / "p.json")]
    result = CliRunner().invoke(app, [*command, "--in-process", *options])
    assert result.exit_code != 0 and message in str(result.exception)
    assert not (tmp_path / "p.json.shards").exists()
