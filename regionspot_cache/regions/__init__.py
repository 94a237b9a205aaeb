"""What is said about regions whatever scores them, for ``evaluate`` and ``predict`` alike: SAM's
masks for box prompts as COCO RLEs (``masks.py``) and the open-set rules that may reject a region
as none of the vocabulary (``open_set.py``). Below both, so ``predict`` needs nothing of ``evaluate``."""
