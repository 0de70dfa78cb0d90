"""scripts/bench_window.py on CPU: every attention window decodes the same tokens in float32 (the
window changes which slots a step reads, not which it attends), and each window is timed and written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_windows_decode_the_same_tokens_and_are_written(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_window", REPO / "scripts" / "bench_window.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "window.json"
    result = bench.main(["--tiny", "--out", str(out), "--windows", "4,1,3", "--repeats", "1",
                         "--max-new-tokens", "7"])
    assert [row["num_beams"] for row in result["decodings"]] == [4, 1]
    for row in result["decodings"]:
        assert [w["window"] for w in row["windows"]] == [4, 1, 3]
        assert all(w["tokens_equal_first_window"] and w["batch_s"] > 0 for w in row["windows"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
