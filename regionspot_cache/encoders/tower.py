"""Which tokens of a CLIP vision tower make the cached feature map, taken the same way for every family.

open_clip's ``forward_intermediates`` runs its own forward up to the last block for both kinds of
ViT-like tower: its own ``VisionTransformer`` (OpenAI, LAION, DFN, MetaCLIP) and the timm-based
``TimmModel`` (SigLIP/SigLIP2, PE-Core, EVA02). What is cached is the output of the last block,
before the final norm (``ln_post`` / timm's ``norm``), as ``[prefix tokens, patch grid row-major]``:

- prefix tokens are what the tower puts before the patches: the class token (OpenAI, LAION,
  PE-Core, EVA02), also register tokens where a tower has them, and none for SigLIP/SigLIP2,
  which have no class token. Nothing is put in the class token's place: the head's
  cross-attention has no positions, so a missing prefix only removes one key from the memory.
- For open_clip's own ViT this is exactly the output of ``visual.transformer`` that RegionSpot
  takes (class token first, before ``ln_post``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.transformer import VisionTransformer

from regionspot_cache.errors import NoTokenGridError

FAMILY_OPEN_CLIP_VIT = "open_clip VisionTransformer"
FAMILY_TIMM_VIT = "timm ViT"


@dataclass(frozen=True)
class TokenTower:
    """A ViT-like vision tower and the shape of the feature map it yields."""

    visual: torch.nn.Module
    family: str
    width: int  # channels per token
    prefix_tokens: int  # class token and registers, before the patch grid
    grid: tuple[int, int]  # patch rows, patch columns

    def description(self) -> str:
        """What ``ClipIdentity.feature_map`` records."""
        return (
            f"{self.family}: last block output before the final norm, {self.prefix_tokens} prefix token(s) "
            f"then the {self.grid[0]}x{self.grid[1]} patch grid row-major (forward_intermediates)"
        )

    def last_block_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, prefix_tokens + rows * columns, width)."""
        out = self.visual.forward_intermediates(
            pixels, indices=1, intermediates_only=True, output_fmt="NLC", output_extra_tokens=self.prefix_tokens > 0
        )
        patches = out["image_intermediates"][-1]
        if self.prefix_tokens == 0:
            return patches
        return torch.cat([out["image_intermediates_prefix"][-1], patches], dim=1)


def token_tower(visual: torch.nn.Module, model_name: str) -> TokenTower:
    """The tower of ``visual``, or NoTokenGridError naming ``model_name`` when it yields no patch tokens."""
    if isinstance(visual, VisionTransformer):
        return TokenTower(visual, FAMILY_OPEN_CLIP_VIT, int(visual.class_embedding.shape[-1]), 1, tuple(visual.grid_size))
    trunk = getattr(visual, "trunk", None)
    patch_embed = getattr(trunk, "patch_embed", None)
    if trunk is not None and hasattr(trunk, "num_prefix_tokens") and hasattr(patch_embed, "grid_size"):
        return TokenTower(
            visual,
            FAMILY_TIMM_VIT,
            int(trunk.embed_dim),
            int(trunk.num_prefix_tokens),
            tuple(int(n) for n in patch_embed.grid_size),
        )
    kind = type(trunk if trunk is not None else visual).__name__
    raise NoTokenGridError(
        f"CLIP model {model_name!r}: its vision tower ({kind}) yields no patch tokens; RegionSpot needs a ViT-like "
        "tower (open_clip ViT, SigLIP, PE-Core, EVA), not a ConvNeXt or ResNet"
    )


# The vision tower of model_configs/RS-Tiny-Timm-ViT.json; not named SigLIP, as open_clip picks a SigLIP tokenizer by name.
TINY_TIMM_TOWER = "rs_tiny_map_vit"


def register_tiny_timm_tower() -> None:
    """Register with timm a tiny SigLIP-shaped ViT (no class token, attention-pool head) built
    from timm's own VisionTransformer, for the demo and the tests. Does nothing without timm."""
    try:
        import timm
        from timm.models import register_model
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return
    if timm.models.is_model(TINY_TIMM_TOWER):
        return

    def rs_tiny_map_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
        shape = dict(
            img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2, class_token=False, global_pool="map"
        )
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory passes these
            kwargs.pop(key, None)
        return VisionTransformer(**{**shape, **kwargs})

    register_model(rs_tiny_map_vit)
