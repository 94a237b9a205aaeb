"""Recipes, overrides, manifests and COCO/LVIS annotation files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from regionspot_cache.config import ConfigError, Recipe, apply_overrides, load_recipe
from regionspot_cache.data.datasets import DatasetError, load_coco_format, load_manifest

REPO = Path(__file__).resolve().parent.parent


def test_recipe_fills_nested_dataclasses(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[models.clip]\nmodel = "ViT-B-16"\n[train]\nlr = 1\nlr_steps = [5, 9]\n')
    recipe = load_recipe(path)
    assert recipe.models.clip.model == "ViT-B-16" and recipe.models.clip.pretrained == "openai"
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float) and recipe.train.lr_steps == [5, 9]
    assert recipe.train.batch_size == Recipe().train.batch_size


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nlrr = 1\n", "unknown key"),
        ("[train]\nlr = 'x'\n", "train.lr"),
        ("[train\n", "not valid TOML"),
        ("[train]\nlr_steps = [1, 'a']\n", r"lr_steps\[1\]"),
    ],
)
def test_bad_recipes_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_recipe(path)
    assert "bad.toml" in str(info.value)


def test_overrides():
    recipe = apply_overrides(
        Recipe(),
        [
            "train.lr=1e-4",
            "train.lr_steps=[1,2]",
            "models.clip.model=ViT-B-16",
            "models.sam.checkpoint=/w/sam.pth",
            "train.normalize_feature_map=false",
        ],
    )
    assert recipe.train.lr == 1e-4 and recipe.train.lr_steps == [1, 2]
    assert recipe.models.clip.model == "ViT-B-16" and recipe.models.sam.checkpoint == "/w/sam.pth"
    assert recipe.train.normalize_feature_map is False
    for bad, message in [
        ("train.lr", "KEY=VALUE"),
        ("train.nope=1", "no field 'nope'"),
        ("nope.lr=1", "no section"),
        ("train.iterations=1.5", "train.iterations"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(Recipe(), [bad])


def test_shipped_recipes_and_manifests_load():
    recipes = sorted((REPO / "pipelines").glob("*.toml"))
    assert len(recipes) >= 3
    widths = {p.stem: load_recipe(p).models.clip.model for p in recipes}
    assert widths["regionspot_bl_stage1"] == "ViT-L-14" and widths["regionspot_bb_stage1"] == "ViT-B-16"
    for path in (REPO / "manifests").glob("*.toml"):
        manifest = load_manifest(path, "/data")
        assert manifest.annotations.is_absolute() and manifest.name == path.stem


def test_lvis_images_take_their_path_from_coco_url(tmp_path):
    path = tmp_path / "lvis.json"
    path.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 7, "width": 640, "height": 480, "coco_url": "http://images.cocodataset.org/val2017/000000000007.jpg"}
                ],
                "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [10, 20, 30, 40]}],
                "categories": [{"id": 2, "name": "b", "frequency": "c"}, {"id": 1, "name": "a", "frequency": "r"}],
            }
        )
    )
    dataset = load_coco_format(path, tmp_path / "coco")
    assert dataset.images[0].file_name == "val2017/000000000007.jpg"
    assert dataset.image_path(dataset.images[0]) == tmp_path / "coco" / "val2017" / "000000000007.jpg"
    np.testing.assert_array_equal(dataset.boxes_of(7).xyxy, [[10, 20, 40, 60]])
    assert [c.name for c in dataset.categories] == ["a", "b"]  # vocabulary in id order
    assert len(dataset.boxes_of(99)) == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"not valid JSON: .*line 1 column 2"),
        ('{"images": [{"id": 1}], "categories": []}', r"images\[0\]: malformed"),
        ('{"images": [], "categories": [], "annotations": [{"image_id": 1}]}', r"annotations\[0\]: malformed"),
        (
            '{"images": [{"id": 1, "file_name": "a", "width": 2, "height": 2}], "categories": [{"id": 1, "name": "a"}], '
            '"annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 1}, {"image_id": 2, "bbox": [0, 0, 1, 1], "category_id": 1}]}',
            r"annotations\[1\]: image_id 2 is not in images",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a", "width": 2, "height": 2}, {"id": 1, "file_name": "b", "width": 2, "height": 2}], '
            '"categories": []}',
            "images: duplicate id 1",
        ),
        ('{"images": {}, "categories": []}', "images: expected a list"),
        ("[]", "expected a JSON object"),
    ],
)
def test_malformed_annotation_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        load_coco_format(path, tmp_path)
    assert "broken.json" in str(info.value)


def test_manifest_errors(tmp_path):
    with pytest.raises(DatasetError, match="nope.toml: manifest not found"):
        load_manifest(tmp_path / "nope.toml")
    (tmp_path / "m.toml").write_text('name = "x"\n')
    with pytest.raises(DatasetError, match=r"m.toml: missing key\(s\) \['annotations', 'image_root'\]"):
        load_manifest(tmp_path / "m.toml")


def test_models_with_overrides_replaces_only_the_fields_given():
    from regionspot_cache.config import ClipSpec, ModelsConfig, SamSpec

    models = ModelsConfig(SamSpec("vit_b", "/sam.pth"), ClipSpec("ViT-L-14", "openai"))
    changed = models.with_overrides(sam_checkpoint="/elsewhere/sam.pth", clip_model="ViT-B-16")
    assert changed == ModelsConfig(SamSpec("vit_b", "/elsewhere/sam.pth"), ClipSpec("ViT-B-16", "openai"))
    assert models.with_overrides() == models and models.sam.checkpoint == "/sam.pth"  # a copy: the original is kept
