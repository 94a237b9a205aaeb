"""SAM 2.1 (pip ``sam2``, Hiera image encoders) as a frozen box encoder, with SAM 1's interface.

Architectures are data: the library's own config file plus the Hiera trunk's shape, given to its
``build_sam2`` as overrides (so the tiny random-weight test config is one more entry). Weights
are loaded with ``weights_only=True``. Everything mirrors ``SAM2ImagePredictor``: the image is
resized to a square (no aspect kept), boxes are prompted as two labelled corner points, the
image embedding carries ``no_mem_embed``, and the mask decoder sees the high-resolution features.

The box token is the two-way transformer's output for mask token 0 (the single-mask output) as
in SAM 1; SAM 2's decoder puts an object-score token first, so it sits at index 2, not 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import resize

from regionspot_cache.encoders.memory import ACTIVATIONS_PER_TOKEN_CHANNEL, FittingBatches
from regionspot_cache.errors import ModelLoadError
from regionspot_cache.runtime.weights import load_torch_weights

TOKEN_DIM = 256
PIXEL_MEAN, PIXEL_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SAM2Transforms' values
BOX_CORNER_LABELS = (2, 3)  # top-left, bottom-right: how SAM2ImagePredictor prompts a box


@dataclass(frozen=True)
class Sam2Architecture:
    config: str  # the sam2 package's config file
    embed_dim: int  # Hiera's first-stage width
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    image_size: int = 1024
    memory_attention_layers: int = 4  # unused for images; the checkpoints hold them

    def overrides(self) -> list[str]:
        trunk = "++model.image_encoder.trunk"
        widths = [self.embed_dim * 2**i for i in reversed(range(len(self.stages)))]
        return [
            f"{trunk}.embed_dim={self.embed_dim}",
            f"{trunk}.num_heads={self.num_heads}",
            f"{trunk}.stages={list(self.stages)}",
            f"{trunk}.global_att_blocks={list(self.global_att_blocks)}",
            f"++model.image_encoder.neck.backbone_channel_list={widths}",
            f"++model.image_size={self.image_size}",
            f"++model.memory_attention.num_layers={self.memory_attention_layers}",
        ]


SAM2_CONFIGS = "configs/sam2.1/sam2.1_hiera_{}.yaml"
SAM2_ARCHITECTURES: dict[str, Sam2Architecture] = {
    "sam2.1_hiera_tiny": Sam2Architecture(SAM2_CONFIGS.format("t"), 96, 1, (1, 2, 7, 2), (5, 7, 9)),
    "sam2.1_hiera_small": Sam2Architecture(SAM2_CONFIGS.format("s"), 96, 1, (1, 2, 11, 2), (7, 10, 13)),
    "sam2.1_hiera_base_plus": Sam2Architecture(SAM2_CONFIGS.format("b+"), 112, 2, (2, 3, 16, 3), (12, 16, 20)),
    "sam2.1_hiera_large": Sam2Architecture(SAM2_CONFIGS.format("l"), 144, 2, (2, 6, 36, 4), (23, 33, 43)),
    # The same classes with a tiny Hiera at 256 pixels: the demo and the tests (random weights).
    "sam2_tiny": Sam2Architecture(SAM2_CONFIGS.format("t"), 8, 1, (1, 1, 2, 1), (3,), 256, 1),
}


def build_sam2_model(variant: str, checkpoint: Path | str | None) -> torch.nn.Module:
    """SAM2Base for ``variant`` through the library's ``build_sam2``, with ``checkpoint`` (a file
    holding ``{"model": state_dict}`` as released, or a bare state dict) loaded into it."""
    try:
        from sam2.build_sam import build_sam2
    except ImportError:
        raise ImportError(f"SAM variant {variant!r} needs the sam2 package: pip install 'regionspot-cache[sam2]'") from None
    arch = SAM2_ARCHITECTURES[variant]
    model = build_sam2(arch.config, None, device="cpu", mode="eval", hydra_overrides_extra=arch.overrides())
    if checkpoint is not None:
        state = load_torch_weights(checkpoint)
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as err:
            raise ModelLoadError(f"{checkpoint}: does not fit SAM 2 {variant!r}: {err}") from None
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Sam2Resize:
    """HWC uint8 RGB -> (3, size, size) float32 in [0, 1], as ``SAM2Transforms`` resizes (ToTensor,
    then bilinear antialiased Resize to a square). Holds no model, so data-loading workers can run it."""

    size: int = 1024

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return resize(pixels, [self.size, self.size], antialias=True)


@dataclass
class Sam2ImageEmbedding:
    """What SAM 2's mask decoder needs of one image: the (256, g, g) embedding (with
    ``no_mem_embed``) and the two high-resolution feature maps (for masks only)."""

    image_embed: torch.Tensor
    high_res_feats: tuple[torch.Tensor, torch.Tensor]

    def isfinite(self) -> torch.Tensor:
        return torch.isfinite(self.image_embed)


class Sam2BoxEncoder:
    """SamBoxEncoder's interface (embed_images, box_tokens, box_masks) on a frozen SAM 2."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model.to(device)
        self.device = device
        self.input_size = int(model.image_size)
        self.mask_threshold = 0.0  # SAM2ImagePredictor's default

    def resizer(self) -> Sam2Resize:
        return Sam2Resize(self.input_size)

    def image_bytes(self, dtype_bytes: int) -> int:
        """Estimated peak bytes one image adds to an image-encoder batch: Hiera's first stage
        (a quarter of the input size per side) dominates; its attention is windowed or fused."""
        first_stage = (self.input_size // 4) ** 2 * self.model.image_encoder.trunk.patch_embed.proj.out_channels
        return ACTIVATIONS_PER_TOKEN_CHANNEL * first_stage * dtype_bytes + 3 * self.input_size**2 * 4

    @torch.no_grad()
    def embed_images(self, resized: list[torch.Tensor]) -> list[Sam2ImageEmbedding]:
        """Resized images (``resizer``) -> one embedding per image, as ``SAM2ImagePredictor.set_image``."""
        mean = torch.tensor(PIXEL_MEAN, device=self.device).view(3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=self.device).view(3, 1, 1)
        batch = torch.stack([(x.to(self.device) - mean) / std for x in resized])
        _, feats, _, sizes = self.model._prepare_backbone_features(self.model.forward_image(batch))
        if self.model.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + self.model.no_mem_embed
        maps = [feat.permute(1, 2, 0).reshape(len(resized), -1, *size) for feat, size in zip(feats, sizes)]
        return [Sam2ImageEmbedding(maps[-1][i], (maps[0][i], maps[1][i])) for i in range(len(resized))]

    def _prompt_boxes(self, boxes_xyxy: np.ndarray, original_size: tuple[int, int]) -> torch.Tensor:
        """Boxes in original pixels -> (N, 2, 2) corners in the square input frame."""
        height, width = original_size
        boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 2, 2)).clone()
        boxes[..., 0] = boxes[..., 0] / width * self.input_size
        boxes[..., 1] = boxes[..., 1] / height * self.input_size
        return boxes.to(self.device)

    def _prompts(self, corners: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.tensor([BOX_CORNER_LABELS], dtype=torch.int, device=self.device).repeat(len(corners), 1)
        return self.model.sam_prompt_encoder(points=(corners, labels), boxes=None, masks=None)

    @torch.no_grad()
    def box_tokens(
        self, embedding: Sam2ImageEmbedding, boxes_xyxy: np.ndarray, original_size: tuple[int, int], boxes_per_call: int = 64
    ) -> torch.Tensor:
        """(N, 256) tokens: the two-way transformer's output for mask token 0 (see module doc)."""
        corners = self._prompt_boxes(boxes_xyxy, original_size)
        return FittingBatches(boxes_per_call, self.device, "boxes").stack(
            corners, lambda chunk: self._decode_tokens(embedding, chunk), torch.empty(0, TOKEN_DIM, device=self.device)
        )

    def _decode_tokens(self, embedding: Sam2ImageEmbedding, corners: torch.Tensor) -> torch.Tensor:
        decoder = self.model.sam_mask_decoder
        sparse, dense = self._prompts(corners)
        # The decoder's own order: object-score token (when it predicts one), IoU token, mask tokens.
        first = [decoder.obj_score_token.weight] if decoder.pred_obj_scores else []
        output_tokens = torch.cat([*first, decoder.iou_token.weight, decoder.mask_tokens.weight])
        tokens = torch.cat([output_tokens.expand(len(corners), -1, -1), sparse], dim=1)
        src = embedding.image_embed.unsqueeze(0) + dense
        image_pe = self.model.sam_prompt_encoder.get_dense_pe().expand(len(corners), -1, -1, -1)
        hidden, _ = decoder.transformer(src, image_pe, tokens)
        return hidden[:, len(first) + 1, :]

    @torch.no_grad()
    def box_masks(
        self, embedding: Sam2ImageEmbedding, boxes_xyxy: np.ndarray, original_size: tuple[int, int], boxes_per_call: int = 16
    ) -> torch.Tensor:
        """SAM 2's single-mask output per box, as ``SAM2ImagePredictor.predict(box=...,
        multimask_output=False)``: (N, H, W) bool in original pixels."""
        corners = self._prompt_boxes(boxes_xyxy, original_size)
        return FittingBatches(boxes_per_call, self.device, "boxes").stack(
            corners,
            lambda chunk: self._decode_masks(embedding, chunk, original_size),
            torch.zeros(0, *original_size, dtype=torch.bool, device=self.device),
        )

    def _decode_masks(self, embedding: Sam2ImageEmbedding, corners: torch.Tensor, original_size: tuple[int, int]):
        sparse, dense = self._prompts(corners)
        low_res, _, _, _ = self.model.sam_mask_decoder(
            image_embeddings=embedding.image_embed.unsqueeze(0),
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=True,
            high_res_features=[feat.unsqueeze(0) for feat in embedding.high_res_feats],
        )
        logits = F.interpolate(low_res.float(), original_size, mode="bilinear", align_corners=False)
        return logits[:, 0] > self.mask_threshold
