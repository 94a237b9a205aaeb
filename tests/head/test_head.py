"""Head, loss, schedule and batching against hand computations."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from regionspot_cache.config import TrainConfig
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, load_head, region_logits, save_head
from regionspot_cache.train.data import RegionItem, collate_regions
from regionspot_cache.train.loop import focal_loss, lr_factor
from regionspot_cache.train.order import EpochSampler

CONFIG = HeadConfig(clip_width=16, text_dim=8, num_heads=8, ffn_dim=32)


def test_focal_loss_matches_the_formula_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4) * 3
    labels = torch.tensor([[1, 3, -1], [0, -1, -1]])
    mask = labels >= 0
    expected, alpha, gamma = 0.0, 0.25, 2.0
    for b, n in itertools.product(range(2), range(3)):
        if labels[b, n] < 0:
            continue
        for c in range(4):
            x, t = logits[b, n, c].item(), float(labels[b, n].item() == c)
            p = 1 / (1 + math.exp(-x))
            ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
            p_t = p * t + (1 - p) * (1 - t)
            expected += (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma
    expected /= 3  # real boxes
    ours = focal_loss(logits, labels, mask, alpha, gamma)
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    logits[~mask] = 1e4  # whatever padding holds must not matter
    assert focal_loss(logits, labels, mask, alpha, gamma).item() == pytest.approx(expected, rel=1e-5)


def test_head_ignores_padding_and_normalises():
    torch.manual_seed(0)
    head = RegionSpotHead(CONFIG).eval()
    tokens, feature_map = torch.randn(1, 3, 256), torch.randn(1, 5, 16)
    alone = head(tokens, feature_map, torch.ones(1, 3, dtype=torch.bool))
    padded_tokens = torch.cat([tokens, torch.randn(1, 2, 256) * 50], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    padded = head(padded_tokens, feature_map, mask)
    torch.testing.assert_close(padded[:, :3], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.norm(dim=-1), torch.ones(1, 3))
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    torch.testing.assert_close(region_logits(alone[0], text, 50.0), 50.0 * alone[0] @ text.T)


def test_head_uses_released_module_names():
    keys = set(RegionSpotHead(CONFIG).state_dict())
    for key in (
        "to_clip.weight",
        "decoder.layers.0.self_attn.in_proj_weight",
        "decoder.layers.2.multihead_attn.out_proj.weight",
        "decoder.layers.1.linear1.weight",
        "decoder.layers.0.norm3.weight",
        "decoder.norm.weight",
        "projector.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith("ln_clip") for k in keys)  # no affine parameters
    assert "decoder.layers.3.linear1.weight" not in keys


def test_feature_map_normalisation_switch():
    torch.manual_seed(0)
    head = RegionSpotHead(CONFIG).eval()
    tokens, feature_map = torch.randn(1, 2, 256), torch.randn(1, 5, 16) * 7 + 3
    normalised = head(tokens, feature_map)
    head.config.normalize_feature_map = False
    raw_input = torch.nn.functional.layer_norm(feature_map, (16,))
    torch.testing.assert_close(head(tokens, raw_input), normalised)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    head = RegionSpotHead(CONFIG)
    save_head(head, tmp_path / "h.safetensors", {"vocabulary": "toy"})
    loaded, config = load_head(tmp_path / "h.safetensors")
    assert config.other["vocabulary"] == "toy" and loaded.config == CONFIG
    for key, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    (tmp_path / "h.json").unlink()
    with pytest.raises(FileNotFoundError, match="h.json"):
        load_head(tmp_path / "h.safetensors")


def test_lr_schedule_warmup_and_steps():
    config = TrainConfig(warmup_iters=100, warmup_factor=0.01, lr_steps=[300, 400], lr_gamma=0.1)
    assert lr_factor(0, config) == pytest.approx(0.01)
    assert lr_factor(50, config) == pytest.approx(0.505)
    assert lr_factor(100, config) == pytest.approx(1.0)
    assert lr_factor(299, config) == pytest.approx(1.0)
    assert lr_factor(300, config) == pytest.approx(0.1)
    assert lr_factor(450, config) == pytest.approx(0.01)


def test_collate_pads_and_masks():
    items = [
        RegionItem(np.ones((2, 256), np.float16), np.zeros((5, 16), np.float16), np.array([3, 1])),
        RegionItem(np.full((1, 256), 2, np.float16), np.ones((5, 16), np.float16), np.array([0])),
    ]
    batch = collate_regions(items)
    assert batch.tokens.shape == (2, 2, 256) and batch.feature_maps.shape == (2, 5, 16)
    assert batch.labels.tolist() == [[3, 1], [0, -1]]
    assert batch.box_mask.tolist() == [[True, True], [True, False]]
    assert batch.tokens[1, 1].abs().sum() == 0 and batch.tokens[1, 0, 0] == 2


def test_collate_in_a_loader_worker_fills_shared_memory(monkeypatch):
    """In a worker the batch is built in shared memory: sending it to the training process
    then copies nothing more (a plain tensor is copied into shared memory on its way)."""
    items = [
        RegionItem(np.ones((2, 256), np.float16), np.zeros((5, 16), np.float16), np.array([3, 1])),
        RegionItem(np.full((1, 256), 2, np.float16), np.arange(80, dtype=np.float16).reshape(5, 16), np.array([0])),
    ]
    plain = collate_regions(items)
    assert not plain.feature_maps.is_shared()
    monkeypatch.setattr("regionspot_cache.train.data.get_worker_info", lambda: object())
    shared = collate_regions(items)
    for field in ("tokens", "feature_maps", "box_mask", "labels"):
        assert getattr(shared, field).is_shared(), field
        assert torch.equal(getattr(shared, field), getattr(plain, field)), field


def test_epoch_sampler_is_seeded_and_resumable():
    def take(sampler, count):
        return list(itertools.islice(iter(sampler), count))

    full = take(EpochSampler(5, seed=3), 13)
    assert full == take(EpochSampler(5, seed=3), 13)
    assert sorted(i for _, i in full[:5]) == list(range(5)) and {e for e, _ in full[5:10]} == {1}
    assert take(EpochSampler(5, seed=3, start=7), 6) == full[7:13]
    assert full != take(EpochSampler(5, seed=4), 13)


@pytest.mark.parametrize(
    "recorded",
    [
        {"imported_from": "/weights/regionspot_bl.pth"},
        {"train": {"iterations": 3, "init_from": None}, "vocabularies": ["toy"], "caches": ["/caches/toy"]},
        {"vocabulary": "toy"},
    ],
    ids=["imported", "trained", "other keys"],
)
def test_a_head_json_as_written_before_reads_into_metadata_and_writes_back_the_same(tmp_path, recorded):
    import json

    from regionspot_cache.head.model import HeadMetadata

    save_head(RegionSpotHead(CONFIG), tmp_path / "h.safetensors")
    written = {"head": dataclasses.asdict(CONFIG), **recorded}
    (tmp_path / "h.json").write_text(json.dumps(written, indent=2))
    _, metadata = load_head(tmp_path / "h.safetensors")
    assert isinstance(metadata, HeadMetadata) and metadata.config == CONFIG
    assert metadata.imported == ("imported_from" in recorded)
    assert (metadata.imported_from, metadata.vocabularies) == (recorded.get("imported_from"), recorded.get("vocabularies"))
    assert metadata.to_json() == written


def test_the_recorded_encoders_read_back_typed_and_write_back_the_same(tmp_path, encoders):
    import json

    from regionspot_cache.errors import ModelLoadError
    from regionspot_cache.identity import TrainedWith, WeightFiles

    recorded = TrainedWith(
        encoders.sam_provenance(), encoders.clip_provenance(), WeightFiles("/w/sam.pth", "/w/clip.pt"), "openclip"
    )
    save_head(RegionSpotHead(CONFIG), tmp_path / "h.safetensors", {"encoders": recorded.to_dict()})
    _, metadata = load_head(tmp_path / "h.safetensors")
    assert metadata.encoders == recorded and metadata.other == {}
    assert metadata.to_json()["encoders"] == json.loads((tmp_path / "h.json").read_text())["encoders"]
    assert metadata.encoders.models().sam.checkpoint == "/w/sam.pth"
    broken = json.loads((tmp_path / "h.json").read_text())
    broken["encoders"]["sam"]["colour"] = "red"
    (tmp_path / "h.json").write_text(json.dumps(broken))
    with pytest.raises(ModelLoadError, match=r"h\.json: encoders: sam.*colour"):
        load_head(tmp_path / "h.safetensors")
