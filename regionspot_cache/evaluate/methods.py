"""The evaluation methods by name: the head on the cached features, or one of the paper's
training-free baselines on the original images (``baselines.py``). Names only, so that choosing
a method loads no model code."""

REGIONSPOT = "regionspot"
CLIP_BOX = "clip-box"
CLIP_MASK = "clip-mask"
BASELINES = (CLIP_BOX, CLIP_MASK)
METHODS = (REGIONSPOT, *BASELINES)
