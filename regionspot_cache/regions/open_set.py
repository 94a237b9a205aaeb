"""Open-set rejection: a region may be "none of the vocabulary".

Each rule gives every region a *known score* in [0, 1]; a region whose known score is below
``OpenSetConfig.threshold`` is rejected (``predict`` labels it ``None``; ``eval`` makes no
detection of it). The rules (``choices.OpenSetRule``, where each computes its known score):

``max-softmax``: the largest softmax probability over the vocabulary (Hendrycks & Gimpel 2017);
  what the released code's softmax scoring already computes, so it costs nothing.
``max-sigmoid``: the largest sigmoid(logit): the head is trained with a sigmoid focal loss, so each
  class's sigmoid is a one-versus-rest probability, and an unfamiliar region can be low for all
  classes at once (softmax must give its mass to some class).
``background-prompt``: the CLIP text embeddings of ``background_prompts`` join the vocabulary; the
  known score is 1 - the softmax mass on them.

``benchmarks/open_set.py`` compares them on generated data with held-out categories.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from regionspot_cache.config import OpenSetConfig, OpenSetRule

__all__ = ["OpenSetConfig", "OpenSetRule", "known_scores", "kept_regions", "auroc"]


def warn_if_never_rejects(config: OpenSetConfig, vocabulary_size: int) -> bool:
    """max-softmax over a one-name vocabulary is always 1, so it can never reject: said, not silent."""
    if config.rule is OpenSetRule.MAX_SOFTMAX and vocabulary_size == 1:
        logging.getLogger(__name__).warning(
            "open-set rule max-softmax with a vocabulary of one name never rejects (a softmax over one class is "
            "always 1); use max-sigmoid or background-prompt"
        )
        return True
    return False


def known_scores(logits: torch.Tensor, rule: OpenSetRule | str, background_logits: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) known score of each region from its (N, C) logits over the vocabulary
    (``background_logits``: (N, P) logits of the background prompts, for ``background-prompt``)."""
    return OpenSetRule.parse(rule, "open-set rule").known_scores(logits, background_logits)


def kept_regions(known: torch.Tensor, config: OpenSetConfig) -> torch.Tensor:
    """(N,) bool: the regions the rule keeps (all of them when the rule is ``off``)."""
    if not config.rule.rejects:
        return torch.ones_like(known, dtype=torch.bool)
    return known >= config.threshold


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores meant to be higher for ``positive``: the probability
    that a random positive outscores a random negative, ties counting half (Mann-Whitney U)."""
    scores = np.concatenate([positive, negative]).astype(np.float64)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # Average ranks over ties.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def accuracy_at_known_recall(known: np.ndarray, correct: np.ndarray, recall: float = 0.95) -> tuple[float, float]:
    """(threshold, accuracy): the known score that keeps ``recall`` of the known regions, and
    the class accuracy among the known regions it keeps."""
    threshold = float(np.quantile(known, 1.0 - recall, method="lower"))
    kept = known >= threshold
    return threshold, float(correct[kept].mean()) if kept.any() else float("nan")
