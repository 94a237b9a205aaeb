"""Custom-vocabulary prediction: the Python API against a hand-run pipeline, the text embedding
cache (memory and disk), bad input, and `rs-cache predict`."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor
from typer.testing import CliRunner

from regionspot_cache import cli
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, save_head
from regionspot_cache.predict.predictor import Predictor
from regionspot_cache.regions.masks import decode_rle
from tests.predict.conftest import BOXES, VOCAB

runner = CliRunner()


@pytest.fixture(scope="module")
def predictor(head_path, encoders, tmp_path_factory):
    return Predictor.from_head_file(head_path, encoders, text_cache_dir=tmp_path_factory.mktemp("text"))


def count_text_calls(monkeypatch, predictor: Predictor) -> list[list[str]]:
    calls: list[list[str]] = []
    original = predictor.encoders.clip.text_embeddings
    monkeypatch.setattr(
        predictor.encoders.clip,
        "text_embeddings",
        lambda names, recipe="openclip": calls.append(list(names)) or original(names, recipe),
    )
    return calls


def test_predict_matches_the_pipeline_run_by_hand(predictor, encoders, rgb_image):
    results = predictor.predict(rgb_image, BOXES, VOCAB, masks=True)
    clipped = np.array([[10, 5, 60, 40], [30.5, 20, 90, 60], [0, 0, 140, 90]], np.float32)
    sam_predictor = SamPredictor(encoders.sam.sam)
    sam_predictor.set_image(rgb_image)
    clip = encoders.clip
    with torch.no_grad():
        tokens = encoders.sam.box_tokens(sam_predictor.features[0], clipped, (90, 140))
        feature_map = clip.feature_maps(clip.preprocess(Image.fromarray(rgb_image))[None])
        regions = predictor.head(tokens[None], feature_map)[0]
        probs = torch.softmax(clip.logit_scale * regions @ clip.text_embeddings(VOCAB).T, dim=-1)
    assert [r.box for r in results] == clipped.tolist()
    assert [r.label for r in results] == [VOCAB[i] for i in probs.argmax(-1).tolist()]
    np.testing.assert_allclose([r.score for r in results], probs.max(-1).values.numpy(), rtol=1e-4)
    expected_masks = np.stack([sam_predictor.predict(box=b, multimask_output=False)[0][0] for b in clipped])
    np.testing.assert_array_equal(decode_rle([r.mask for r in results]), expected_masks)
    json.dumps([r.to_json() for r in results])  # plain JSON types throughout
    assert set(predictor.predict(rgb_image, BOXES[:1], VOCAB)[0].to_json()) == {"box", "label", "score"}


def test_images_as_array_pil_or_file_give_the_same_result(predictor, rgb_image, tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(rgb_image).save(path)
    from_array = predictor.predict(rgb_image, BOXES, VOCAB)
    assert predictor.predict(Image.fromarray(rgb_image), BOXES, VOCAB) == from_array
    assert predictor.predict(str(path), BOXES, VOCAB) == from_array
    assert predictor.predict(rgb_image, np.zeros((0, 4)), VOCAB) == []


def test_text_embeddings_are_computed_once_per_model_and_vocabulary(head_path, encoders, rgb_image, tmp_path, monkeypatch):
    first = Predictor.from_head_file(head_path, encoders, text_cache_dir=tmp_path / "text")
    calls = count_text_calls(monkeypatch, first)
    expected = first.predict(rgb_image, BOXES, VOCAB)
    assert calls == [VOCAB]
    first.predict(rgb_image, BOXES, VOCAB)
    assert calls == [VOCAB]  # in memory
    files = list((tmp_path / "text").glob("*.safetensors"))
    assert len(files) == 1 and len(files[0].stem) == 64  # SHA-256 hex
    embeddings = first.text.get(VOCAB)
    torch.testing.assert_close(embeddings, encoders.clip.text_embeddings(VOCAB))  # the cache's own text code
    calls.clear()

    second = Predictor.from_head_file(head_path, encoders, text_cache_dir=tmp_path / "text")
    assert second.predict(rgb_image, BOXES, VOCAB) == expected
    assert calls == []  # from disk, not recomputed
    second.text.get(VOCAB[::-1])
    assert calls == [VOCAB[::-1]]  # another vocabulary (order matters) is another key

    files[0].write_bytes(b"damaged")  # a damaged file is recomputed, not trusted
    third = Predictor.from_head_file(head_path, encoders, text_cache_dir=tmp_path / "text")
    torch.testing.assert_close(third.text.get(VOCAB), embeddings)
    assert calls == [VOCAB[::-1], VOCAB]


@pytest.mark.parametrize(
    "boxes, vocab, message",
    [
        (BOXES, [], "vocabulary is empty"),
        (BOXES, ["cat", " "], "class name 2 is empty"),
        (BOXES, ["cat", "dog", "cat"], "'cat' appears twice"),
        (
            [[10, 10, 20, 20], [200, 10, 220, 20]],
            VOCAB,
            r"box 1 \[200.0, 10.0, 220.0, 20.0\]: .*outside the image; the image is 140x90",
        ),
        ([[10, 10, 10, 20]], VOCAB, "box 0 .*zero or negative size"),
        ([[1, 2, 3]], VOCAB, "expected an \\(N, 4\\) array"),
    ],
)
def test_bad_input_is_named(predictor, rgb_image, boxes, vocab, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(rgb_image, boxes, vocab)


def test_bad_images_are_named(predictor, rgb_image, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg: cannot decode"):
        predictor.predict(tmp_path / "bad.jpg", BOXES, VOCAB)
    with pytest.raises(ValueError, match="missing.png: file not found"):
        predictor.predict(tmp_path / "missing.png", BOXES, VOCAB)
    with pytest.raises(ValueError, match="image array"):
        predictor.predict(rgb_image.astype(np.float32), BOXES, VOCAB)


def model_args(tiny_models) -> list[str]:
    return [
        "--sam-variant",
        "tiny",
        "--sam-checkpoint",
        tiny_models.sam.checkpoint,
        "--clip-model",
        tiny_models.clip.model,
        "--clip-pretrained",
        tiny_models.clip.pretrained,
    ]


def test_predict_command_prints_json_and_writes_png(tiny_models, head_path, rgb_image, tmp_path):
    image = tmp_path / "scene.jpg"
    Image.fromarray(rgb_image).save(image, quality=95)
    common = ["predict", str(image), "--head", str(head_path), "--text-cache", str(tmp_path / "text"), *model_args(tiny_models)]
    out = tmp_path / "out" / "scene.png"
    result = runner.invoke(
        cli.app, [*common, "--boxes", "10,5,60,40; 30,20,90,60", "--vocab", "red square, sky ,dog", "--masks", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    regions = json.loads(result.stdout)
    assert [r["box"] for r in regions] == [[10, 5, 60, 40], [30, 20, 90, 60]]
    assert all(r["label"] in ("red square", "sky", "dog") and 0 < r["score"] <= 1 and "counts" in r["mask"] for r in regions)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (140, 90)
        drawn = np.asarray(png.convert("RGB"))
    assert not np.array_equal(drawn, np.asarray(Image.open(image).convert("RGB")))  # boxes and masks drawn

    (tmp_path / "boxes.json").write_text(json.dumps({"boxes": [[10, 5, 60, 40]]}))
    (tmp_path / "vocab.txt").write_text("red square\n\nsky\n")
    result = runner.invoke(
        cli.app,
        [
            *common,
            "--boxes-file",
            str(tmp_path / "boxes.json"),
            "--vocab-file",
            str(tmp_path / "vocab.txt"),
            "--out",
            str(tmp_path / "second.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    second = json.loads(result.stdout)
    assert len(second) == 1 and second[0]["label"] in ("red square", "sky") and "mask" not in second[0]
    assert (tmp_path / "second.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--boxes", "10,5,60,40;1,2,3", "--vocab", "a,b"], "--boxes: box 2 '1,2,3' is not x1,y1,x2,y2"),
        (["--boxes", "10,5,60,40", "--vocab", " , "], "--vocab: the vocabulary is empty"),
        (["--boxes-file", "{tmp}/nope.json", "--vocab", "a"], "nope.json: boxes file not found"),
        (["--boxes", "10,5,60,40", "--vocab-file", "{tmp}/empty.txt"], "empty.txt: the vocabulary file has no class names"),
        (["--boxes", "10,5,60,40"], "exactly one of --vocab and --vocab-file"),
        (["--boxes", "200,5,600,40", "--vocab", "a"], r"box 0 \[200.0, 5.0, 600.0, 40.0\]: .*outside the image"),
    ],
)
def test_predict_command_errors_are_one_clear_line(
    tiny_models, head_path, rgb_image, tmp_path, monkeypatch, capsys, args, message
):
    image = tmp_path / "scene.png"
    Image.fromarray(rgb_image).save(image)
    (tmp_path / "empty.txt").write_text("\n \n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    argv = [
        "rs-cache",
        "predict",
        str(image),
        "--head",
        str(head_path),
        "--text-cache",
        str(tmp_path / "text"),
        "--out",
        str(tmp_path / "o.png"),
        *model_args(tiny_models),
        *args,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    error = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert error.startswith("error:")
    assert re.search(message, error), error


def test_predict_command_names_an_unreadable_image(tiny_models, head_path, tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "rs-cache",
            "predict",
            str(tmp_path / "broken.jpg"),
            "--head",
            str(head_path),
            "--boxes",
            "1,1,5,5",
            "--vocab",
            "a",
            *model_args(tiny_models),
        ],
    )
    with pytest.raises(SystemExit):
        cli.main()
    assert "broken.jpg: cannot decode image" in " ".join(capsys.readouterr().err.split())


def test_text_recipe_and_preprocessing_follow_the_head(head_path, encoders, tmp_path):
    ours = Predictor.from_head_file(head_path, encoders, text_cache_dir=tmp_path / "text")
    assert ours.encoders.preprocess == "direct" and ours.text.recipe == "openclip"
    released = Predictor.from_head_file(
        head_path, encoders, text_cache_dir=tmp_path / "text", preprocess="released", text_recipe="released"
    )
    assert released.encoders.preprocess == "released" and released.text.key(VOCAB) != ours.text.key(VOCAB)
    torch.testing.assert_close(released.text.get(VOCAB), encoders.clip.text_embeddings(VOCAB, "released"))
    # A head imported from a released checkpoint (its JSON records the origin) gets the released inputs.
    config = json.loads(head_path.with_suffix(".json").read_text())
    imported = tmp_path / "imported.safetensors"
    imported.write_bytes(head_path.read_bytes())
    imported.with_suffix(".json").write_text(json.dumps({**config, "imported_from": "regionspot_bl.pth"}))
    predictor = Predictor.from_head_file(imported, encoders, disk_cache=False)
    assert predictor.encoders.preprocess == "released" and predictor.text.recipe == "released"


def test_attention_maps_have_the_grid_shape_and_sum_to_one_with_the_class_token(predictor, rgb_image):
    results = predictor.predict(rgb_image, BOXES, VOCAB, attention=True)
    grid = tuple(predictor.encoders.clip.model.visual.grid_size)
    for result in results:
        assert result.attention.shape == grid and result.attention.dtype == np.float32
        assert (result.attention >= 0).all()
        assert result.attention.sum() + result.attention_class_token == pytest.approx(1.0, abs=1e-5)
    # Asking for the maps changes no label or score.
    plain = predictor.predict(rgb_image, BOXES, VOCAB)
    assert [r.label for r in plain] == [r.label for r in results]
    assert [r.score for r in plain] == pytest.approx([r.score for r in results], rel=1e-5)


def test_head_attention_path_gives_the_forward_embeddings(predictor):
    torch.manual_seed(1)
    clip = predictor.encoders.clip
    tokens, feature_map = torch.randn(2, 3, 256), torch.randn(2, clip.num_tokens, clip.width)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    embeddings, weights = predictor.head.forward_with_attention(tokens, feature_map, mask)
    torch.testing.assert_close(embeddings, predictor.head(tokens, feature_map, mask))
    assert weights.shape == (2, 3, feature_map.shape[1])
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("rule", ["max-softmax", "max-sigmoid", "background-prompt"])
def test_open_set_rules_reject_below_the_threshold(predictor, rgb_image, rule):
    from regionspot_cache.config import OpenSetConfig

    scored = predictor.predict(rgb_image, BOXES, VOCAB, open_set=OpenSetConfig(rule, threshold=0.0))
    assert all(r.label in VOCAB and 0.0 <= r.known <= 1.0 for r in scored)
    middle = sorted(r.known for r in scored)[1]
    judged = predictor.predict(rgb_image, BOXES, VOCAB, open_set=OpenSetConfig(rule, threshold=middle))
    assert [r.label is None for r in judged] == [r.known < middle for r in scored]
    assert sum(r.label is None for r in judged) >= 1 or len({r.known for r in scored}) == 1


def test_predict_command_draws_attention_and_rejects(tiny_models, head_path, rgb_image, tmp_path):
    Image.fromarray(rgb_image).save(tmp_path / "in.png")
    out = tmp_path / "in.regions.png"
    result = runner.invoke(
        cli.app,
        [
            "predict",
            str(tmp_path / "in.png"),
            "--head",
            str(head_path),
            *model_args(tiny_models),
            "--text-cache",
            str(tmp_path / "text"),
            "--boxes",
            "10,5,60,40; 30,20,90,60",
            "--vocab",
            "red square,dog",
            "--attention",
            "--reject",
            "max-sigmoid",
            "--set",
            "eval.open_set.threshold=1.0",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    regions = json.loads(result.stdout)
    assert [r["label"] for r in regions] == [None, None]  # nothing reaches a known score of 1
    assert all("attention" not in r and 0 <= r["attention_class_token"] <= 1 for r in regions)
    with Image.open(tmp_path / "in.attention.png") as sheet:
        assert sheet.width > sheet.height / 2 and len(np.unique(np.asarray(sheet).reshape(-1, 3), axis=0)) > 50


def test_a_predictor_from_its_parts_answers_as_from_files(predictor, rgb_image):
    parts = Predictor(predictor.head, predictor.encoders, predictor.text)
    assert parts.predict(rgb_image, BOXES, VOCAB) == predictor.predict(rgb_image, BOXES, VOCAB)


def test_attention_with_a_tower_without_class_token(tmp_path, rgb_image):
    """A SigLIP-shaped timm tower has no class token and keeps its grid elsewhere than open_clip's:
    the map still has the grid's shape and sums to one, with no class-token share reported."""
    from regionspot_cache.demo.tiny_models import write_tiny_checkpoints
    from regionspot_cache.encoders import load_frozen_encoders

    encoders = load_frozen_encoders(write_tiny_checkpoints(tmp_path, clip_model="RS-Tiny-Timm-ViT"), torch.device("cpu"))
    head = RegionSpotHead(HeadConfig(clip_width=encoders.clip.width, text_dim=encoders.clip.text_dim, num_layers=1, ffn_dim=32))
    save_head(head, tmp_path / "head.safetensors")
    predictor = Predictor.from_head_file(tmp_path / "head.safetensors", encoders, text_cache_dir=tmp_path / "text")
    for result in predictor.predict(rgb_image, BOXES[:1], VOCAB, attention=True):
        assert result.attention.shape == encoders.clip.tower.grid and result.attention_class_token is None
        assert result.attention.sum() == pytest.approx(1.0, abs=1e-5) and "attention_class_token" not in result.to_json()
