"""SAM's image-encoder attention through ``scaled_dot_product_attention``, without vendoring SAM.

segment-anything's ``Attention.forward`` materialises the full attention matrix: in a ViT-B
global block that is 12 heads x 4096 x 4096 floats per image (0.8 GB in float32), three times
over (scores, scores plus the relative-position bias, softmax), so memory grew by about a
gigabyte per image in the batch. ``FusedSamAttention`` computes the same function with PyTorch's
fused attention: the decomposed relative-position bias (``rel_h`` + ``rel_w``, exactly the terms
of ``add_decomposed_rel_pos``) is passed as SDPA's additive mask, built for a slice of query rows
at a time so that neither the bias nor the scores ever exist for all queries at once.

It is applied by swapping the class of the library's ``Attention`` instances after they are
built: parameters, buffers and state-dict keys are the library's own, so released checkpoints
load unchanged, and ``isinstance(module, Attention)`` still holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

# Bytes of additive bias built per SDPA call: bounds the extra memory of one attention call
# whatever the batch (a query slice of a ViT-B global block at batch 1 is 12 x 682 x 4096 floats).
BIAS_BYTES_PER_CALL = 128 * 2**20


class FusedSamAttention(Attention):
    """``segment_anything``'s ``Attention`` with the same parameters and a fused forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        # (3, B, heads, H*W, head_dim): the library's layout, kept 4-D for SDPA.
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.use_rel_pos:
            out = self._attend_with_rel_pos(q, k, v, height, width)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        out = out.reshape(batch, height, width, -1)
        return self.proj(out)

    def _attend_with_rel_pos(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int) -> torch.Tensor:
        rel_h, rel_w = self._decomposed_rel_pos(q, height, width)
        batch, heads, tokens, _ = q.shape
        rows = query_rows_per_call(batch * heads * tokens * q.element_size())
        outputs = []
        for start in range(0, tokens, rows):
            stop = min(start + rows, tokens)
            # bias[b, n, query, kh * W + kw] = rel_h[.., query, kh] + rel_w[.., query, kw]
            bias = rel_h[:, :, start:stop, :, None] + rel_w[:, :, start:stop, None, :]
            bias = bias.reshape(batch, heads, stop - start, tokens)
            outputs.append(F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=bias, scale=self.scale))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)

    def _decomposed_rel_pos(self, q: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``add_decomposed_rel_pos``'s two terms for query size = key size = (H, W), unscaled q:
        (B, heads, H*W, H) and (B, heads, H*W, W)."""
        batch, heads, tokens, dim = q.shape
        rel_pos_h = get_rel_pos(height, height, self.rel_pos_h)
        rel_pos_w = get_rel_pos(width, width, self.rel_pos_w)
        grid_q = q.reshape(batch, heads, height, width, dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_pos_h.to(q.dtype))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_pos_w.to(q.dtype))
        return rel_h.reshape(batch, heads, tokens, height), rel_w.reshape(batch, heads, tokens, width)


def query_rows_per_call(bias_row_bytes: int) -> int:
    """Query rows per SDPA call so that the call's bias stays within ``BIAS_BYTES_PER_CALL``."""
    return max(1, BIAS_BYTES_PER_CALL // max(bias_row_bytes, 1))


def use_fused_attention(module: torch.nn.Module) -> int:
    """Switch every segment-anything ``Attention`` inside ``module`` to the fused forward, in
    place; returns how many were switched. Idempotent."""
    return _swap_class(module, Attention, FusedSamAttention)


def use_eager_attention(module: torch.nn.Module) -> int:
    """Undo ``use_fused_attention``: the library's own forward (for comparisons and benchmarks)."""
    return _swap_class(module, FusedSamAttention, Attention)


def _swap_class(module: torch.nn.Module, old: type, new: type) -> int:
    """Give every submodule of exactly class ``old`` the class ``new`` (same parameters)."""
    children = [child for child in module.modules() if type(child) is old]
    for child in children:
        child.__class__ = new
    return len(children)
