"""scripts/make_table.py on hand-made sweep folders: values, paper columns, failed and missing cells,
and every output format (the end-to-end run on tiny_llama is `make smoke-tables`)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from adapters_lab.sweep import STATUS_FILE
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("make_table", REPO / "scripts" / "make_table.py")
make_table = importlib.util.module_from_spec(spec)
sys.modules["make_table"] = make_table  # dataclasses look their module up
spec.loader.exec_module(make_table)


def fake_job(sweep_dir: Path, cell: str, accuracies: dict[str, float] | None, error: str | None = None) -> None:
    job = sweep_dir / cell / "x"
    (job / ".hydra").mkdir(parents=True)
    choices = {"hydra": {"runtime": {"choices": {"experiment": cell}}}}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(choices))
    if accuracies is not None:
        eval_ = {name: {"accuracy": 0.0, "accuracy_paper": acc, "accuracy_strict": 0.0}
                 for name, acc in accuracies.items()}
        (job / "metrics.json").write_text(json.dumps({"eval": {**eval_, "average": 0.0}}))
    else:
        (job / STATUS_FILE).write_text(json.dumps({"status": "failed", "error": error}))


def read_csv(path: Path) -> dict[str, list[str]]:
    rows = list(csv.reader(path.open()))
    return {row[0]: row[1:] for row in rows}


def test_math_table_values_paper_rows_and_failed_cell(tmp_path):
    sweep = tmp_path / "runs"
    fake_job(sweep, "paper/lora", {"gsm8k": 0.5, "AQuA": 0.25, "mawps": 1.0, "SVAMP": 0.0, "MultiArith": 0.9})
    fake_job(sweep, "paper/series", {"gsm8k": 0.125, "AQuA": 0.5, "mawps": 0.5, "SVAMP": 0.5})
    fake_job(sweep, "paper/parallel", None, error="RuntimeError: CUDA out of memory")
    table = make_table.build("math_main", "llama7b", sweep)
    paths = make_table.write_table(table, "llama7b", tmp_path / "out")
    assert [p.suffix for p in paths] == [".md", ".csv", ".tex"]

    rows = read_csv(tmp_path / "out" / "math_main_llama7b.csv")
    assert rows["Method"] == ["GSM8K", "AQuA", "MAWPS", "SVAMP", "Avg"]
    assert rows["LoRA (ours)"] == ["50.0", "25.0", "100.0", "0.0", "43.8"]  # mean of the four columns only
    assert rows["Series (ours)"] == ["12.5", "50.0", "50.0", "50.0", "40.6"]
    assert rows["Parallel (ours)"] == ["failed"] * 5
    assert rows["Prefix (ours)"] == [""] * 5  # never ran
    # The upstream README's LLaMA-7B rows.
    assert rows["LoRA (paper, llama7b)"] == ["37.5", "18.9", "79.0", "52.1", "46.9"]
    assert rows["Prefix (paper, llama7b)"] == ["24.4", "14.2", "63.4", "38.1", "35.0"]
    assert rows["GPT-3.5 (paper)"][-1] == "55.1"
    missing = make_table.missing_cells(table)
    assert len(missing) == 10 and "Parallel (ours) / GSM8K" in missing and "Prefix (ours) / Avg" in missing

    md = (tmp_path / "out" / "math_main_llama7b.md").read_text()
    assert "| LoRA (ours) | 50.0 | 25.0 | 100.0 | 0.0 | 43.8 |" in md
    tex = (tmp_path / "out" / "math_main_llama7b.tex").read_text()
    assert "\\begin{tabular}{lrrrrr}" in tex and "LoRA (ours) & 50.0 & 25.0 & 100.0 & 0.0 & 43.8 \\\\" in tex


def test_commonsense_paper_rows_for_a_model_without_published_numbers(tmp_path):
    table = make_table.build("commonsense_main", "tiny_llama", tmp_path / "none")
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["LoRA (paper, llama7b)"] == ["68.9", "80.7", "77.4", "78.1", "78.8", "77.8", "61.3", "74.8", "74.7"]
    assert any("tiny_llama" in note for note in table.notes)


def test_placement_and_capacity_tables_and_plots(tmp_path):
    sweep = tmp_path / "runs"
    for i, cell in enumerate(["series_attn", "series_mlp", "series_both", "lora_attn", "lora_mlp", "lora_both"]):
        fake_job(sweep / "placement", f"placement/{cell}", {"gsm8k": i / 10, "SVAMP": 0.5})
    fake_job(sweep / "capacity", "capacity/lora_r4", {"gsm8k": 0.2})
    fake_job(sweep / "capacity", "capacity/prefix_t20", {"gsm8k": 0.4})

    placement = make_table.build("placement", "llama7b", sweep / "placement")
    rows = {row[0]: row[1:] for row in placement.rows}
    assert rows["Series (ours)"] == ["25.0", "30.0", "35.0"]
    assert rows["LoRA (ours)"] == ["40.0", "45.0", "50.0"]
    assert rows["Parallel (ours)"] == ["", "", ""]
    assert rows["Series (paper, llama7b)"][1] == "59.5"
    out = make_table.write_table(placement, "llama7b", tmp_path / "out")
    assert out[-1].suffix == ".png" and out[-1].read_bytes()[:4] == b"\x89PNG"

    capacity = make_table.build("capacity", "llama7b", sweep / "capacity")
    by_cell = {(row[0], row[2]): row[3] for row in capacity.rows}
    assert by_cell[("LoRA", "4")] == "20.0" and by_cell[("Prefix", "20")] == "40.0" and by_cell[("LoRA", "8")] == ""
    assert capacity.figure["LoRA (rank)"] == {4: pytest.approx(20.0)}
    png = make_table.write_table(capacity, "llama7b", tmp_path / "out")[-1]
    assert png.stat().st_size > 1000


def test_check_fails_until_every_cell_is_filled(tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["math_main", "--model", "m", "--runs-dir", str(runs), "--out", str(tmp_path / "out")]
    assert make_table.main([*args, "--check"]) == 1
    assert "cells without a finished run" in capsys.readouterr().out
    for method in ("prefix", "series", "parallel", "lora"):
        fake_job(runs / "math_main" / "m", f"paper/{method}", {s: 0.5 for s in make_table.MATH_COLUMNS})
    assert make_table.main([*args, "--check"]) == 0


def test_smoke_data_has_parsable_answers_for_every_set(tmp_path):
    from adapters_lab.answers import label_parses
    from adapters_lab.data.sources import COMMONSENSE_SETS

    make_table.write_smoke_data(tmp_path)
    for name in make_table.MATH_COLUMNS + make_table.MATH_DATA_COLUMNS + COMMONSENSE_SETS:
        records = json.loads((tmp_path / "dataset" / name / "test.json").read_text())
        assert records and all(label_parses(name, r["answer"]) for r in records), name
    for train in ("math_10k", "math_data", "commonsense_170k"):
        assert json.loads((tmp_path / "ft-training_set" / f"{train}.json").read_text())


def test_tables_show_the_protocol_asked_for(tmp_path):
    sweep = tmp_path / "runs"
    fake_job(sweep, "paper/lora", {"boolq": 0.5, "piqa": 0.25})
    metrics_path = sweep / "paper/lora" / "x" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["eval"]["boolq"].update(accuracy_likelihood=0.75, accuracy_likelihood_norm=0.625)
    metrics_path.write_text(json.dumps(metrics))
    columns = make_table.COMMONSENSE_SETS
    row = {p: next(r for r in make_table.build("commonsense_main", "llama7b", sweep, p).rows if r[0] == "LoRA (ours)")
           for p in make_table.PROTOCOLS}
    assert row["paper"][1:3] == ["50.0", "25.0"] and row["strict"][1:3] == ["0.0", "0.0"]
    assert row["likelihood"][1:3] == ["75.0", ""] and row["likelihood_norm"][1] == "62.5"  # piqa ran no likelihood
    assert len(row["paper"]) == len(columns) + 2
    assert "likelihood accuracies" in make_table.build("commonsense_main", "llama7b", sweep, "likelihood").notes[-1]


def test_main_tables_show_time_memory_and_size_from_the_report(tmp_path):
    sweep = tmp_path / "runs"
    fake_job(sweep, "paper/lora", {"gsm8k": 0.5, "AQuA": 0.25, "mawps": 1.0, "SVAMP": 0.0})
    path = sweep / "paper/lora" / "x" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["report"] = {"train_seconds": 90.0, "eval_seconds": 30.0, "peak_reserved_gib": 21.25,
                         "adapter_bytes": 16_000_000}
    path.write_text(json.dumps(metrics))
    table = make_table.build("math_main", "llama7b", sweep, report=True)
    assert table.header[-4:] == list(make_table.REPORT_COLUMNS)
    lora = next(r for r in table.rows if r[0] == "LoRA (ours)")
    assert lora[-4:] == ["1.5", "0.5", "21.2", "16.0"] and lora[1:6] == ["50.0", "25.0", "100.0", "0.0", "43.8"]
    assert all(len(r) == len(table.header) for r in table.rows)
    assert make_table.build("math_main", "llama7b", sweep).header[-1] == "Avg"  # off by default


def test_math_data_table_has_six_sets_and_the_published_paper_era_numbers(tmp_path):
    """The upstream README's table at b2599fe (../shared/data/llm_adapters_math_data_table.md)."""
    sweep = tmp_path / "runs"
    fake_job(sweep, "paper/lora", {"MultiArith": 1.0, "gsm8k": 0.5, "AddSub": 0.5, "AQuA": 0.0, "SingleEq": 0.25,
                                   "SVAMP": 0.75, "mawps": 0.0})
    make_table.write_table(make_table.build("math_data_main", "llama13b", sweep), "llama13b", tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "math_data_main_llama13b.csv")
    assert rows["Method"] == ["MultiArith", "GSM8K", "AddSub", "AQuA", "SingleEq", "SVAMP", "Avg"]
    assert rows["LoRA (ours)"] == ["100.0", "50.0", "50.0", "0.0", "25.0", "75.0", "50.0"]  # mawps not a column
    assert rows["LoRA (paper, llama13b)"] == ["94.8", "47.5", "87.3", "18.5", "89.8", "54.6", "65.4"]
    assert rows["Series (paper, llama13b)"] == ["93.0", "44.0", "80.5", "22.0", "87.6", "50.8", "63.0"]
    assert rows["GPT-3.5 (paper)"] == ["83.8", "56.4", "85.3", "38.9", "88.1", "69.9", "70.4"]
    bloom = make_table.build("math_data_main", "bloomz7b", sweep)
    assert next(r for r in bloom.rows if r[0] == "Prefix (paper, bloomz7b)")[1:] == [
        "68.8", "13.8", "47.1", "12.5", "49.4", "24.1", "36.0"]
    for model in ("bloomz7b", "gptj6b", "llama7b", "llama13b"):  # every published row, all six sets and the mean
        for method, values in make_table.PAPER["math_data_main"]["models"][model].items():
            assert list(values) == make_table.MATH_DATA_COLUMNS + ["average"], (model, method)


