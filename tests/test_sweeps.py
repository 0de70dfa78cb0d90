"""Multirun sweeps: a failing job is recorded and the others go on; the summary lists every job;
cells whose adapter does not exist yet can be left out; Optuna returns the configured metric."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from adapters_lab.sweep import available_cells, cell_adapter, metric_value, sweep_cells
from tests.conftest import CONF_DIR, REPO

# CPU-sized jobs: two optimiser steps, one greedy generation of a few tokens per example.
TINY = ["trainer.max_steps=2", "trainer.warmup_steps=0", "trainer.batch_size=2", "trainer.micro_batch_size=2",
        "dataset.val_set_size=2", "trainer.progress_bar=false", "dataset.arith.num_train=16",
        "dataset.arith.num_test=2", "eval.num_beams=1", "eval.max_new_tokens=4", "logger=none"]


def multirun(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "-m", *TINY, *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_failing_job_is_recorded_and_the_others_go_on(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # Job 1 has a bad learning rate: a user error, raised before any model loads.
    result = multirun("trainer.lr=-1,1e-3", "adapter.rank=2", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode != 0  # Hydra reports the failure once every job has run

    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summary["counts"] == {"failed": 1, "completed": 1}
    failed, completed = summary["jobs"]
    assert failed["num"] == 0 and failed["status"] == "failed"
    assert failed["error"] == "TrainerConfigError: trainer.lr=-1.0: must be positive"
    assert "trainer.lr=-1" in failed["overrides"]
    assert completed["num"] == 1 and completed["status"] == "completed"
    metrics = json.loads((sweep_dir / completed["dir"] / "metrics.json").read_text())
    assert completed["value"] == pytest.approx(metrics["eval"]["average"])  # run.py returned optimized_metric
    assert not (sweep_dir / failed["dir"] / "metrics.json").exists()
    table = (sweep_dir / "sweep_summary.md").read_text()
    assert "| failed |" in table and "| completed |" in table and "must be positive" in table

    # Same sweep again: the finished job is skipped (not recomputed), the failed one is retried.
    again = multirun("trainer.lr=-1,1e-3", "adapter.rank=2", f"hydra.sweep.dir={sweep_dir}")
    assert again.returncode != 0
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert [job["status"] for job in jobs] == ["failed", "skipped (finished earlier)"]
    assert json.loads((sweep_dir / completed["dir"] / "metrics.json").read_text()) == metrics


def copy_conf(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    return conf


def test_cells_follow_includes_and_missing_adapters_are_left_out(tmp_path):
    assert cell_adapter("capacity/lora_r8") == "lora"  # through /experiment/paper/lora
    assert cell_adapter("placement/series_mlp") == "adapterp"
    assert cell_adapter("paper/prefix") == "prefix"
    conf = copy_conf(tmp_path)
    (conf / "adapter" / "prefix.yaml").unlink(missing_ok=True)
    kept, missing = available_cells("capacity", conf)
    assert missing == [f"capacity/prefix_t{n}" for n in (10, 20, 30, 40)]
    assert kept == [cell for cell in sweep_cells("capacity", conf) if cell not in missing]


def test_sweep_cells_read_the_sweeper_params(tmp_path):
    conf = copy_conf(tmp_path)
    raw = yaml.safe_load((conf / "sweep" / "math_main.yaml").read_text())
    assert sweep_cells("math_main", conf) == raw["hydra"]["sweeper"]["params"]["experiment"].split(",")
    assert sweep_cells("math_main") == ["paper/prefix", "paper/series", "paper/parallel", "paper/lora"]


def test_metric_value_reads_nested_keys():
    metrics = {"eval": {"average": 0.25, "gsm8k": {"accuracy": 0.5}}, "bad": float("nan"), "flag": True}
    assert metric_value(metrics, "eval/average") == 0.25
    assert metric_value(metrics, "eval/gsm8k/accuracy") == 0.5
    assert metric_value(metrics, "eval/missing") is None
    assert metric_value(metrics, "bad") is None and metric_value(metrics, "flag") is None


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None, reason="optuna sweeper")
def test_optuna_search_optimises_the_returned_metric(tmp_path):
    sweep_dir = tmp_path / "search"
    result = multirun("hparams_search=optuna", "hydra.sweeper.n_trials=2", "optimized_metric=train/steps",
                      f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == 2.0  # train/steps of every trial = trainer.max_steps
    assert set(best["best_params"]) == {"trainer.lr", "adapter.rank"}
    assert 1e-5 <= best["best_params"]["trainer.lr"] <= 1e-2
    assert best["best_params"]["adapter.rank"] in (4, 8, 16, 32, 64)
    statuses = json.loads((sweep_dir / "sweep_summary.json").read_text())["counts"]
    assert statuses == {"completed": 2}


def test_a_reordered_sweep_never_reports_one_config_beside_another_ones_results(tmp_path):
    """Job folders are named by job number: rank 4 re-run into the folder of rank 2 must not count as finished."""
    sweep_dir = tmp_path / "sweep"
    first = multirun("adapter.rank=2,4", f"hydra.sweep.dir={sweep_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    metrics = {job["dir"]: (sweep_dir / job["dir"] / "metrics.json").read_bytes() for job in jobs}

    again = multirun("adapter.rank=4,2", f"hydra.sweep.dir={sweep_dir}")
    assert again.returncode != 0
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert [job["status"] for job in jobs] == ["failed", "failed"]
    assert "adapter.rank: 2 -> 4" in jobs[0]["error"] and "adapter.rank: 4 -> 2" in jobs[1]["error"]
    assert "overwrite=true replaces it" in jobs[0]["error"]
    assert {job["dir"]: (sweep_dir / job["dir"] / "metrics.json").read_bytes() for job in jobs} == metrics

    same = multirun("adapter.rank=2,4", f"hydra.sweep.dir={sweep_dir}")
    assert same.returncode == 0, same.stderr[-2000:]
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert [job["status"] for job in jobs] == ["skipped (finished earlier)"] * 2


def test_a_single_runs_failure_is_not_logged_as_a_sweep_job(tmp_path, caplog):
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from adapters_lab.sweep import SweepSummary

    def config(mode):
        return OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path / mode.name)}, "job": {"num": 0},
                                           "mode": mode, "sweep": {"dir": str(tmp_path)}, "overrides": {"task": []}}})

    failed = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("boom"))
    with caplog.at_level("ERROR"):
        SweepSummary().on_job_end(config(RunMode.RUN), failed)
    assert "job" not in caplog.text
    assert json.loads((tmp_path / "RUN" / "job_status.json").read_text())["error"] == "RuntimeError: boom"
    with caplog.at_level("ERROR"):
        SweepSummary().on_job_end(config(RunMode.MULTIRUN), failed)
    assert "job MULTIRUN failed: RuntimeError: boom" in caplog.text
