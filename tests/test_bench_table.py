"""scripts/bench_table.py: the math table's cells composed as the table composes them, timed per
stage on CPU with tiny sizes; finished cells are kept and skipped, other settings refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO.parent / "shared" / "data" / "llm_adapters" / "dataset"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_table", REPO / "scripts" / "bench_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_script()


@pytest.mark.parametrize("cell,lr,batch", [("prefix", 3e-2, 8), ("series", 3e-4, 16), ("parallel", 3e-4, 16),
                                           ("lora", 3e-4, 16)])
def test_cells_are_the_tables_experiments_on_the_random_7b_shape(cell, lr, batch):
    cfg = bench.compose_cell(cell, tiny=False, overrides=[])
    assert cfg.model.init.value == "random" and cfg.model.arch.hidden_size == 4096
    assert cfg.trainer.lr == lr and cfg.trainer.batch_size == batch and cfg.trainer.micro_batch_size == 4
    assert list(cfg.dataset.eval_sets) == ["math"] and cfg.eval.num_beams == 4
    assert cfg.dataset.cutoff_len == 256 and cfg.trainer.batching.value == "padded"


def test_examples_follow_the_math_data_lengths_in_order():
    lengths = json.loads(bench.LENGTHS_FILE.read_text())["lengths"]
    examples = bench.synthetic_examples(len(lengths) + 5, vocab=100, bos=1, cutoff=200, seed=0)
    got = [len(x["input_ids"]) for x in examples]
    assert got == [min(n, 200) for n in lengths + lengths[:5]]
    assert all(x["input_ids"][0] == 1 and x["labels"] == x["input_ids"] for x in examples)
    assert max(t for x in examples for t in x["input_ids"]) < 100


def test_full_schedule_steps_are_the_trainers():
    from adapters_lab.config import TrainerConfig

    examples = bench.synthetic_examples(9880, vocab=100, bos=1, cutoff=256, seed=0)
    paper = TrainerConfig(epochs=3, batch_size=16, micro_batch_size=4)
    assert bench.full_updates(paper, examples, 0, 0) == 3 * 618  # 2470 micro-batches an epoch, 4 a step
    assert bench.full_updates(TrainerConfig(max_steps=7), examples, 0, 0) == 7


def test_a_sampled_train_stage_extrapolates_its_steps_not_its_closing_costs():
    # 12 steps of 2,739 tokens took 40 s, of which 12 x 2,739 / 9,869 = 3.3 s were steps at the steady rate.
    got = bench.extrapolated_train(40.0, 12, 1854, 12 * 2739, 9869.0)
    assert got == pytest.approx(40.0 + 1842 * 2739 / 9869.0)
    assert got < 40.0 * 1854 / 12 / 10  # linear scaling would also repeat the 36.7 s spent once, 1854 / 12 times
    assert bench.extrapolated_train(6.0, 2, 6, 100, 0.0) == pytest.approx(18.0)  # no steady rate: linear


@pytest.mark.skipif(not (SUITE / "gsm8k" / "test.json").is_file(), reason="math test sets not present")
def test_tiny_run_times_every_stage_keeps_cells_and_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(["--tiny", "--out", str(out), "--cells", "lora"])
    row = results["cells"]["lora"]
    assert set(row["stages"]) == set(bench.STAGES) and all(v >= 0 for v in row["stages"].values())
    assert row["stages"]["load"] > 0 and row["stages"]["train"] > 0 and row["stages"]["eval"] > 0
    assert row["total"] == pytest.approx(sum(row["stages"].values()))
    measured = row["measured"]
    assert measured["full_questions"] == 4314 and measured["questions"] == 7 * 2  # the whole suite, 2 per set
    assert row["extrapolated"] == ["eval"]
    assert row["stages"]["eval"] == pytest.approx(measured["eval_seconds"] * 4314 / 14)
    assert measured["steps"] == measured["full_steps"] == 3 * 2  # 20 examples: 5 micro-batches an epoch, 4 a step
    assert json.loads(out.read_text()) == results
    printed = capsys.readouterr().out
    assert "| lora |" in printed and "| **all** |" in printed
    again = bench.main(["--tiny", "--out", str(out), "--cells", "lora"])
    assert again == results and "already in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds cells timed with"):
        bench.main(["--tiny", "--out", str(out), "--cells", "lora", "--examples", "30"])
    sampled = bench.main(["--tiny", "--out", str(out), "--cells", "lora", "--max-steps", "2", "--overwrite"])
    row = sampled["cells"]["lora"]
    assert row["extrapolated"] == ["train", "eval"]
    assert (row["measured"]["steps"], row["measured"]["full_steps"]) == (2, 6)
