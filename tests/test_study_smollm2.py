"""scripts/study_smollm2.py (the GPU study's driver) and scripts/results_smollm2.py (its tables), on the
tiny model on the CPU: each planned job composes, the budget stops the plan, and every table cell
is the runs' metrics.json."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from adapters_lab.config import CONF_DIR, register_configs

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


study = script("study_smollm2")
results = script("results_smollm2")


def test_plan_covers_every_family_and_set_and_each_job_composes():
    sweeps = study.plan(math_limit=100)
    jobs = {(m, d) for s in sweeps for m in s.methods
            for d in next(o for o in s.overrides if o.startswith("dataset=")).split("=")[1].split(",")}
    families = {"none", "lora", *study.OTHERS}
    assert families == set(results.METHODS)
    assert jobs == {(m, d) for m in families for d in ["arith", "math_data", *study.COMMONSENSE]}
    assert [s.seeds for s in sweeps if "lora" in s.methods] == [[1, 2, 3]] * 4
    common = ["model=smollm2_135m", "model.local_path=/nowhere", "trainer=fast", "eval=greedy"]
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for sweep in sweeps:
            for method in (sweep.methods[0], sweep.methods[-1]):
                single = [o.split(",")[0] for o in sweep.overrides]
                cfg = compose("config", [*common, f"experiment=smollm2/{method}", *single])
                virtual = method in ("prefix", "prompt")  # virtual tokens before each sequence: no packed rows
                assert cfg.adapter.name == method and cfg.trainer.batching.value == ("padded" if virtual else "packed")
                if cfg.dataset.name == "arith":
                    assert cfg.dataset.arith.num_test >= 500 and cfg.eval.limit is None
                assert cfg.trainer.max_steps > cfg.trainer.warmup_steps > 0


def test_a_spent_budget_runs_nothing_and_says_so(tmp_path):
    out = tmp_path / "study"
    subprocess.run([sys.executable, "scripts/study_smollm2.py", "--tiny", "--budget-s", "1", "--out", str(out)],
                   cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)
    record = json.loads((out / "study.json").read_text())
    assert [s["status"] for s in record["sweeps"]] == ["not run (budget spent)"] * len(study.plan(1))
    assert not list(out.rglob("metrics.json"))


def test_template_has_the_layout_and_no_numbers(tmp_path):
    doc = tmp_path / "r.md"
    subprocess.run([sys.executable, "scripts/results_smollm2.py", "--template", "--out", str(doc)],
                   cwd=REPO, env=ENV, check=True, capture_output=True, timeout=120)
    text = doc.read_text()
    labels = tuple(f"| {label} |" for label in results.LABELS.values())
    rows = [line for line in text.splitlines() if line.startswith(labels)]
    assert len(rows) == 9 * (1 + 2 + 2)  # arith, math and commonsense (paper, strict): a row per family
    assert any(row.startswith("| AdapterH |") for row in rows) and any(row.startswith("| Prompt |") for row in rows)
    assert all(set(cell.strip()) <= {"–"} for row in rows for cell in row.strip("|").split("|")[1:])


@pytest.mark.slow
def test_tiny_study_sweep_and_its_tables_agree_with_metrics(tmp_path):
    out, archive, doc = tmp_path / "study", tmp_path / "export" / "study.tar.gz", tmp_path / "r.md"
    subprocess.run([sys.executable, "scripts/study_smollm2.py", "--tiny", "--only", "arith_lora", "--out", str(out),
                    "--export", str(archive)], cwd=REPO, env=ENV, check=True, capture_output=True, timeout=900)
    subprocess.run([sys.executable, "scripts/results_smollm2.py", str(archive), "--out", str(doc)],
                   cwd=REPO, env=ENV, check=True, capture_output=True, timeout=120)
    text = doc.read_text()
    for method, label in (("none", "zero-shot"), ("lora", "LoRA")):
        values = [100 * json.loads((out / "runs" / "arith" / method / f"seed{s}" / "metrics.json").read_text())
                  ["eval"]["arith"]["accuracy_paper"] for s in (1, 2, 3)]
        expected = f"{statistics.fmean(values):.1f} ({min(values):.1f}–{max(values):.1f}, 3 seeds)"
        assert f"| {label} | {expected} |" in text
    assert "| DoRA | – | – |" in text  # not run: no number
    timing = [line for line in text.splitlines() if re.match(r"\| arith \| (zero-shot|LoRA) \| [123] \| ", line)]
    assert len(timing) == 6 and all(" 2 | " in row for row in timing if "| LoRA |" in row)  # 2 steps each
    assert "TINY random-init model" in text and "| arith_lora | completed |" in text


def test_sweeps_run_side_by_side_and_the_deadline_stops_the_late_one():
    sleeps = {"a": 1.0, "b": 1.0, "c": 30.0, "d": 0.1}
    sweeps = [study.Sweep(name, ["none"], [1], []) for name in sleeps]
    commands = [[sys.executable, "-c", f"import time; time.sleep({t})"] for t in sleeps.values()]
    start = study.time.perf_counter()
    study.run_sweeps(sweeps, commands, deadline=start + study.MIN_SECONDS + 5, parallel=3)
    status = {s.name: s.status for s in sweeps}
    assert status == {"a": "completed", "b": "completed", "c": "stopped at the budget", "d": "completed"}
    elapsed = study.time.perf_counter() - start
    assert elapsed < study.MIN_SECONDS + 15  # c (30 s) was stopped at the deadline, not waited for
    assert sweeps[0].seconds < 5 and sweeps[1].seconds < 5  # a and b ran together, not one after the other


def test_a_sweep_with_too_little_time_left_is_not_started():
    sweeps = [study.Sweep("late", ["none"], [1], [])]
    study.run_sweeps(sweeps, [[sys.executable, "-c", "raise SystemExit(3)"]], deadline=study.time.perf_counter() + 1,
                     parallel=2)
    assert sweeps[0].status == "not run (budget spent)" and sweeps[0].command == []


def test_later_study_calls_win_and_every_call_is_listed(tmp_path):
    def call(name: str, accuracy: float, started: str) -> Path:
        run = tmp_path / name / "runs" / "arith" / "lora" / "seed1"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("dataset: {name: arith}\nadapter: {name: lora}\nseed: 1\n")
        (run / "metrics.json").write_text(json.dumps({"eval": {"arith": {"accuracy_paper": accuracy, "n": 500}}}))
        (tmp_path / name / "study.json").write_text(json.dumps({"started": started, "sweeps": []}))
        return tmp_path / name

    runs, studies = results.load_all([call("first", 0.25, "t1"), call("second", 0.75, "t2")])
    assert [r["metrics"]["eval"]["arith"]["accuracy_paper"] for r in runs] == [0.75]
    assert [(s["started"], s["source"]) for s in studies] == [("t1", "first"), ("t2", "second")]
