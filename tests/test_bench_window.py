"""scripts/bench_window.py on CPU: every attention window, with and without compaction, decodes the
same tokens in float32 (they change which slots a step reads, not which it attends), and each is
timed and written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from adapters_lab import generated_slots

REPO = Path(__file__).resolve().parents[1]


def test_tiny_windows_decode_the_same_tokens_and_are_written(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_window", REPO / "scripts" / "bench_window.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "window.json"
    monkeypatch.setattr(generated_slots, "BUCKET", 1)  # compaction at the tiny model's sizes
    result = bench.main(["--tiny", "--out", str(out), "--windows", "4,1,3", "--compact", "off,on", "--repeats", "1",
                         "--max-new-tokens", "9"])
    assert [row["num_beams"] for row in result["decodings"]] == [4, 1]
    for row in result["decodings"]:
        assert [(w["window"], w["compact"]) for w in row["windows"]] == [(4, False), (4, True), (1, False),
                                                                         (1, True), (3, False), (3, True)]
        assert all(w["tokens_equal_first"] and w["batches_agree"] and w["batch_s"] > 0 for w in row["windows"])
        full = [w["generated_slots_last_step"] for w in row["windows"] if not w["compact"]]
        # The last step feeds step 7's tokens: periods of 4 end at step 8, of 1 at 8, of 3 at 9; no slot dropped.
        assert full == [row["num_beams"] * n for n in (8, 8, 9)]
    beams = result["decodings"][0]["windows"]
    assert any(on["generated_slots_last_step"] < off["generated_slots_last_step"] for off, on in zip(beams[::2], beams[1::2]))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
