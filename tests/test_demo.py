"""`make demo`'s flow (scripts/demo.py) on the tiny model, offline: a zero-shot run and a LoRA run on the
same held-out problems, and a table whose numbers are those runs' metrics.json; the real-model
experiment fails in one line, without any download, when its converted folder is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from adapters_lab.config import CONF_DIR, register_configs

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
SMALL = ["trainer.max_steps=2", "trainer.warmup_steps=1", "trainer.batch_size=4", "trainer.micro_batch_size=4",
         "dataset.arith.num_test=6", "eval.max_new_tokens=6", "trainer.progress_bar=false"]


def test_demo_experiment_is_the_measured_recipe_on_the_cached_real_model():
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["experiment=demo_smollm2"])
    assert cfg.model.name == "smollm2_135m" and cfg.adapter.name == "lora" and cfg.dataset.name == "arith"
    assert Path(cfg.model.local_path) == Path(cfg.paths.root_dir) / ".cache" / "smollm2-135m"
    assert (cfg.trainer.max_steps, cfg.trainer.lr, cfg.trainer.warmup_steps) == (12, 1e-3, 10)
    assert cfg.dataset.train_on_inputs is False and cfg.eval.num_beams == 1
    assert cfg.dataset.arith.num_test >= 100


def test_missing_converted_folder_fails_in_one_line_without_download(tmp_path):
    missing = tmp_path / "no-model"
    result = subprocess.run([sys.executable, "run.py", "experiment=demo_smollm2", f"model.local_path={missing}",
                             *SMALL, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=OFFLINE,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"error: model=smollm2_135m: model.local_path={missing} is not a folder" in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_demo_prints_both_runs_scores_from_their_metrics(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "scripts/demo.py", "--tiny", "--out", str(out), "--", *SMALL],
                            cwd=REPO, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    zero = json.loads((out / "zero_shot" / "metrics.json").read_text())
    lora = json.loads((out / "lora" / "metrics.json").read_text())
    assert "train" not in zero and not (out / "zero_shot" / "adapter").exists()
    assert lora["train"]["steps"] == 2 and zero["eval"]["arith"]["n"] == lora["eval"]["arith"]["n"] == 6
    prompts = [[json.loads(line)["prompt"] for line in (out / run / "predictions" / "arith.jsonl").open()]
               for run in ("zero_shot", "lora")]
    assert prompts[0] == prompts[1]  # the same held-out problems
    table = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    for name, metrics in (("zero-shot", zero), ("LoRA", lora)):
        scores = metrics["eval"]["arith"]
        assert f"| {scores['accuracy']:.2f} ({scores['correct']}/6) |" in table[name]
    gain = lora["eval"]["arith"]["correct"] - zero["eval"]["arith"]["correct"]
    assert f"LoRA minus zero-shot: {gain:+d} of 6 problems" in result.stdout
