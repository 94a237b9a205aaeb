"""Released RegionSpot checkpoints become our head, with clear errors when they do not fit."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from regionspot_cache.cli import app
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, load_head
from regionspot_cache.head.released import ReleasedCheckpointError, import_released_checkpoint

CONFIG = HeadConfig(clip_width=32, text_dim=16, num_heads=8, ffn_dim=64, normalize_feature_map=False)


def _released_file(tmp_path, head: RegionSpotHead, edit=lambda state: state):
    state = {f"model.{k}": v for k, v in head.state_dict().items()}
    state.update(
        {
            "model.sam.image_encoder.pos_embed": torch.zeros(2),
            "model.clip_model.logit_scale": torch.tensor(4.6),
            "model.text_feats_objects365": torch.zeros(3, 16),
        }
    )
    path = tmp_path / "model_final.pth"
    torch.save({"model": edit(state), "iteration": 450000}, path)
    return path


def test_import_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    released = RegionSpotHead(CONFIG).eval()
    path = _released_file(tmp_path, released)
    result = CliRunner().invoke(app, ["import-checkpoint", str(path), "-o", str(tmp_path / "head.safetensors")])
    assert result.exit_code == 0, result.output
    imported, config = load_head(tmp_path / "head.safetensors")
    assert imported.config == CONFIG and config.imported_from == str(path)
    tokens, feature_map = torch.randn(1, 3, 256), torch.randn(1, 10, 32)
    torch.testing.assert_close(imported.eval()(tokens, feature_map), released(tokens, feature_map))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: {k: v for k, v in s.items() if k != "model.decoder.norm.weight"},
            r"missing key\(s\) \['model.decoder.norm.weight'\]",
        ),
        (
            lambda s: {**s, "model.projector.bias": torch.zeros(5)},
            r"'model.projector.bias' has shape \(5,\), the head expects \(16,\)",
        ),
        (lambda s: {**s, "model.extra.weight": torch.zeros(1)}, "unexpected key 'model.extra.weight'"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("model.to_clip")}, "missing key 'model.to_clip.weight'"),
    ],
)
def test_bad_checkpoints_are_named(tmp_path, edit, message):
    path = _released_file(tmp_path, RegionSpotHead(CONFIG), edit)
    with pytest.raises(ReleasedCheckpointError, match=message) as info:
        import_released_checkpoint(path, tmp_path / "out.safetensors")
    assert "model_final.pth" in str(info.value) and not (tmp_path / "out.safetensors").exists()
