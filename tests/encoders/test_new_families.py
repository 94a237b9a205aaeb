"""New encoder families through the user's path: a timm-based SigLIP-shaped CLIP tower and SAM 2.1,
tiny random-weight configs written to files and loaded back."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from typer.testing import CliRunner

from regionspot_cache.cli import app
from regionspot_cache.demo.tiny_models import write_tiny_checkpoints
from regionspot_cache.encoders import load_frozen_encoders
from regionspot_cache.encoders.clip import ClipEncoder, load_clip
from regionspot_cache.encoders.tower import NoTokenGridError
from regionspot_cache.head.model import region_logits

pytest.importorskip("timm")
pytest.importorskip("sam2")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def new_models(tmp_path_factory):
    return write_tiny_checkpoints(
        tmp_path_factory.mktemp("new_families"), seed=0, sam_variant="sam2_tiny", clip_model="RS-Tiny-Timm-ViT"
    )


@pytest.fixture(scope="module")
def new_encoders(new_models):
    return load_frozen_encoders(new_models, CPU)


def test_open_clip_vit_maps_are_the_transformer_output_before_ln_post():
    torch.manual_seed(0)
    model = open_clip.create_model("RS-Tiny-ViT").eval()
    pixels = torch.randn(2, 3, 128, 128)
    captured = []
    handle = model.visual.transformer.register_forward_hook(lambda _m, _i, output: captured.append(output))
    with torch.no_grad():
        model.visual(pixels)
    handle.remove()
    assert torch.equal(ClipEncoder(model, None, CPU).feature_maps(pixels), captured[0])


def test_timm_tower_without_class_token_caches_the_patch_grid_before_the_final_norm(new_encoders):
    clip = new_encoders.clip
    trunk = clip.model.visual.trunk
    assert trunk.num_prefix_tokens == 0 and clip.num_tokens == 64 and clip.width == 48
    pixels = torch.randn(2, 3, *clip.image_size)
    maps = clip.feature_maps(pixels)
    assert maps.shape == (2, 64, 48)
    with torch.no_grad():  # timm's own forward: the same tokens with the final norm applied
        assert torch.allclose(trunk.norm(maps), trunk.forward_features(pixels), atol=1e-6)
    identity = new_encoders.clip_provenance()
    assert identity.num_tokens == 64 and "0 prefix token(s)" in identity.feature_map and "timm" in identity.feature_map


def test_logit_bias_is_recorded_and_added_to_every_logit(new_encoders):
    identity = new_encoders.clip_provenance()
    assert identity.logit_bias == pytest.approx(-10.0)
    assert identity.text_dim == 48
    text = new_encoders.clip.text_embeddings(["cat", "dog", "traffic light"])
    regions = torch.nn.functional.normalize(torch.randn(4, 48), dim=-1)
    with_bias = region_logits(regions, text, identity.logit_scale, identity.logit_bias)
    torch.testing.assert_close(with_bias - region_logits(regions, text, identity.logit_scale), torch.full((4, 3), -10.0))


def test_a_tower_without_a_token_grid_is_refused_naming_the_model(tmp_path):
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "timm_model_name": "test_convnext", "timm_pool": "avg", "timm_proj": "linear"},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "RS-Test-ConvNeXt.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    with pytest.raises(NoTokenGridError, match="'RS-Test-ConvNeXt'.*ConvNeXt"):
        load_clip("RS-Test-ConvNeXt", None, CPU)


def test_sam2_matches_the_librarys_image_predictor(new_encoders, rgb_image):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    sam = new_encoders.sam
    embedding = sam.embed_images([sam.resizer()(rgb_image)])[0]
    boxes = np.array([[10, 10, 60, 50], [30, 20, 130, 80], [0, 0, 140, 90]], dtype=np.float32)
    predictor = SAM2ImagePredictor(sam.model)
    grid = sam.input_size // 16
    predictor._bb_feat_sizes = [(grid * 4, grid * 4), (grid * 2, grid * 2), (grid, grid)]  # it assumes 1024 pixels
    predictor.set_image(rgb_image)
    torch.testing.assert_close(embedding.image_embed, predictor._features["image_embed"][0])
    decoded = []
    handle = sam.model.sam_mask_decoder.transformer.register_forward_hook(lambda _m, _i, output: decoded.append(output[0]))
    masks, _, _ = predictor.predict(box=boxes, multimask_output=False)
    handle.remove()
    # Output tokens: object score, IoU, then mask token 0 (the single-mask output) at index 2.
    torch.testing.assert_close(sam.box_tokens(embedding, boxes, rgb_image.shape[:2]), decoded[0][:, 2], atol=1e-5, rtol=0)
    assert np.array_equal(sam.box_masks(embedding, boxes, rgb_image.shape[:2]).numpy(), masks[:, 0].astype(bool))
    identity = new_encoders.sam_provenance()
    assert identity.variant == "sam2_tiny" and identity.input_size == 256 and "index 2" in identity.token


def test_a_sam2_checkpoint_of_another_variant_is_one_clear_error(new_models, tmp_path):
    from regionspot_cache.encoders.frozen import load_box_encoder

    other = tmp_path / "other.pth"
    torch.save({"model": {"image_encoder.trunk.pos_embed": torch.zeros(1)}}, other)
    with pytest.raises(ValueError, match="other.pth: does not fit SAM 2 'sam2_tiny'"):
        load_box_encoder("sam2_tiny", str(other), CPU)


def test_demo_runs_extract_train_eval_on_the_new_families(tmp_path):
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--workdir",
            str(workdir),
            "--train-images",
            "12",
            "--val-images",
            "6",
            "--iterations",
            "10",
            "--sam-variant",
            "sam2_tiny",
            "--clip-model",
            "RS-Tiny-Timm-ViT",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (workdir / "models" / "sam_sam2_tiny.pth").is_file() and (workdir / "models" / "clip_RS-Tiny-Timm-ViT.pt").is_file()
    provenance = json.loads((workdir / "cache" / "train" / "cache.json").read_text())
    assert provenance["sam"]["variant"] == "sam2_tiny" and provenance["clip"]["logit_bias"] == pytest.approx(-10.0)
    metrics = json.loads((workdir / "demo_metrics.json").read_text())
    assert all(metrics["trained"][m] is None or 0 <= metrics["trained"][m] <= 1 for m in ("AP", "APr", "APc", "APf"))


@pytest.mark.parametrize("recipe", ["regionspot_sam21bplus_pecorel_stage1", "regionspot_b_so400m_stage1"])
def test_the_new_recipes_extract_with_the_tiny_models_of_their_families(recipe, new_models, tmp_path):
    from pathlib import Path

    from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split

    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=2, seed=3, min_size=64, max_size=96))
    manifest = tmp_path / "toy.toml"
    manifest.write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    recipe_file = Path(__file__).resolve().parents[2] / "pipelines" / f"{recipe}.toml"
    result = CliRunner().invoke(
        app,
        [
            "extract",
            "-r",
            str(recipe_file),
            "-m",
            str(manifest),
            "--data-root",
            str(tmp_path),
            "-c",
            str(tmp_path / "cache"),
            "--sam-variant",
            "sam2_tiny",
            "--sam-checkpoint",
            new_models.sam.checkpoint,
            "--clip-model",
            new_models.clip.model,
            "--clip-pretrained",
            new_models.clip.pretrained,
            "--set",
            "extract.num_workers=0",
            "--set",
            "extract.batch_size=2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "extracted 2 images" in result.output
