"""Open-set rejection: the rules' known scores, AUROC, the threshold at 95% known recall, and
rejection in eval (rejected boxes make no detections), on a seeded generated dataset."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from regionspot_cache.cache import CacheReader
from regionspot_cache.config import ConfigError, EvalConfig, OpenSetConfig
from regionspot_cache.evaluate.cached import score_cache
from regionspot_cache.regions.open_set import accuracy_at_known_recall, auroc, known_scores


def test_auroc_is_the_share_of_pairs_ranked_right_ties_half():
    rng = np.random.default_rng(0)
    positive, negative = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 30).astype(float)
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positive, negative)]
    assert auroc(positive, negative) == pytest.approx(np.mean(pairs))
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0


def test_rules_on_seeded_regions_flag_unfamiliar_ones_better_than_chance():
    """Seeded regions: known ones lie near one of the vocabulary's embeddings, held-out ones near
    other (unnamed) directions; every rule must rank known above held-out."""
    rng = np.random.default_rng(1)
    directions = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(8, 32)).astype(np.float32)), dim=1)
    vocabulary, unnamed, background = directions[:5], directions[5:7], directions[7:]

    def regions(centres: torch.Tensor, count: int) -> torch.Tensor:
        picks = centres[rng.integers(0, len(centres), count)]
        noise = torch.from_numpy(rng.normal(size=picks.shape).astype(np.float32))
        return torch.nn.functional.normalize(picks + 0.12 * noise, dim=1)

    known, held_out = regions(vocabulary, 200), regions(unnamed, 100)
    for rule in ("max-softmax", "max-sigmoid", "background-prompt"):
        scores = [known_scores(20 * r @ vocabulary.T, rule, 20 * r @ background.T).numpy() for r in (known, held_out)]
        assert auroc(*scores) > 0.75, rule
        assert all(((s >= 0) & (s <= 1)).all() for s in scores)


def test_threshold_keeps_95_percent_of_known_regions():
    known = np.linspace(0, 1, 100)
    correct = known > 0.5
    threshold, accuracy = accuracy_at_known_recall(known, correct)
    assert 0.95 <= (known >= threshold).mean() <= 0.97  # at least 95%: the lower 5% quantile
    assert accuracy == pytest.approx(correct[known >= threshold].mean())


def test_bad_open_set_settings_are_named():
    with pytest.raises(ConfigError, match="eval.open_set.rule"):
        EvalConfig(open_set=OpenSetConfig("maybe"))
    with pytest.raises(ConfigError, match="eval.open_set.threshold"):
        EvalConfig(open_set=OpenSetConfig("max-softmax", threshold=2))


def test_eval_drops_the_boxes_the_rule_rejects(tmp_path_factory, tiny_models, encoders):
    from regionspot_cache.config import ExtractConfig
    from regionspot_cache.data.datasets import load_coco_format
    from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
    from regionspot_cache.extract.runner import CacheTarget, run_extraction
    from regionspot_cache.head.model import HeadConfig, RegionSpotHead

    root = tmp_path_factory.mktemp("open_set")
    annotations = generate_split(root, "val", SyntheticSpec(images=3, seed=2, min_size=64, max_size=80))
    run_extraction(
        load_coco_format(annotations, root / "images", name="toy"),
        CacheTarget(root / "cache"),
        encoders,
        ExtractConfig(shard_size=2, num_workers=0, device="cpu"),
    )
    reader = CacheReader(root / "cache")
    torch.manual_seed(0)
    head = RegionSpotHead(HeadConfig(clip_width=encoders.clip.width, text_dim=encoders.clip.text_dim, num_layers=1, ffn_dim=64))
    vocab = reader.vocabulary("toy")
    everything = score_cache(reader, head, vocab, EvalConfig(device="cpu", max_dets_per_image=-1, top_k_per_image=10**6))
    config = EvalConfig(device="cpu", max_dets_per_image=-1, top_k_per_image=10**6)
    config.open_set = OpenSetConfig("max-softmax", threshold=0.0)
    assert len(score_cache(reader, head, vocab, config)) == len(everything)
    with torch.no_grad():
        item = reader.image(reader.image_ids()[0])
        regions = head(
            torch.from_numpy(item.tokens.astype(np.float32))[None], torch.from_numpy(item.feature_map.astype(np.float32))[None]
        )[0]
        known = (reader.provenance.clip.logit_scale * regions @ torch.from_numpy(vocab.embeddings).T).softmax(-1).max(-1).values
    # Just below the median: scoring computes the same known scores, but not to the last bit.
    config.open_set.threshold = float(known.median()) - 1e-6
    kept = score_cache(reader, head, vocab, config)
    assert 0 < len(kept) < len(everything)
    first = kept.image_ids == item.image_id
    assert first.sum() == (known >= config.open_set.threshold).sum().item() * len(vocab.names)
