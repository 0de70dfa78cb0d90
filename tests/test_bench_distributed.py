"""scripts/bench_distributed.py --tiny: its four legs (DDP on one and two processes, DDP and FSDP on two)
run through torchrun on CPU, and the legs that take the same steps report the same loss curve."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("bench_distributed", REPO / "scripts" / "bench_distributed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_legs_agree_one_process_with_accumulation_two_processes_and_sharded(tmp_path):
    out = tmp_path / "bench.json"
    load_script().main(["--tiny", "--steps", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    legs = result["legs"]
    assert [legs[n]["processes"] for n in legs] == [1, 2, 2, 2]
    assert [legs[n]["distributed"] for n in legs] == ["ddp", "ddp", "ddp", "fsdp"]
    assert all(leg["steps"] == 4 and len(leg["loss_history"]) == 4 for leg in legs.values())
    assert legs["ddp_7b_1gpu"]["tokens"] == legs["ddp_7b_2gpu"]["tokens"]  # the same examples per step
    assert legs["ddp_13b_2gpu"]["total"] > legs["ddp_7b_2gpu"]["total"]  # the larger shape
    assert len(legs["fsdp_13b_2gpu"]["peak_memory_gib_per_process"]) == 2
    assert result["comparisons"]["ddp_7b"]["loss_max_abs_diff"] < 1e-5
    assert result["comparisons"]["fsdp_13b"]["loss_max_abs_diff"] < 1e-5
    assert result["comparisons"]["fsdp_13b"]["memory_fsdp_over_ddp"] is None  # no GPU memory on CPU
