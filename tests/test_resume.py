"""Kill and resume: a run stopped mid-training and started again with the same output folder
ends with the same adapter weights and metrics as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters_lab.tracking import flatten
from tests.train_helpers import run, token_examples, trainable, trainer_cfg

REPO = Path(__file__).resolve().parents[1]


class StopAt:
    """Interrupts training (as a kill would) when the tracker is called at ``step``."""

    def __init__(self, step):
        self.step = step

    def log(self, metrics, step=None):
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, batching):
    examples, val = token_examples(14, seed=2), token_examples(4, seed=9)
    cfg = trainer_cfg(max_steps=9, checkpoint_every=2, log_every=1, eval_every=4, batching=batching, pack_length=48)
    model_full, full = run(cfg, examples, seed=5, val=val, dropout=0.1)
    with pytest.raises(KeyboardInterrupt):  # dies during step 5, after the step-4 checkpoint
        run(cfg, examples, seed=5, val=val, dropout=0.1, checkpoint_dir=tmp_path, tracker=StopAt(5))
    model_resumed, resumed = run(cfg, examples, seed=5, val=val, dropout=0.1, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 4
    assert resumed.loss_history == full.loss_history
    assert (resumed.loss_final, resumed.val_loss, resumed.tokens, resumed.epochs_completed) == (
        full.loss_final, full.val_loss, full.tokens, full.epochs_completed)
    for name, value in trainable(model_full).items():
        assert torch.equal(value, trainable(model_resumed)[name]), name
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000008", "step-0000009"]  # keep 2


def test_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path):
    from adapters_lab.config import TrainerConfigError

    examples = token_examples(8)
    run(trainer_cfg(max_steps=2, checkpoint_every=1), examples, checkpoint_dir=tmp_path)
    with pytest.raises(TrainerConfigError, match="micro_batch_size: 2 -> 4"):
        run(trainer_cfg(max_steps=2, micro_batch_size=4), examples, checkpoint_dir=tmp_path)
    (tmp_path / "step-0000050").mkdir()  # a later step of another run must not outlive this one's
    _, fresh = run(trainer_cfg(max_steps=2, micro_batch_size=4, resume="never", checkpoint_every=1), examples,
                   checkpoint_dir=tmp_path)
    assert fresh.resumed_from_step is None
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000001", "step-0000002"]


RUN = [sys.executable, "run.py", "experiment=demo", "trainer.device=cpu", "trainer.progress_bar=false",
       "trainer.max_steps=24", "trainer.checkpoint_every=4", "trainer.log_every=4", "trainer.eval_every=0",
       "trainer.batch_size=4", "trainer.micro_batch_size=2", "dataset.val_set_size=4", "trainer.lr=3e-3",
       "dataset.arith.num_train=48", "dataset.arith.num_test=2", "eval.max_new_tokens=4", "eval.num_beams=1",
       "logger=none", "model.tiny.num_hidden_layers=2"]


def launch(out: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*RUN, f"hydra.run.dir={out}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]


def outcome(out: Path) -> tuple[dict, dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_sigkill_mid_training_then_rerun_reaches_the_uninterrupted_result(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    finish(launch(reference))
    process = launch(killed)
    latest = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while not latest.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    if (killed / "metrics.json").exists():
        pytest.skip("the run finished before it could be killed (machine too fast for 24 steps)")
    assert json.loads(latest.read_text())["step"] < 24
    finish(launch(killed))  # same output folder: trainer.resume=auto picks up the checkpoint
    (expected, expected_weights), (got, got_weights) = outcome(reference), outcome(killed)
    assert got["train"]["resumed_from_step"] >= 4
    for key in ("loss_history", "loss_final", "val_loss", "tokens", "steps"):
        assert got["train"][key] == expected["train"][key], key
    timeless = lambda scores: {k: v for k, v in flatten(scores).items() if "second" not in k}  # noqa: E731
    assert timeless(got["eval"]) == timeless(expected["eval"])
    for name, tensor in expected_weights.items():
        assert torch.equal(tensor, got_weights[name]), name


def test_overwrite_redoes_training_instead_of_resuming_from_the_final_checkpoint(make_cfg):
    from adapters_lab import pipeline

    cfg = make_cfg("trainer.checkpoint_every=1", "dataset.arith.num_test=2", "eval.max_new_tokens=2")
    pipeline.run(cfg)
    out = Path(cfg.paths.output_dir)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3
    cfg.overwrite = True
    pipeline.run(cfg)
    train = json.loads((out / "metrics.json").read_text())["train"]
    assert train["resumed_from_step"] is None and train["steps"] == 3 and len(train["loss_history"]) == 3
