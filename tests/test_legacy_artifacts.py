"""Caches and a head written by the landing before the second design step (commit 4538c88, by
``tests/data/legacy-4538c88/make_legacy.py``) read as they read then: same cache.json, same
tokens, maps and boxes, same head metadata and the same AP."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from regionspot_cache.cache import CacheReader, CacheWriter, Provenance
from regionspot_cache.config import EvalConfig
from regionspot_cache.evaluate import evaluate_head
from regionspot_cache.head.model import load_head

LEGACY = Path(__file__).parent / "data" / "legacy-4538c88"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())
CACHES = sorted(EXPECTED["caches"])


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture
def legacy(tmp_path) -> Path:
    """A copy, so that nothing a test does can change the committed files."""
    shutil.copytree(LEGACY, tmp_path / "legacy")
    return tmp_path / "legacy"


@pytest.mark.parametrize("name", CACHES)
def test_legacy_cache_reads_the_same(legacy, name):
    record = EXPECTED["caches"][name]
    reader = CacheReader(legacy / record["root"])
    assert json.loads(reader.provenance.to_json()) == record["cache_json"]
    assert sorted(map(str, reader.image_ids())) == sorted(record["images"])
    for image_id, want in record["images"].items():
        image = reader.image(int(image_id))
        assert _sha(image.tokens) == want["tokens_sha256"]
        assert _sha(image.feature_map) == want["map_sha256"]
        assert image.boxes.tolist() == want["boxes"]
        assert image.category_ids.tolist() == want["category_ids"]


@pytest.mark.parametrize("name", CACHES)
def test_legacy_cache_json_is_written_back_unchanged(legacy, name):
    root = legacy / EXPECTED["caches"][name]["root"]
    before = (root / "cache.json").read_bytes()
    CacheWriter(root, Provenance.read(root))  # reopening for writing accepts its own identity
    assert (root / "cache.json").read_bytes() == before


def test_legacy_head_loads_with_its_metadata(legacy):
    head, metadata = load_head(legacy / "head" / "head.safetensors")
    assert metadata.to_json() == EXPECTED["head_meta"]
    assert head.config.clip_width == EXPECTED["head_meta"]["head"]["clip_width"]


@pytest.mark.parametrize("name", [name for name in CACHES if "metrics" in EXPECTED["caches"][name]])
def test_legacy_head_scores_legacy_cache_the_same(legacy, name):
    record = EXPECTED["caches"][name]
    head, _ = load_head(legacy / "head" / "head.safetensors")
    result = evaluate_head(legacy / record["root"], head, legacy / "data" / "val.json", EvalConfig(device="cpu"))
    assert result.num_detections == record["num_detections"]
    # Recorded then as LVIS's -1 where a group has no ground truth; reported now as None (n/a).
    expected = {name: None if value == -1 else value for name, value in record["metrics"].items()}
    assert result.metrics == pytest.approx(expected, abs=1e-9)
