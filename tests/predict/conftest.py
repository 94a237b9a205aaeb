"""What the predict tests share: a vocabulary, boxes of the 140x90 test image, and a tiny head."""

from __future__ import annotations

import pytest
import torch

from regionspot_cache.head.model import HeadConfig, RegionSpotHead, save_head

VOCAB = ["red square", "blue triangle", "traffic light"]
BOXES = [[10, 5, 60, 40], [30.5, 20, 90, 60], [-5, 0, 150, 95]]  # the last one is clipped to 140x90


@pytest.fixture(scope="module")
def head_path(tmp_path_factory, encoders):
    torch.manual_seed(0)
    head = RegionSpotHead(HeadConfig(clip_width=encoders.clip.width, text_dim=encoders.clip.text_dim, num_layers=1, ffn_dim=64))
    path = tmp_path_factory.mktemp("head") / "head.safetensors"
    save_head(head, path)
    return path