def test_math_data_sweep_trains_on_math_data_with_the_paper_cells():
    from adapters_lab.sweep import sweep_cells
    from tests.conftest import compose_config

    assert sweep_cells("math_data_main") == ["paper/prefix", "paper/series", "paper/parallel", "paper/lora"]
    cfg = compose_config(["sweep=math_data_main", "experiment=paper/series"], fast=False)
    assert cfg.dataset.train == "math_data" and cfg.dataset.val_set_size == 120
    assert list(cfg.dataset.eval_sets) == make_table.MATH_DATA_COLUMNS
    assert cfg.adapter.name == "adapterp" and cfg.adapter.rank == 256 and cfg.trainer.lr == 3e-4


def test_a_table_whose_cells_fail_exits_non_zero_naming_the_missing_data(tmp_path, capsys):
    """`make table-math MODEL=tiny_llama` where math_10k is not shipped: every cell fails, and so does make."""
    code = make_table.main(["math_main", "--model", "tiny_llama", "--run", "--out", str(tmp_path / "tables"), "--",
                            f"paths.data_root={tmp_path / 'no-data'}"])
    out = capsys.readouterr().out
    assert code == 1
    assert "math_main: the sweep exited with 1" in out
    assert f"DataError: dataset.train=math_10k: file not found: {tmp_path / 'no-data'}" in out
