"""benchmarks/eval.py runs end to end at a tiny size (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "eval.py"


def test_eval_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--images", "20", "--categories", "30", "--text-dim", "32", "--compare",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "x LVIS" in result.stdout and "(c) LVISResults + LVISEval.run" in result.stdout
    rows = {row["protocol"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"standard", "fixed"}
    for row in rows.values():
        assert {"scoring_s", "writing_s", "lvis_s", "old_lvis_s"} <= set(row) and 0 <= row["AP"] <= 1
    # 30 classes x ~6 boxes per image: the standard protocol keeps every pair (< 300 per image);
    # the fixed one keeps round(10,000 x 20 / 19,809) = 10 per class.
    assert rows["fixed"]["detections"] == 10 * 30
