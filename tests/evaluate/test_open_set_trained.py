"""benchmarks/open_set.py's own logic on small inputs. The experiment itself (extraction, training
a head, AUROC of each rule) is a benchmark, run by hand (`python benchmarks/open_set.py`), with
its figures in benchmarks/RESULTS.md: its outcome depends on hundreds of training steps, and no
test may depend on the machine's speed. The rules and AUROC are tested in test_open_set.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "open_set.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("open_set_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_held_out_categories_leave_labels_names_and_negatives(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 9, "height": 9, "neg_category_ids": [2, 3]}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    known = json.loads(_benchmark().without_categories(path, {3}).read_text())
    assert [a["category_id"] for a in known["annotations"]] == [1]
    assert [c["id"] for c in known["categories"]] == [1, 2]
    assert known["images"][0]["neg_category_ids"] == [2]


def test_every_rejecting_rule_is_measured():
    from regionspot_cache.regions.open_set import OpenSetRule

    assert _benchmark().RULES == [rule for rule in OpenSetRule if rule.rejects] and OpenSetRule.OFF not in _benchmark().RULES
