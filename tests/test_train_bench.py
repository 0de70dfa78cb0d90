"""`scripts/bench_train.py --tiny`: every variant runs on the CPU and reports a real rate."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_tiny_runs_every_variant(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    rows = bench.main(["--tiny", "--variants", "paper,tuned,ours", "--json", str(tmp_path / "rows.json")])
    assert [r.note.startswith("FAILED") for r in rows] == [False] * 3, [r.note for r in rows]
    assert all(r.tokens_per_second > 0 for r in rows)
    assert rows[0].padded_share > 0 and rows[1].padded_share == 0  # paper pads; tuned uses full sequences
    assert "| variant | real tok/s |" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 3


def test_length_list_matches_the_paper_cut():
    lengths = json.loads((REPO / "scripts" / "math_data_lengths.json").read_text())["lengths"]
    assert len(lengths) == 3260 and max(lengths) == 256 and min(lengths) > 16
