"""scripts/bench_paper.py on CPU: HF PEFT + transformers' Trainer, our padded recipe and paper_packed
train the same shrunk shape for the same steps, and each rate is reported with its ratio."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_bench_runs_every_variant_on_the_same_steps(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_paper", REPO / "scripts" / "bench_paper.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    rows = bench.main(["--tiny", "--out", str(out), "--shapes", "smollm2_135m", "--steps", "3"])
    by_variant = {row["variant"]: row for row in rows}
    assert set(by_variant) == set(bench.VARIANTS)
    assert all(row["steps"] == 3 and row["tokens_per_second"] > 0 for row in rows)
    assert by_variant["paper_packed"]["padding"] < 0.05 < by_variant["padded"]["padding"]
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    printed = capsys.readouterr().out
    assert "| smollm2_135m | hf_trainer |" in printed and "| 1.00 |" in printed
