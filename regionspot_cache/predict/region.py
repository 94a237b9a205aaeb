"""What ``Predictor.predict`` says about one box: ``Region``, with its ranked classes (``ClassScore``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClassScore:
    """One class of the vocabulary for one region."""

    label: str
    category_id: int  # the label's position in the vocabulary (0-based)
    score: float  # its softmax probability over the vocabulary

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Region:
    """One box's answer; the optional fields are set when asked for or when they apply."""

    box: list[float]  # x1, y1, x2, y2 in original pixels, clipped to the image: the box used
    label: str | None  # the most probable class name; None when the open-set rule rejects the box
    score: float  # the most probable class's softmax probability (also when rejected)
    known: float | None = None  # with an open-set rule: the box's known score
    # With ``attention``: the head's last-layer cross-attention over the CLIP grid (grid_h, grid_w)
    # float32, mean over heads, and its share on the class token; together they sum to one.
    attention: np.ndarray | None = field(default=None, compare=False, repr=False)
    attention_class_token: float | None = None
    mask: dict | None = field(default=None, repr=False)  # with ``masks``: COCO RLE {"size": [H, W], "counts": str}
    given_box: list[float] | None = None  # the box as given, when clipping changed it
    best_guess: ClassScore | None = None  # when rejected: the class it would have had
    classes: list[ClassScore] | None = None  # with ``top_k`` other than 1: the best classes, best first
    proposal_score: float | None = None  # for boxes from proposals: the proposer's score

    @property
    def clipped(self) -> bool:
        return self.given_box is not None

    @property
    def rejected(self) -> bool:
        return self.best_guess is not None

    def to_json(self) -> dict[str, Any]:
        """The fields that are set, as JSON types; the attention map is drawn, not written."""
        clipped = {"given_box": self.given_box, "clipped": True} if self.clipped else {}
        rejected = {"rejected": True, "best_guess": self.best_guess.to_json()} if self.best_guess else {}
        optional = {
            "known": self.known,
            "classes": None if self.classes is None else [c.to_json() for c in self.classes],
            "proposal_score": self.proposal_score,
            "attention_class_token": self.attention_class_token,
            "mask": self.mask,
        }
        return {
            "box": self.box,
            **clipped,
            "label": self.label,
            "score": self.score,
            **rejected,
            **{key: value for key, value in optional.items() if value is not None},
        }


def ranked_classes(probabilities: np.ndarray, names: list[str], top_k: int) -> list[ClassScore]:
    """The ``top_k`` most probable classes of one (C,) row, best first (0: all C)."""
    count = len(names) if top_k == 0 else min(top_k, len(names))
    order = np.argsort(-probabilities, kind="stable")[:count]  # ties: vocabulary order, as argmax
    return [ClassScore(names[i], int(i), float(probabilities[i])) for i in order]
