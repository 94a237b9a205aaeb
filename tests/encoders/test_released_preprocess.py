"""The ``released`` preprocessing and text recipe, each step against a computation written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from segment_anything import SamPredictor

from regionspot_cache.config import ConfigError, ExtractConfig, Preprocessing
from regionspot_cache.encoders.clip import RELEASED_TEMPLATES
from regionspot_cache.encoders.preprocess import TestResize

NAMES = ["cat", "traffic light", "table-merged"]


def detectron2_test_shape(height: int, width: int, short: int = 800, longest: int = 1333) -> tuple[int, int]:
    """ResizeShortestEdge's rule: short edge to 800; if the long edge then exceeds 1333, scale both
    down to fit; round each half up (int(x + 0.5))."""
    if height < width:
        new_h, new_w = short, width * short / height
    else:
        new_h, new_w = height * short / width, short
    if max(new_h, new_w) > longest:
        new_h, new_w = new_h * longest / max(new_h, new_w), new_w * longest / max(new_h, new_w)
    return int(new_h + 0.5), int(new_w + 0.5)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((480, 640), (800, 1067)),  # 640 x 5/3 = 1066.67, rounded up
        ((90, 140), (800, 1244)),  # 1244.44, rounded down
        ((1000, 600), (1333, 800)),  # 1333.33 > 1333: both x 0.99975 -> 1333, 799.8 -> 800
        ((100, 1000), (133, 1333)),  # 8000 > 1333: x 1/6.0015 -> 133.3, 1333
        ((800, 800), (800, 800)),
        ((2, 5), (533, 1333)),  # 2000 > 1333: 800 x 0.6665 = 533.2
    ],
)
def test_test_resize_shape_follows_detectron2_rule(size, expected):
    assert detectron2_test_shape(*size) == expected
    assert TestResize().shape(*size) == expected


def test_test_resize_is_pil_bilinear_on_uint8(rgb_image):
    expected = np.asarray(Image.fromarray(rgb_image).resize((1244, 800), Image.BILINEAR))
    np.testing.assert_array_equal(TestResize().array(rgb_image), expected)


def released_clip_input(rgb: np.ndarray, size: tuple[int, int], mean, std) -> torch.Tensor:
    """The released CLIP input written out: test resize, [0, 1] floats, bilinear interpolation
    without antialiasing (torch's own, which torchvision calls), then CLIP's mean/std."""
    height, width = detectron2_test_shape(*rgb.shape[:2])
    test_resized = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
    pixels = torch.tensor(test_resized, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_released_clip_input_is_tensor_resize_of_test_resized_image(encoders, rgb_image):
    clip = encoders.with_preprocess("released").clip
    cfg = clip.model.visual.preprocess_cfg
    expected = released_clip_input(rgb_image, clip.image_size, cfg["mean"], cfg["std"])
    ours = clip.preprocess(Image.fromarray(rgb_image))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    # Not the direct path, and the direct path is untouched by the released one existing.
    direct = encoders.clip.preprocess(Image.fromarray(rgb_image))
    assert (ours - direct).abs().max() > 1e-2
    assert encoders.clip.preprocessing == "direct" and encoders.with_preprocess("direct") is encoders


def test_released_boxes_are_scaled_to_test_resized_image_then_sam_transform(encoders):
    sam = encoders.with_preprocess("released").sam
    boxes = np.array([[10.0, 5.0, 60.0, 80.0], [0.0, 0.0, 140.0, 90.0]], np.float32)
    ours, frame = sam.prompt_boxes(boxes, (90, 140))
    assert frame == (800, 1244)
    # Original -> test-resized: x by 1244/140, y by 800/90; -> SAM: long side 1244 to its input side.
    scale = sam.input_size / 1244
    sam_h, sam_w = int(800 * scale + 0.5), int(1244 * scale + 0.5)
    expected = boxes * np.array([1244 / 140, 800 / 90] * 2) * np.array([sam_w / 1244, sam_h / 800] * 2)
    np.testing.assert_allclose(ours.cpu().numpy(), expected, rtol=1e-5)
    direct, frame = encoders.sam.prompt_boxes(boxes, (90, 140))
    assert frame == (90, 140)
    direct_h = int(90 * sam.input_size / 140 + 0.5)  # SAM's own rounding of the short side
    np.testing.assert_allclose(direct.numpy(), boxes * np.array([sam.input_size / 140, direct_h / 90] * 2), rtol=1e-5)


def test_released_sam_tokens_equal_sam_on_the_test_resized_image(encoders, rgb_image):
    """SAM's own predictor on the test-resized image, with boxes scaled by hand, gives the same
    embedding and tokens as the released path on the original image."""
    released = encoders.with_preprocess("released").sam
    test_resized = np.asarray(Image.fromarray(rgb_image).resize((1244, 800), Image.BILINEAR))
    predictor = SamPredictor(encoders.sam.sam)
    predictor.set_image(test_resized)
    ours = released.embed_images([released.resizer()(rgb_image)])
    torch.testing.assert_close(ours, predictor.features, rtol=1e-4, atol=1e-4)
    boxes = np.array([[10.0, 5.0, 60.0, 80.0]], np.float32)
    by_hand = boxes * np.array([1244 / 140, 800 / 90] * 2, np.float32)
    expected = encoders.sam.box_tokens(predictor.features[0], by_hand, (800, 1244))
    torch.testing.assert_close(released.box_tokens(ours[0], boxes, (90, 140)), expected, rtol=1e-4, atol=1e-4)


def hand_released_text(clip, names: list[str]) -> torch.Tensor:
    """The released recipe as a loop: for each class, raw text features of the 81 prompts
    (80 OpenAI ImageNet templates and '{}.'), averaged, then normalised once."""
    rows = []
    with torch.no_grad():
        for name in names:
            name = name.replace("-merged", "").replace("-other", "").replace("-stuff", "")
            prompts = [template(name) for template in OPENAI_IMAGENET_TEMPLATES] + [f"{name}."]
            raw = clip.model.encode_text(clip.tokenizer(prompts))  # (81, dim), one row per prompt
            mean = raw.mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def test_released_text_recipe_is_raw_mean_over_81_templates(encoders):
    clip = encoders.clip
    assert len(RELEASED_TEMPLATES) == 81 and RELEASED_TEMPLATES[-1] == "{}."
    ours = clip.text_embeddings(NAMES, "released")
    expected = hand_released_text(clip, NAMES)
    assert (ours - expected).norm() / expected.norm() <= 1e-5
    assert (ours - clip.text_embeddings(NAMES, "openclip")).abs().max() > 1e-4
    with pytest.raises(ValueError, match="text recipe 'paper'"):
        clip.text_embeddings(NAMES, "paper")


def test_released_identity_describes_its_steps(encoders):
    released = encoders.with_preprocess("released")
    assert released.sam_provenance().preprocess == Preprocessing("released").sam_steps
    assert "antialias=False" in released.clip_provenance().preprocess
    assert released.clip_provenance() != encoders.clip_provenance()
    # Caches made before the choice existed record the direct steps and read as direct.
    assert encoders.sam_provenance().preprocess == "ResizeLongestSide+pixel_mean_std+pad (SamPredictor.set_image)"
    assert Preprocessing.of_sam_steps(encoders.sam_provenance().preprocess) == "direct"
    assert Preprocessing.of_sam_steps(released.sam_provenance().preprocess) == "released"


def test_config_choices_are_validated():
    assert ExtractConfig().preprocess == "direct" and ExtractConfig().text_recipe == "openclip"
    with pytest.raises(ConfigError, match="extract.preprocess: 'paper' is not one of released, direct"):
        ExtractConfig(preprocess="paper")
    with pytest.raises(ConfigError, match="extract.text_recipe: 'x' is not one of released, openclip"):
        ExtractConfig(text_recipe="x")
