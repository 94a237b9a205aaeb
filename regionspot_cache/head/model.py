"""The trainable RegionSpot head: relates position-aware tokens to the CLIP feature map.

Module names match the released RegionSpot code (``to_clip``, ``decoder.layers.N.self_attn``,
``decoder.norm``, ``projector``) so its checkpoints map onto this head key for key. PyTorch's
``nn.TransformerDecoderLayer`` with ``norm_first=False`` is exactly the post-norm DETR layer
(self-attention, cross-attention, ReLU FFN, each followed by dropout, residual and LayerNorm).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from regionspot_cache.errors import ConfigError, MissingFileError, ModelLoadError
from regionspot_cache.identity import TrainedWith
from regionspot_cache.runtime.files import atomic_path, write_json


@dataclass
class HeadConfig:
    clip_width: int
    text_dim: int
    token_dim: int = 256
    num_layers: int = 3
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    # LayerNorm without affine on the CLIP feature map before cross-attention. The released code
    # defines this norm but does not call it; imported released checkpoints set this to False.
    normalize_feature_map: bool = True


class RegionSpotHead(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.to_clip = nn.Linear(config.token_dim, config.clip_width)
        self.ln_clip = nn.LayerNorm(config.clip_width, elementwise_affine=False)
        layer = nn.TransformerDecoderLayer(
            d_model=config.clip_width,
            nhead=config.num_heads,
            dim_feedforward=config.ffn_dim,
            dropout=config.dropout,
            activation="relu",
            batch_first=True,
            norm_first=False,
        )
        self.decoder = nn.TransformerDecoder(layer, config.num_layers, norm=nn.LayerNorm(config.clip_width))
        self.projector = nn.Linear(config.clip_width, config.text_dim)

    def forward(self, tokens: torch.Tensor, feature_map: torch.Tensor, box_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, N, 256), feature_map (B, L, width), box_mask (B, N) True for real boxes
        -> L2-normalised region embeddings (B, N, text_dim)."""
        memory = self.ln_clip(feature_map) if self.config.normalize_feature_map else feature_map
        padding = None if box_mask is None else ~box_mask
        hidden = self.decoder(self.to_clip(tokens), memory, tgt_key_padding_mask=padding)
        return F.normalize(self.projector(hidden), dim=-1, eps=1e-7)

    def forward_with_attention(
        self, tokens: torch.Tensor, feature_map: torch.Tensor, box_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` plus the last decoder layer's cross-attention over the feature map,
        averaged over heads: (B, N, text_dim) embeddings and (B, N, 1 + grid^2) weights (class
        token first; each row sums to one).

        Opt-in: the ordinary forward asks PyTorch for no weights (its fused attention kernels);
        here a pre-hook asks the last layer's cross-attention for them, for this call only.
        """
        cross = self.decoder.layers[-1].multihead_attn
        captured: list[torch.Tensor] = []

        def want_weights(_module, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": True}

        def keep_weights(_module, _args, output):
            captured.append(output[1])

        handles = [cross.register_forward_pre_hook(want_weights, with_kwargs=True), cross.register_forward_hook(keep_weights)]
        try:
            embeddings = self.forward(tokens, feature_map, box_mask)
        finally:
            for handle in handles:
                handle.remove()
        return embeddings, captured[0]


def region_logits(
    embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: float, logit_bias: float | None = None
) -> torch.Tensor:
    """CLIP-style logits: logit scale x cosine(region, class text embedding), plus the CLIP's
    logit bias where it has one (SigLIP: it shifts sigmoid scores; softmax is unchanged by it)."""
    logits = logit_scale * embeddings @ text_embeddings.T
    return logits if logit_bias is None else logits + logit_bias


CONFIG_SUFFIX = ".json"


@dataclass
class HeadMetadata:
    """What the JSON file beside a head's weights records: its config, and where it came from
    (imported from a released checkpoint, or trained: the train recipe, vocabularies, caches)."""

    config: HeadConfig
    imported_from: str | None = None  # the released checkpoint (head/released.py)
    train: dict[str, Any] | None = None  # the train recipe as written then (TrainConfig fields of that version)
    vocabularies: list[str] | None = None
    caches: list[str] | None = None
    encoders: TrainedWith | None = None  # the SAM and CLIP of its training caches (None: imported, or older heads)
    # Keys this version does not know (``save_head``'s ``extra``), kept so the file writes back the same.
    other: dict[str, Any] = field(default_factory=dict)

    @property
    def imported(self) -> bool:
        """Imported from a released checkpoint: it wants the released inputs (preprocess, text recipe)."""
        return self.imported_from is not None

    def to_json(self) -> dict[str, Any]:
        """As the file records it: ``head`` and the keys that are set."""
        known = {name: getattr(self, name) for name in _RECORDED if getattr(self, name) is not None}
        encoders = {} if self.encoders is None else {"encoders": self.encoders.to_dict()}
        return {"head": asdict(self.config), **known, **encoders, **self.other}

    @staticmethod
    def from_json(data: dict[str, Any], where: str = "head config") -> HeadMetadata:
        """KeyError or TypeError when ``head`` is missing or does not fit ``HeadConfig``; ConfigError
        when ``encoders`` does not fit ``TrainedWith``."""
        other = {key: value for key, value in data.items() if key not in ("head", "encoders", *_RECORDED)}
        encoders = TrainedWith.from_dict(data["encoders"], f"{where}: encoders") if "encoders" in data else None
        recorded = {name: data.get(name) for name in _RECORDED}
        return HeadMetadata(HeadConfig(**data["head"]), **recorded, encoders=encoders, other=other)


_RECORDED = ("imported_from", "train", "vocabularies", "caches")  # HeadMetadata's optional keys, in its JSON


def save_head(head: RegionSpotHead, path: Path | str, extra: dict | None = None) -> None:
    """Safetensors weights at ``path`` and a JSON config beside it (``path`` with ``.json``):
    ``head`` and the ``extra`` keys, read back by ``load_head`` as ``HeadMetadata``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp))
        config = {"head": asdict(head.config), **(extra or {})}
        write_json(path.with_suffix(CONFIG_SUFFIX), config, indent=2)


def read_head_metadata(path: Path | str) -> HeadMetadata:
    """What the JSON file beside the head at ``path`` records (the weights are not read)."""
    config_path = Path(path).with_suffix(CONFIG_SUFFIX)
    try:
        return HeadMetadata.from_json(json.loads(config_path.read_text(encoding="utf-8")), str(config_path))
    except FileNotFoundError:
        raise MissingFileError(f"{config_path}: head config not found (expected beside {Path(path).name})") from None
    except ConfigError as err:
        raise ModelLoadError(str(err)) from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(f"{config_path}: not a head config: {err!r}") from None


def load_head(path: Path | str) -> tuple[RegionSpotHead, HeadMetadata]:
    """The head saved at ``path`` and what its JSON file records."""
    path = Path(path)
    metadata = read_head_metadata(path)
    try:
        head = RegionSpotHead(metadata.config)
    except (TypeError, AttributeError) as err:
        raise ModelLoadError(f"{path.with_suffix(CONFIG_SUFFIX)}: not a head config: {err!r}") from None
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise MissingFileError(f"{path}: head checkpoint not found") from None
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ModelLoadError(f"{path}: not a readable safetensors checkpoint: {err}") from None
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise ModelLoadError(f"{path}: weights do not fit the config in {path.with_suffix(CONFIG_SUFFIX).name}: {err}") from None
    return head, metadata


def check_head_fits_cache(head: RegionSpotHead, cache: Path | str, clip_width: int, text_dim: int, token_dim: int) -> None:
    """A head trained on another CLIP (or SAM) than the cache's would fail deep in a matrix product:
    refused with one line naming both sides."""
    config = head.config
    if (config.clip_width, config.text_dim, config.token_dim) != (clip_width, text_dim, token_dim):
        raise ModelLoadError(
            f"the head expects CLIP width {config.clip_width}, text dim {config.text_dim} and SAM token dim "
            f"{config.token_dim}; {cache} holds {clip_width}, {text_dim} and {token_dim}: use a head trained on "
            "caches of the same SAM and CLIP"
        )
