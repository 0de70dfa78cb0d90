"""scripts/eval_floor.py: the suite's decoding floor against a hand computation, and what reading only
the beams' live tokens removes from it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("eval_floor", REPO / "scripts" / "eval_floor.py")
floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floor)


def test_floor_of_one_batch_by_hand():
    # Two prompts of 3 and 5 tokens, 2 beams, 3 new tokens (steps t = 1, 2), 1 TFLOP/s and 1 TB/s.
    got = floor.suite_floor([3, 5], [[0, 1]], 2, 3, 1.0, 1.0)
    flops = 2 * floor.MATMUL_PARAMS * (8 + 4 + 4)  # prefill of 8 tokens, then 4 rows a step
    reads = 2 * 2 * floor.MATMUL_PARAMS + floor.KV_BYTES_PER_TOKEN * ((8 + 4 * 1) + (8 + 4 * 2))
    assert got["compute_s"] == pytest.approx(flops / 1e12)
    assert got["memory_s"] == pytest.approx(reads / 1e12)
    assert got["steps"] == 2


def test_live_fraction_scales_only_the_beams_generated_reads():
    full = floor.suite_floor([3, 5], [[0, 1]], 2, 3, 1.0, 1.0)
    live = floor.suite_floor([3, 5], [[0, 1]], 2, 3, 1.0, 1.0, live=0.25)
    saved = floor.KV_BYTES_PER_TOKEN * 0.75 * (4 * 1 + 4 * 2) / 1e12
    assert full["memory_s"] - live["memory_s"] == pytest.approx(saved)
    assert live["compute_s"] == full["compute_s"]
    greedy = [floor.suite_floor([3, 5], [[0, 1]], 1, 3, 1.0, 1.0, live=f)["memory_s"] for f in (1.0, 0.25)]
    assert greedy[0] == greedy[1]  # greedy has no dead tokens
