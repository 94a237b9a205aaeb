"""SAM as a frozen box encoder: one position-aware token (256 values) per box prompt.

Architectures are data (as in segment-anything's ``build_sam.py``); the released ones are built by
the library's own builder, and weights are loaded with ``weights_only=True``. Image preprocessing is
exactly ``SamPredictor.set_image``'s: ``ResizeLongestSide`` to 1024, pixel mean/std, pad; with
``released`` preprocessing, of detectron2's test-resized image (``encoders/preprocess.py``).
The image encoder's attention runs through fused SDPA (``sam_attention.py``), the same function
within float rounding without the per-image gigabytes of the eager attention matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from regionspot_cache.choices import Preprocessing
from regionspot_cache.encoders.memory import FittingBatches, sam_image_bytes
from regionspot_cache.encoders.preprocess import TestResize, chw_uint8, test_resize_for
from regionspot_cache.encoders.sam_attention import use_fused_attention
from regionspot_cache.errors import ModelLoadError
from regionspot_cache.runtime.weights import load_torch_weights

SAM_INPUT_SIZE = 1024  # every released SAM's input side; segment-anything's builder fixes it


@dataclass(frozen=True)
class SamArchitecture:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = SAM_INPUT_SIZE


SAM_ARCHITECTURES: dict[str, SamArchitecture] = {
    "vit_b": SamArchitecture(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArchitecture(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArchitecture(1280, 32, 16, (7, 15, 23, 31)),
    # Same classes with a small image encoder at a quarter of the input side: used by the demo and
    # the tests (random weights). At 1024 px its full-size mask decoder over 64x64 embeddings was
    # most of every tiny extraction's CPU time; the code paths are the same at any side.
    "tiny": SamArchitecture(32, 2, 2, (), image_size=256),
}

TOKEN_DIM = 256
PATCH_SIZE = 16


SAM_ATTENTIONS = ("sdpa", "eager")


def build_sam(variant: str, checkpoint: Path | str | None, attention: str = "sdpa") -> Sam:
    """Build SAM ``variant`` and load ``checkpoint`` (a state dict file) into it. ``attention``:
    ``sdpa`` (fused, bounded memory) or ``eager`` (segment-anything's own forward, for comparison)."""
    if attention not in SAM_ATTENTIONS:
        raise ModelLoadError(f"unknown SAM attention {attention!r}; known: {', '.join(SAM_ATTENTIONS)}")
    if variant not in SAM_ARCHITECTURES:
        raise ModelLoadError(f"unknown SAM variant {variant!r}; known: {sorted(SAM_ARCHITECTURES)}")
    sam = _sam_of(SAM_ARCHITECTURES[variant])
    if checkpoint is not None:
        state = load_torch_weights(checkpoint)
        try:
            sam.load_state_dict(state)
        except RuntimeError as err:
            raise ModelLoadError(f"{checkpoint}: does not fit SAM {variant!r}: {err}") from None
    if attention == "sdpa":
        use_fused_attention(sam.image_encoder)
    return sam.eval().requires_grad_(False)


def _sam_of(arch: SamArchitecture) -> Sam:
    """A randomly initialised SAM of ``arch``: the library's builder for SAM's own input side, else
    the same classes with the same settings at ``arch.image_size`` (its builder fixes 1024)."""
    layers = dict(
        encoder_embed_dim=arch.embed_dim,
        encoder_depth=arch.depth,
        encoder_num_heads=arch.num_heads,
        encoder_global_attn_indexes=list(arch.global_attn_indexes),
    )
    if arch.image_size == SAM_INPUT_SIZE:
        return _build_sam(**layers, checkpoint=None)
    size, grid = arch.image_size, arch.image_size // PATCH_SIZE
    encoder = ImageEncoderViT(
        depth=arch.depth,
        embed_dim=arch.embed_dim,
        img_size=size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=arch.num_heads,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=list(arch.global_attn_indexes),
        window_size=14,
        out_chans=TOKEN_DIM,
    )
    prompts = PromptEncoder(
        embed_dim=TOKEN_DIM, image_embedding_size=(grid, grid), input_image_size=(size, size), mask_in_chans=16
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=TOKEN_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=TOKEN_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return Sam(encoder, prompts, decoder, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


@dataclass(frozen=True)
class SamResize:
    """HWC uint8 RGB (array or PIL image) -> (3, h, w) uint8 with the long side at ``long_side``,
    as ``SamPredictor.set_image`` resizes (after ``test_resize``, if given). Holds no model, so
    data-loading workers can run it."""

    long_side: int = 1024
    test_resize: TestResize | None = None

    def __call__(self, image: np.ndarray | Image.Image) -> torch.Tensor:
        image = image if isinstance(image, Image.Image) else Image.fromarray(image)
        return self.of_test_resized(self.test_resize.image(image) if self.test_resize is not None else image)

    def of_test_resized(self, image: Image.Image) -> torch.Tensor:
        """After ``test_resize`` (or of the image, without one). ``ResizeLongestSide.apply_image``
        is torchvision's resize of a PIL image, i.e. PIL's bilinear one: run here on the PIL image,
        without its array -> PIL -> array round trip."""
        height, width = ResizeLongestSide.get_preprocess_shape(image.height, image.width, self.long_side)
        resized = image if (width, height) == image.size else image.resize((width, height), Image.BILINEAR)
        return chw_uint8(resized)


class SamBoxEncoder:
    """Batched image embeddings and per-box position-aware tokens from a frozen SAM."""

    def __init__(self, sam: Sam, device: torch.device, preprocess: Preprocessing | str = Preprocessing.DIRECT):
        self.sam = sam.to(device)
        self.device = device
        self.input_size = sam.image_encoder.img_size
        self.transform = ResizeLongestSide(self.input_size)
        self.preprocessing = Preprocessing.parse(preprocess, "preprocess")
        self.test_resize = test_resize_for(self.preprocessing)

    def resizer(self) -> "SamResize":
        return SamResize(self.input_size, self.test_resize)

    def prompt_boxes(self, boxes_xyxy: np.ndarray, original_size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Boxes in original pixels -> SAM's input frame, and the (h, w) of the image SAM resized
        (the test-resized image with ``released`` preprocessing, else the original)."""
        boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4))
        frame = tuple(original_size)
        if self.test_resize is not None:
            boxes, frame = self.test_resize.boxes(boxes, frame)
        return self.transform.apply_boxes_torch(boxes, frame).to(self.device), frame

    def image_bytes(self, dtype_bytes: int) -> int:
        """Estimated peak bytes one image adds to an image-encoder batch (``memory.sam_image_bytes``)."""
        return sam_image_bytes(self.sam.image_encoder.patch_embed.proj.out_channels, self.input_size, dtype_bytes)

    @torch.no_grad()
    def embed_images(self, resized: list[torch.Tensor]) -> torch.Tensor:
        """Resized uint8 images -> (B, 256, 64, 64) embeddings; normalise and pad as
        ``SamPredictor.set_torch_image`` does, on the model's device."""
        batch = torch.stack([self.sam.preprocess(x.to(self.device).float()) for x in resized])
        return self.sam.image_encoder(batch)

    @torch.no_grad()
    def box_tokens(
        self,
        image_embedding: torch.Tensor,
        boxes_xyxy: np.ndarray,
        original_size: tuple[int, int],
        boxes_per_call: int = 64,
    ) -> torch.Tensor:
        """Position-aware tokens (N, 256) for boxes in original pixels of an (H, W) image
        (``boxes_per_call`` at a time, halved if a call runs out of memory).

        Runs the mask decoder's two-way transformer and keeps the output for mask token 0 (the
        single-mask output); the mask upscaling and hypernetworks are skipped as unused.
        """
        boxes, _ = self.prompt_boxes(boxes_xyxy, original_size)
        return FittingBatches(boxes_per_call, self.device, "boxes").stack(
            boxes, lambda chunk: self._decode_tokens(image_embedding, chunk), torch.empty(0, TOKEN_DIM, device=self.device)
        )

    def _decode_tokens(self, image_embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        decoder = self.sam.mask_decoder
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        # Output tokens in the decoder's order: IoU token, then the mask tokens, then the prompt.
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
        tokens = torch.cat([output_tokens.expand(len(boxes), -1, -1), sparse], dim=1)
        src = image_embedding.unsqueeze(0) + dense
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        hidden, _ = decoder.transformer(src, image_pe, tokens)
        return hidden[:, 1, :]

    @torch.no_grad()
    def box_masks(
        self,
        image_embedding: torch.Tensor,
        boxes_xyxy: np.ndarray,
        original_size: tuple[int, int],
        boxes_per_call: int = 16,
    ) -> torch.Tensor:
        """SAM's single-mask output for each box prompt, as ``SamPredictor.predict(box=...,
        multimask_output=False)`` returns it: (N, H, W) bool in original pixels of an (H, W) image.

        ``boxes_per_call`` bounds memory: each box's logits are upscaled to 1024² floats first;
        a call that runs out of memory anyway is retried with half as many boxes.
        """
        boxes, frame = self.prompt_boxes(boxes_xyxy, original_size)
        # With ``released``, masks are upsampled from SAM's input straight to the original size
        # (the released code goes through the test-resized size first: one resampling fewer here).
        input_size = self.transform.get_preprocess_shape(*frame, self.input_size)
        return FittingBatches(boxes_per_call, self.device, "boxes").stack(
            boxes,
            lambda chunk: self._decode_masks(image_embedding, chunk, input_size, original_size),
            torch.zeros(0, *original_size, dtype=torch.bool, device=self.device),
        )

    def _decode_masks(
        self, image_embedding: torch.Tensor, boxes: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=image_embedding.unsqueeze(0),
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        logits = self.sam.postprocess_masks(low_res, input_size, original_size)
        return logits[:, 0] > self.sam.mask_threshold
