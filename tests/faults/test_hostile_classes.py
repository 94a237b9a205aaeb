"""The classes of hostile input from the hardening issue, each tested through its mechanism:
outputs are strict JSON or refused, every config field is constrained, user text is never markup,
evaluation checks its ground truth, and every command answers bad values with one error line."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import sys
import typing

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from regionspot_cache import cli, progress
from regionspot_cache.cache.reader import Vocabulary
from regionspot_cache.config import (
    AutoBoxesConfig,
    ConfigError,
    EvalConfig,
    ExtractConfig,
    Recipe,
    SamSpec,
    TrainConfig,
    apply_overrides,
)
from regionspot_cache.data.datasets import DatasetError
from regionspot_cache.data.proposals import load_proposals
from regionspot_cache.demo.config import DemoConfig
from regionspot_cache.evaluate.ground_truth import load_ground_truth
from regionspot_cache.evaluate.lvis import lvis_ap
from regionspot_cache.evaluate.scoring import Detections, write_results_json
from regionspot_cache.runtime.files import NonFiniteValueError, write_json
from tests.helpers import model_args

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf, 1e39, -1e300])


# -- 1. Every file we write is valid for its format ------------------------------------------


@FAST
@given(
    data=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=8,
    )
)
def test_json_files_are_strict_json_or_not_written(tmp_path, data):
    path = tmp_path / "out.json"
    path.write_text('"previous"')
    try:
        write_json(path, data)
    except NonFiniteValueError as err:
        assert str(err).startswith(f"{path}: not written") and path.read_text() == '"previous"'
    else:
        json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"wrote {name}"))


@FAST
@given(bad=NON_FINITE, where=st.sampled_from(["glip", "coco"]))
def test_non_finite_proposal_scores_are_refused_naming_the_entry(tmp_path, bad, where):
    path = tmp_path / "proposals.json"
    if where == "glip":
        data = {"3": {"boxes": [[0, 0, 5, 5], [1, 1, 4, 4]], "scores": [0.5, bad]}}
    else:
        data = [{"image_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}, {"image_id": 3, "bbox": [1, 1, 2, 2], "score": bad}]
    path.write_text(json.dumps(data))  # json.dumps writes NaN / Infinity as many tools do
    with pytest.raises(DatasetError, match=r"(entry for image '3'|result #1): score .* is not a finite"):
        load_proposals(path)


@FAST
@given(bad=st.sampled_from([math.nan, math.inf, -math.inf]), column=st.sampled_from(["score", "box"]))
def test_results_json_with_non_finite_detections_is_refused(tmp_path, bad, column):
    boxes = np.array([[0, 0, 5, 5], [1, 1, 2, 2]], np.float32)
    scores = np.array([0.9, 0.4])
    if column == "score":
        scores[1] = bad
    else:
        boxes[1, 2] = bad
    detections = Detections(np.array([1, 2]), np.array([1, 1]), boxes, scores)
    path = tmp_path / "results.json"
    with pytest.raises(NonFiniteValueError, match="2 score|image 2"):
        write_results_json(detections, path)
    assert not path.exists()


# -- 5. Every configuration value is validated ------------------------------------------------

CONFIGS = {
    "extract": ExtractConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "models.sam": SamSpec,
    "predict.auto_boxes": AutoBoxesConfig,
}
NUMERIC = (int, float)


def _fields(section: str):
    cls = CONFIGS[section]
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def test_every_numeric_and_choice_field_carries_a_constraint():
    """A new count or rate without a range would let zero or negative values through again."""
    for cls in (*CONFIGS.values(), DemoConfig):
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            base = typing.get_args(hints[item.name]) or (hints[item.name],)
            if any(kind in NUMERIC for kind in base) or item.name in ("device", "variant", "scoring", "protocol"):
                assert item.metadata, f"{cls.__name__}.{item.name} has no constraint"


HOSTILE = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([-(2**63), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "cuda:x", "gpu", "[/b]", "vit_q", "true", "[]", "[1, 0]", "[3, 2]"]),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(section=st.sampled_from(sorted(CONFIGS)), index=st.integers(0, 40), value=HOSTILE)
def test_any_override_is_accepted_within_its_constraints_or_refused_with_config_error(section, index, value):
    fields = _fields(section)
    item, _ = fields[index % len(fields)]
    raw = json.dumps(value) if not isinstance(value, str) else value
    raw = raw.replace("NaN", "nan").replace("Infinity", "inf")
    try:
        recipe = apply_overrides(Recipe(), [f"{section}.{item.name}={raw}"])
    except ConfigError as err:
        assert f"{section}.{item.name}" in str(err) or "override" in str(err)
        return
    target = functools.reduce(getattr, section.split("."), recipe)
    accepted = getattr(target, item.name)
    for one in accepted if isinstance(accepted, list) else [accepted]:
        if isinstance(one, float):
            assert math.isfinite(one)
        rules = item.metadata
        if "min" in rules:
            assert one >= rules["min"]
        if "above" in rules:
            assert one > rules["above"]
        if "choices" in rules:
            assert one in rules["choices"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("extract.shard_size=0", "extract.shard_size: 0 must be at least 1"),
        ("extract.num_workers=-1", "extract.num_workers: -1 must be at least 0"),
        ("train.iterations=0", "train.iterations: 0 must be at least 1"),
        ("train.checkpoint_every=0", "train.checkpoint_every: 0 must be at least 1"),
        ("train.batch_size=-2", "train.batch_size: -2 must be at least 1"),
        ("train.lr=nan", "train.lr: nan is not a finite number"),
        ("train.lr_steps=[5, 2]", "train.lr_steps: [5, 2] must be increasing"),
        ("train.device=gpu", "train.device: 'gpu' is not a device"),
        ("models.sam.variant=vit_q", "models.sam.variant: 'vit_q' is not one of vit_b"),
        ("train.max_boxes_per_image=1.5", "train.max_boxes_per_image: 1.5 is not an int"),
    ],
)
def test_examples_of_the_issue_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=re_escape(message)):
        apply_overrides(Recipe(), [override])


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_sam_variants_of_the_config_are_the_architectures():
    from regionspot_cache.config import SAM_VARIANTS
    from regionspot_cache.encoders.sam import SAM_ARCHITECTURES
    from regionspot_cache.encoders.sam2 import SAM2_ARCHITECTURES

    assert set(SAM_VARIANTS) == set(SAM_ARCHITECTURES) | set(SAM2_ARCHITECTURES)


# -- 6. User text is never markup --------------------------------------------------------------


@FAST
@given(text=st.text(alphabet=st.sampled_from("[]/bold red copy=:\\ é"), max_size=30))
def test_say_prints_any_text_verbatim(monkeypatch, text):
    buffer = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=buffer, width=1000, color_system=None))
    progress.say(("error:", "bold red"), f" {text}")
    assert buffer.getvalue() == f"error: {text}\n"
    buffer.truncate(0), buffer.seek(0)
    progress.console.print(progress.metrics_table(text, {text: {"AP": 0.5}}, ["AP"]))
    assert text.strip() in buffer.getvalue() if text.strip() else True


# -- 3. Evaluation checks what it compares -----------------------------------------------------


def _vocabulary(names: dict[int, str]) -> Vocabulary:
    return Vocabulary(
        "toy", np.array(list(names), np.int64), list(names.values()), [None] * len(names), np.zeros((len(names), 4), np.float32)
    )


COCO = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": 100, "height": 100},
        {"id": 2, "file_name": "b.jpg", "width": 100, "height": 100},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 30, 20], "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
}


def test_coco_format_ground_truth_is_evaluated_with_lvis_fields_filled(tmp_path, caplog):
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(COCO))
    data = load_ground_truth(path, _vocabulary({1: "cat", 2: "dog"}))
    assert data["images"][0]["neg_category_ids"] == [2] and data["categories"][0]["frequency"] == "f"
    assert "COCO-format annotations: filled in neg_category_ids" in caplog.text
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in COCO["annotations"]
    ]
    wrong_class = [{**record, "category_id": 3 - record["category_id"]} for record in perfect]
    assert lvis_ap(data, perfect)["AP"] == pytest.approx(1.0)
    assert lvis_ap(load_ground_truth(path, _vocabulary({1: "cat", 2: "dog"})), wrong_class)["AP"] == pytest.approx(0.0)


@FAST
@given(change=st.sampled_from(["rename", "drop", "add", "swap"]), which=st.sampled_from([1, 2]))
def test_ground_truth_in_other_categories_than_the_vocabulary_is_refused(tmp_path, change, which):
    names = {1: "cat", 2: "dog"}
    if change == "rename":
        names[which] = names[which] + "x"
    elif change == "drop":
        del names[which]
    elif change == "add":
        names[7] = "bird"
    else:
        names = {1: "dog", 2: "cat"}
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(COCO))
    with pytest.raises(DatasetError, match=r"coco.json: its categories are not those of the cache's vocabulary 'toy'"):
        load_ground_truth(path, _vocabulary(names))


# -- No command prints a traceback for bad input -------------------------------------------------


def _commands(tmp, models):
    text_file = tmp / "not-a-checkpoint[" / "b][copy].pth"  # the path shows as ...[/b][copy].pth
    text_file.parent.mkdir()
    text_file.write_text("hello")
    missing = str(tmp / "no[/b]such[copy]")
    model = [
        *model_args(models),
    ]
    return {
        "extract-config": (["extract", "-m", missing, "-c", missing, "--set", "extract.shard_size=0"], "shard_size"),
        "extract-manifest": (["extract", "-m", missing, "-c", str(tmp / "c")], "no[/b]such[copy]"),
        "propose": (["propose", "-m", missing, "-d", missing, "-o", str(tmp / "p.json"), "--in-process"], "no[/b]such[copy]"),
        "train": (["train", "-c", missing, "-o", str(tmp / "h.safetensors"), "--set", "train.iterations=0"], "iterations"),
        "train-cache": (["train", "-c", missing, "-o", str(tmp / "h.safetensors")], "no[/b]such[copy]"),
        "eval": (["eval", "-c", missing, "-a", missing, "--head", missing, "--set", "eval.top_k_per_image=0"], "top_k"),
        "predict": (["predict", missing, "--head", missing, "--boxes", "1,1,5,5", "--vocab", "a", *model], "no[/b]such[copy]"),
        "demo": (["demo", "--workdir", str(tmp / "d"), "--iterations", "0"], "iterations"),
        "inspect": (["inspect", missing], "no[/b]such[copy]"),
        "search": (["search", "red", "-c", missing, "--head", missing], "no[/b]such[copy]"),
        "search-top": (["search", "red", "-c", missing, "--head", missing, "--top", "0"], "top"),
        "verify": (["verify", missing], "no[/b]such[copy]"),
        "repair": (["repair", missing, "-m", missing], "no[/b]such[copy]"),
        "import-checkpoint": (["import-checkpoint", str(text_file), "-o", str(tmp / "o.safetensors")], "[/b][copy].pth"),
        "sam-checkpoint-text": (
            [
                "predict",
                str(text_file),
                "--head",
                str(text_file),
                "--boxes",
                "1,1,5,5",
                "--vocab",
                "a",
                *model[:2],
                "--sam-checkpoint",
                str(text_file),
                *model[4:],
            ],
            "[/b][copy].pth",
        ),
    }


CASES = [
    "extract-config",
    "extract-manifest",
    "propose",
    "train",
    "train-cache",
    "eval",
    "predict",
    "demo",
    "inspect",
    "search",
    "search-top",
    "verify",
    "repair",
    "import-checkpoint",
    "sam-checkpoint-text",
]


@pytest.mark.parametrize("case", CASES)
def test_every_command_answers_bad_input_with_one_error_line(tmp_path, tiny_models, monkeypatch, capsys, case):
    args, named = _commands(tmp_path, tiny_models)[case]
    monkeypatch.setattr(sys, "argv", ["rs-cache", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    joined = " ".join(err.split())
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and joined.startswith("error:"), err
    assert named.replace(" ", "") in "".join(err.split()), err  # rich wraps long lines anywhere


def test_every_command_is_driven_with_bad_input():
    import typer

    commands = set(typer.main.get_command(cli.app).commands)
    assert commands <= {case.split("-config")[0].split("-manifest")[0].split("-cache")[0] for case in CASES} | {
        "import-checkpoint"
    }
