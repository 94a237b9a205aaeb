"""Encoders against independent computations with the libraries' own modules."""

from __future__ import annotations

import os
import pickle

import numpy as np
import open_clip
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from segment_anything import SamPredictor

from regionspot_cache.encoders import build_sam
from regionspot_cache.runtime.weights import UnsafeCheckpointError, load_torch_weights


def _manual_vit_tokens(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The ViT forward written out with open_clip's modules, stopping before ln_post."""
    x = visual.conv1(pixels).flatten(2).permute(0, 2, 1)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    if not visual.transformer.batch_first:
        x = x.transpose(0, 1)
    for block in visual.transformer.resblocks:
        x = block(x)
    return x if visual.transformer.batch_first else x.transpose(0, 1)


def test_feature_map_is_vit_output_before_ln_post(encoders, rgb_image):
    clip = encoders.clip
    pixels = torch.stack([clip.preprocess(Image.fromarray(rgb_image)), clip.preprocess(Image.fromarray(rgb_image[::-1].copy()))])
    ours = clip.feature_maps(pixels)
    with torch.no_grad():
        expected = _manual_vit_tokens(clip.model.visual, pixels)
        after_ln_post = clip.model.visual.ln_post(expected)
    grid = clip.model.visual.grid_size
    assert ours.shape == (2, 1 + grid[0] * grid[1], clip.width)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, after_ln_post, atol=1e-2)


def test_clip_preprocess_resizes_whole_image_without_crop(encoders, rgb_image):
    clip = encoders.clip
    cfg = clip.model.visual.preprocess_cfg
    height, width = clip.image_size
    resized = Image.fromarray(rgb_image).resize((width, height), Image.BICUBIC)
    expected = (np.asarray(resized, np.float32) / 255 - np.array(cfg["mean"], np.float32)) / np.array(cfg["std"], np.float32)
    ours = clip.preprocess(Image.fromarray(rgb_image))
    assert ours.shape == (3, height, width)
    np.testing.assert_allclose(ours.permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_text_embeddings_are_normalised_template_means(encoders, tiny_models):
    clip = encoders.clip
    tokenizer = open_clip.get_tokenizer(tiny_models.clip.model)
    names = ["red square", "table", "yellow triangle"]
    ours = clip.text_embeddings(names)
    for row, name in enumerate(names):
        with torch.no_grad():
            features = clip.model.encode_text(tokenizer([t(name) for t in OPENAI_IMAGENET_TEMPLATES]))
        features = features / features.norm(dim=-1, keepdim=True)
        mean = features.mean(0)
        torch.testing.assert_close(ours[row], mean / mean.norm(), rtol=1e-5, atol=1e-5)
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    torch.testing.assert_close(clip.text_embeddings(["table-merged", "table-other"]), ours[[1, 1]])


def test_sam_embedding_matches_sam_predictor(encoders, rgb_image):
    predictor = SamPredictor(encoders.sam.sam)
    predictor.set_image(rgb_image)
    ours = encoders.sam.embed_images([encoders.sam.resizer()(rgb_image)])
    torch.testing.assert_close(ours, predictor.features, rtol=1e-5, atol=1e-5)


def test_box_tokens_match_mask_decoder_internals(encoders, rgb_image):
    """Our direct transformer call vs the token SAM's own mask decoder computes, captured by a
    forward hook while ``SamPredictor.predict`` runs box by box."""
    sam = encoders.sam.sam
    predictor = SamPredictor(sam)
    predictor.set_image(rgb_image)
    boxes = np.array([[10, 5, 60, 40], [30, 20, 90, 60], [0, 0, 140, 90], [100, 50, 139, 89], [5.5, 7.25, 33, 80]], np.float32)
    captured = []
    handle = sam.mask_decoder.transformer.register_forward_hook(lambda m, i, out: captured.append(out[0][:, 1, :]))
    try:
        for box in boxes:
            predictor.predict(box=box, multimask_output=False)
    finally:
        handle.remove()
    expected = torch.cat(captured)
    ours = encoders.sam.box_tokens(predictor.features[0], boxes, rgb_image.shape[:2], boxes_per_call=2)
    assert ours.shape == (5, 256)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip_and_wrong_architecture(tiny_models, encoders, tmp_path):
    reloaded = build_sam("tiny", tiny_models.sam.checkpoint)
    for key, value in encoders.sam.sam.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sam_tiny.pth"):
        build_sam("vit_b", tiny_models.sam.checkpoint)


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"weights": _Exploit(str(marker))}, handle)
    torch.save({"weights": _Exploit(str(marker))}, tmp_path / "evil_torch.pth")
    for candidate in (path, tmp_path / "evil_torch.pth"):
        with pytest.raises(UnsafeCheckpointError, match=candidate.name):
            load_torch_weights(candidate)
    assert not marker.exists()


def test_recorded_weight_paths_are_absolute(encoders, tiny_models, monkeypatch):
    """A cache records where its weights are; relative paths would break every later command
    run from another directory (eval --masks, the clip-* baselines, repair)."""
    import dataclasses
    from pathlib import Path

    from regionspot_cache.config import ClipSpec, ModelsConfig, SamSpec
    from regionspot_cache.identity import WeightFiles

    monkeypatch.chdir(Path(tiny_models.sam.checkpoint).parent)
    relative = ModelsConfig(SamSpec("tiny", "sam_tiny.pth"), ClipSpec(tiny_models.clip.model, "clip_tiny.pt"))
    assert dataclasses.replace(encoders, spec=relative).weight_files() == WeightFiles(
        sam_checkpoint=str(Path(tiny_models.sam.checkpoint).resolve()),
        clip_pretrained=str(Path(tiny_models.clip.pretrained).resolve()),
    )
    tagged = ModelsConfig(SamSpec("tiny", None), ClipSpec("ViT-B-16", "openai"))
    assert dataclasses.replace(encoders, spec=tagged).weight_files() == WeightFiles(sam_checkpoint=None, clip_pretrained="openai")


def test_long_vocabularies_are_encoded_in_chunks_with_the_same_embeddings(encoders, capsys):
    from regionspot_cache.encoders.clip import TEXT_CHUNK

    names = [f"thing {i}" for i in range(TEXT_CHUNK + 6)]  # two chunks: a progress bar is shown
    chunked = encoders.clip.text_embeddings(names)
    one_by_one = torch.cat([encoders.clip.text_embeddings([name]) for name in (names[0], names[-1])])
    torch.testing.assert_close(chunked[[0, -1]], one_by_one, rtol=1e-5, atol=1e-6)
    assert chunked.shape == (len(names), encoders.clip.text_dim)
    assert "encode class names" in capsys.readouterr().err
