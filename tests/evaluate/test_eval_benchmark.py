"""benchmarks/eval.py runs end to end at a tiny size, in this process (no timing assertions, no
timeout: nothing here depends on the machine's speed)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import torch

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "eval.py"


def test_eval_benchmark_smoke(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(
        sys, "argv", [str(BENCHMARK), "--images", "20", "--categories", "30", "--text-dim", "32", "--compare", "--json", str(out)]
    )
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCHMARK), run_name="__main__")
    finally:  # its --threads would stay set for the tests after this one
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "x LVIS" in printed and "(c) LVISResults + LVISEval.run" in printed
    rows = {row["protocol"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"standard", "fixed"}
    for row in rows.values():
        assert {"scoring_s", "writing_s", "lvis_s", "old_lvis_s"} <= set(row) and 0 <= row["AP"] <= 1
    # 30 classes x ~6 boxes per image: the standard protocol keeps every pair (< 300 per image);
    # the fixed one keeps round(10,000 x 20 / 19,809) = 10 per class.
    assert rows["fixed"]["detections"] == 10 * 30
