"""Import a checkpoint of the released RegionSpot code as our head checkpoint.

The released file is a torch pickle whose ``model`` dict holds the head under ``model.to_clip``,
``model.decoder``, ``model.projector`` next to the frozen ``model.sam.*`` and
``model.clip_model.*`` weights (ignored here). It is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from regionspot_cache.errors import ReleasedCheckpointError
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, save_head
from regionspot_cache.runtime.weights import load_torch_weights

PREFIX = "model."
HEAD_PARTS = ("to_clip.", "decoder.", "projector.")
IGNORED_PARTS = ("sam.", "clip_model.", "text_feats", "logit_scale", "ln_clip.")


def released_head_state(path: Path | str) -> dict[str, torch.Tensor]:
    """The head's tensors of a released checkpoint, with the ``model.`` prefix removed."""
    checkpoint = load_torch_weights(path)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ReleasedCheckpointError(f"{path}: expected a dict with a 'model' state dict")
    head = {}
    for key, value in state.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if name.startswith(HEAD_PARTS):
            head[name] = value
        elif not name.startswith(IGNORED_PARTS):
            raise ReleasedCheckpointError(f"{path}: unexpected key {key!r}")
    return head


def head_config_from_state(path: Path | str, state: dict[str, torch.Tensor]) -> HeadConfig:
    for key in ("to_clip.weight", "projector.weight", "decoder.layers.0.linear1.weight"):
        if key not in state:
            raise ReleasedCheckpointError(f"{path}: missing key 'model.{key}'")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    clip_width, token_dim = state["to_clip.weight"].shape
    return HeadConfig(
        clip_width=int(clip_width),
        text_dim=int(state["projector.weight"].shape[0]),
        token_dim=int(token_dim),
        num_layers=max(layers) + 1,
        ffn_dim=int(state["decoder.layers.0.linear1.weight"].shape[0]),
        # The released code defines ln_clip but never applies it to the feature map.
        normalize_feature_map=False,
    )


def import_released_checkpoint(path: Path | str, output: Path | str, num_heads: int = 8) -> RegionSpotHead:
    state = released_head_state(path)
    config = head_config_from_state(path, state)
    config.num_heads = num_heads
    head = RegionSpotHead(config)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ReleasedCheckpointError(f"{path}: missing key(s) {['model.' + k for k in missing[:5]]}")
    for key, value in state.items():
        if key not in expected:
            raise ReleasedCheckpointError(f"{path}: unexpected key 'model.{key}'")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ReleasedCheckpointError(
                f"{path}: 'model.{key}' has shape {tuple(value.shape)}, the head expects {tuple(expected[key].shape)}"
            )
    head.load_state_dict({k: v.float() for k, v in state.items()})
    save_head(head, output, {"imported_from": str(path)})
    return head
