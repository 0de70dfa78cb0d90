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


def test_events_are_counted_as_the_training_loop_schedules_them(tmp_path):
    from tests.train_helpers import run, token_examples, trainer_cfg

    assert bench.scheduled_events(1854, 200, 200, True) == (10, 10)  # 9 during, 1 at the end; 200..1800 and 1854
    assert bench.scheduled_events(1800, 200, 200, True) == (9, 9)  # step 1800: the closing ones only
    assert bench.scheduled_events(7, 0, 0, False) == (0, 1)
    for steps, every in ((6, 2), (7, 3), (5, 0)):  # against what the loop does
        cfg = trainer_cfg(max_steps=steps, eval_every=every, checkpoint_every=every)
        _, result = run(cfg, token_examples(40, seed=1), checkpoint_dir=tmp_path / f"{steps}_{every}",
                        val=token_examples(4, seed=2))
        counted = (len(result.validation_seconds), len(result.checkpoint_seconds))
        assert bench.scheduled_events(steps, every, every, True) == counted


def sample(seconds_per_val, seconds_per_ckpt, steps=12, tokens_per_step=2739, steady=15000.0):
    from types import SimpleNamespace

    return SimpleNamespace(steps=steps, tokens=steps * tokens_per_step, steady_tokens_per_second=steady,
                           validation_seconds=seconds_per_val, checkpoint_seconds=seconds_per_ckpt)


def test_a_sampled_train_stage_extrapolates_steps_and_recurring_events_and_counts_compilation_once():
    # 12 steps (2.19 s at the steady rate), validations of 30 s (compiling) then 4 s, checkpoints of 6 s then 5 s;
    # the run took 60 s, so 60 - 2.19 - 34 - 11 = 12.8 s were the first steps' compilation.
    result = sample([30.0, 4.0], [6.0, 5.0])
    steps_time = 12 * 2739 / 15000.0
    compile_seconds, train = bench.split_train(60.0, result, 1854, 10, 10)
    assert compile_seconds == pytest.approx(60.0 - steps_time - 45.0 + 26.0 + 1.0)
    assert train == pytest.approx(1854 * 2739 / 15000.0 + 10 * 4.0 + 10 * 5.0)
    # a run of the whole schedule gives its own wall time back, split
    compile_seconds, train = bench.split_train(60.0, result, 12, 2, 2)
    assert compile_seconds + train == pytest.approx(60.0)
    assert bench.recurring([7.0]) == (7.0, 0.0) and bench.recurring([]) == (0.0, 0.0)
    assert bench.recurring([1.0, 3.0, 5.0]) == (4.0, 0.0)  # a first event cheaper than the later ones: no excess


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


def test_a_cell_trains_at_its_configured_base_precision(monkeypatch):
    from types import SimpleNamespace

    import torch

    from adapters_lab.config import BasePrecision
    from adapters_lab.training import loop as loop_module

    cfg = bench.compose_cell("lora", tiny=True, overrides=["model.base_precision=fp8"])
    seen = {}

    def fake_train(*args, **kwargs):
        seen.update(kwargs)
        raise StopIteration

    monkeypatch.setattr(loop_module, "train", fake_train)
    with pytest.raises(StopIteration):
        bench.train_stage(cfg, None, SimpleNamespace(pad_token_id=0), SimpleNamespace(check_training=lambda c: None),
                          bench.synthetic_examples(24, vocab=100, bos=1, cutoff=64, seed=0), torch.device("cpu"))
    assert BasePrecision(seen["base_precision"]) == BasePrecision.fp8


@pytest.mark.skipif(not (SUITE / "gsm8k" / "test.json").is_file(), reason="math test sets not present")
def test_profile_covers_four_steps_after_the_first_n_plus_one(tmp_path, capsys):
    bench.main(["--tiny", "--out", str(tmp_path / "p.json"), "--cells", "lora", "--max-steps", "20", "--profile", "11"])
    printed = capsys.readouterr().out
    assert "profile of 4 timed steps" in printed
    assert printed.index("profile of 4 timed steps") < printed.index("lora: load")  # during the train stage
    steps = [line.split() for line in printed.splitlines() if line.strip().startswith("ProfilerStep*")]
    assert steps and steps[0][-1] == "4"  # the profiler's steps, one per optimiser step
