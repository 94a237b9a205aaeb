"""The fused SAM attention against segment-anything's own eager forward, with the same weights."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT

from regionspot_cache.encoders import build_sam, sam_attention
from regionspot_cache.encoders.sam_attention import FusedSamAttention, use_eager_attention, use_fused_attention


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def _randomise_rel_pos(module: torch.nn.Module) -> None:
    """SAM initialises the relative-position tables to zero; real checkpoints do not have zeros."""
    for name, parameter in module.named_parameters():
        if "rel_pos" in name:
            torch.nn.init.normal_(parameter, std=0.5)


def _small_encoder() -> ImageEncoderViT:
    """SAM's encoder class at a small size, with one global block (20x20 tokens, not a multiple of
    the 14-wide windows, so the windowed blocks pad) and one windowed block."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=320, embed_dim=48, depth=2, num_heads=3, out_chans=32, use_rel_pos=True, window_size=14, global_attn_indexes=(1,)
    ).eval()
    _randomise_rel_pos(encoder)
    return encoder


@pytest.mark.parametrize("bias_bytes", [sam_attention.BIAS_BYTES_PER_CALL, 3 * 400 * 4 * 7])
def test_fused_encoder_equals_eager(monkeypatch, bias_bytes):
    """Whole query range in one call, and in slices of 3 query rows (the last one shorter)."""
    monkeypatch.setattr(sam_attention, "BIAS_BYTES_PER_CALL", bias_bytes)
    encoder = _small_encoder()
    images = torch.randn(2, 3, 320, 320)
    with torch.no_grad():
        eager = encoder(images)
        assert use_fused_attention(encoder) == 2
        fused = encoder(images)
    assert _relative_error(fused, eager) <= 1e-4


def test_rel_pos_bias_matters_so_the_comparison_can_fail():
    encoder = _small_encoder()
    images = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        with_bias = encoder(images)
        for name, parameter in encoder.named_parameters():
            if "rel_pos" in name:
                parameter.zero_()
        use_fused_attention(encoder)
        without_bias = encoder(images)
    assert _relative_error(without_bias, with_bias) > 1e-2


def test_attention_without_rel_pos_equals_eager():
    torch.manual_seed(0)
    attention = Attention(32, num_heads=4, use_rel_pos=False).eval()
    tokens = torch.randn(3, 5, 6, 32)
    with torch.no_grad():
        eager = attention(tokens)
        use_fused_attention(attention)
        fused = attention(tokens)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)


def test_build_sam_uses_fused_attention_with_the_library_weights(tiny_models):
    fused = build_sam(tiny_models.sam.variant, tiny_models.sam.checkpoint)
    eager = build_sam(tiny_models.sam.variant, tiny_models.sam.checkpoint, attention="eager")
    blocks = [module for module in fused.image_encoder.modules() if isinstance(module, Attention)]
    assert blocks and all(type(module) is FusedSamAttention for module in blocks)
    assert not any(type(module) is FusedSamAttention for module in eager.modules())
    assert fused.state_dict().keys() == eager.state_dict().keys()
    _randomise_rel_pos(fused)
    eager.load_state_dict(fused.state_dict())
    side = fused.image_encoder.img_size
    images = torch.randn(1, 3, side, side)
    with torch.no_grad():
        assert _relative_error(fused.image_encoder(images), eager.image_encoder(images)) <= 1e-4
    assert use_eager_attention(fused) == len(blocks)
    assert not any(type(module) is FusedSamAttention for module in fused.modules())


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="unknown SAM attention 'flash'"):
        build_sam("tiny", None, attention="flash")
