"""Trainer behaviour on CPU: determinism, the NaN policy, SIGTERM, batching modes, bad options."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

from adapters_lab.config import Select, TrainerConfig, TrainerConfigError
from adapters_lab.tracking import NullTracker
from adapters_lab.training import step as step_module
from adapters_lab.training.checkpoints import latest_checkpoint
from adapters_lab.training.loop import NonFiniteLossError
from adapters_lab.training.metrics import progress_postfix
from adapters_lab.training.settings import check_trainer_config
from tests.conftest import FAST, REPO
from tests.train_helpers import run, token_examples, trainable, trainer_cfg


def test_same_seed_same_loss_trajectory_and_weights():
    examples = token_examples(16, seed=0)
    cfg = trainer_cfg(max_steps=5)
    model_a, a = run(cfg, examples, seed=3, dropout=0.1)
    model_b, b = run(cfg, examples, seed=3, dropout=0.1)
    _, c = run(cfg, examples, seed=4, dropout=0.1)
    assert len(a.loss_history) == 5 and a.loss_history == b.loss_history
    assert a.loss_history != c.loss_history
    for name, value in trainable(model_a).items():
        assert torch.equal(value, trainable(model_b)[name]), name
    assert a.loss_history[-1] < a.loss_history[0]  # it learns


@pytest.mark.parametrize("batching", ["padded", "length_grouped", "packed"])
def test_every_batching_trains_on_real_tokens(batching):
    examples = token_examples(12, seed=1)
    _, result = run(trainer_cfg(max_steps=3, batching=batching, pack_length=48), examples)
    assert result.steps == 3 and all(math.isfinite(x) for x in result.loss_history)
    assert 0 < result.tokens <= result.padded_tokens
    if batching == "packed":
        assert result.padded_tokens == 3 * 2 * 2 * 48  # steps x accumulation x rows x row length


class PoisonAt:
    """Poisons the output head's logits on chosen forward calls, as an fp16 overflow would."""

    def __init__(self, model, calls):
        self.calls, self.count = set(calls), 0
        model.get_output_embeddings().register_forward_hook(self)

    def __call__(self, module, args, output):
        self.count += 1
        return output * float("nan") if self.count in self.calls else output


def test_nan_loss_stops_naming_the_step_after_saving_the_last_finite_state(tmp_path):
    from tests.train_helpers import tiny_lora_model

    model = tiny_lora_model()
    PoisonAt(model, calls={7})  # micro-batch 7 = step 4 (2 micro-batches a step)
    cfg = trainer_cfg(max_steps=6, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError) as err:
        run(cfg, token_examples(16), model=model, checkpoint_dir=tmp_path)
    message = str(err.value)
    assert "optimiser step 4" in message and "trainer.lr=0.01" in message and "fp16" in message and "padding" in message
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 3  # the last finite state
    saved = torch.load(latest_checkpoint(tmp_path) / "trainer_state.pt", weights_only=False)
    assert saved["loop"]["position"] == 6  # resumes at the batch that failed


def test_nan_policy_skip_drops_the_step_and_goes_on():
    from tests.train_helpers import tiny_lora_model

    model = tiny_lora_model()
    PoisonAt(model, calls={3})
    _, result = run(trainer_cfg(max_steps=4, nan_policy="skip"), token_examples(16), model=model)
    assert result.steps == 4 and result.skipped_steps == 1
    assert all(math.isfinite(x) for x in result.loss_history)
    assert all(torch.isfinite(p).all() for p in trainable(model).values())


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    class SendTerm:
        def log(self, metrics, step=None):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = trainer_cfg(max_steps=6, log_every=1)
    with pytest.raises(SystemExit) as exit_info:
        run(cfg, token_examples(16), checkpoint_dir=tmp_path, tracker=SendTerm())
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


@pytest.mark.parametrize("key, value, match", [
    ("pack_length", 12, "trainer.pack_length=12"),
    ("checkpoint_layers", -1, "trainer.checkpoint_layers=-1"),
    ("resume", "/no/such/folder", "trainer.resume='/no/such/folder'"),
    ("keep_checkpoints", 0, "trainer.keep_checkpoints=0"),
    ("peak_tflops", 0.0, "trainer.peak_tflops=0.0"),
    ("compile_mode", "reduce-overhead", "trainer.compile_mode='reduce-overhead'"),
    ("lr", 1e38, r"trainer.lr=1e\+38: too large; AdamW"),
    ("lr", float("nan"), "trainer.lr=nan"),
    ("warmup_ratio", 1.5, "trainer.warmup_ratio=1.5"),
])
def test_bad_trainer_options_name_the_key(key, value, match):
    with pytest.raises(TrainerConfigError, match=match.replace("[", r"\[")):
        check_trainer_config(TrainerConfig(**{key: value}))


def test_pack_length_shorter_than_an_example_is_refused():
    with pytest.raises(TrainerConfigError, match="trainer.pack_length=16: shorter than the longest"):
        run(trainer_cfg(batching="packed", pack_length=16), token_examples(8, longest=20, shortest=18))


def test_the_step_loss_is_read_once_before_the_last_backward(monkeypatch):
    """The step's one host sync comes after its last forward and before that micro-batch's
    backward, so on a GPU the host queues backward, the optimiser step and the next batch while the
    GPU runs them."""
    events = []
    read, backward = step_module.step_totals, Accelerator.backward
    monkeypatch.setattr(step_module, "step_totals", lambda *args: (events.append("read"), read(*args))[1])
    monkeypatch.setattr(Accelerator, "backward",
                        lambda self, loss, **kwargs: (events.append("backward"), backward(self, loss, **kwargs))[1])
    _, result = run(trainer_cfg(max_steps=2, batch_size=4, micro_batch_size=2), token_examples(8))
    assert events == ["backward", "read", "backward"] * 2
    assert len(result.loss_history) == 2


def test_padded_and_real_throughput_are_logged_and_shown():
    """With right-padded batches of uneven examples the model processes more tokens than are
    real: the logger, the progress bar and the result report both rates."""

    class Recorder(NullTracker):
        def __init__(self):
            self.logged = []

        def log(self, metrics, step=None):
            self.logged.append(dict(metrics))

    recorder = Recorder()
    _, result = run(trainer_cfg(max_steps=4, log_every=1), token_examples(16, seed=5), tracker=recorder)
    stats = [s for s in recorder.logged if "train/tokens_per_second" in s]
    assert len(stats) == 4
    last = stats[-1]
    assert last["train/padded_tokens_per_second"] > last["train/tokens_per_second"] > 0
    assert result.padded_tokens > result.tokens
    assert result.padded_tokens_per_second == pytest.approx(result.padded_tokens / result.seconds)
    postfix = progress_postfix(last)
    assert postfix["tok_s"] == f"{last['train/tokens_per_second']:,.0f}"
    assert postfix["padded_tok_s"] == f"{last['train/padded_tokens_per_second']:,.0f}"
    assert "mfu" not in postfix and "mem" not in postfix  # CPU: no peak rate or GPU memory known
    shown = progress_postfix({**last, "train/mfu": 0.614, "train/peak_memory_gib": 51.53})
    assert shown["mfu"] == "61%" and shown["mem"] == "51.5G"


def test_sigint_saves_a_checkpoint_and_resuming_gives_the_uninterrupted_weights(tmp_path):
    class SendInt(NullTracker):
        def log(self, metrics, step=None):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    examples, cfg = token_examples(16), trainer_cfg(max_steps=5, log_every=1, checkpoint_every=0)
    full_model, full = run(cfg, examples, seed=1, dropout=0.1)
    with pytest.raises(SystemExit) as exit_info:
        run(cfg, examples, seed=1, dropout=0.1, checkpoint_dir=tmp_path, tracker=SendInt())
    assert exit_info.value.code == 128 + signal.SIGINT
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    resumed_model, resumed = run(cfg, examples, seed=1, dropout=0.1, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 2 and resumed.loss_history == full.loss_history
    for name, value in trainable(full_model).items():
        assert torch.equal(value, trainable(resumed_model)[name]), name


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4314"),  # torch.save, disk full
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, failure):
    from adapters_lab.errors import USER_ERRORS
    from adapters_lab.training import checkpoints

    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(checkpoints.CheckpointWriteError) as err:
        run(trainer_cfg(max_steps=2, checkpoint_every=1), token_examples(8), checkpoint_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, USER_ERRORS)
    assert f"could not write {tmp_path / 'step-0000001'}" in message and "MiB free" in message
    assert "trainer.checkpoint_every" in message and str(failure).splitlines()[-1][:40] in message
    assert not (tmp_path / "latest.json").exists()  # nothing names the unfinished checkpoint


def test_the_run_log_holds_a_loss_line_every_log_every_steps(tmp_path):
    """Python logging (Hydra writes it to run.log and the console) carries the step, loss, learning
    rate, tokens/s and ETA every trainer.log_every steps, with the progress bar off."""
    command = [sys.executable, "run.py", "experiment=demo", *FAST, "trainer.max_steps=4", "trainer.log_every=2",
               "eval.max_new_tokens=2", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    pattern = r"step (\d)/4: loss \d+\.\d{4}, lr \S+, [\d,]+ tok/s, ETA (\S+)"
    lines = re.findall(pattern, (tmp_path / "run.log").read_text())
    assert [step for step, _ in lines] == ["2", "4"], lines
    assert lines[-1][1] == "00:00:00"  # nothing left at the last step
    assert re.findall(pattern, done.stdout + done.stderr) == lines  # and on the console


class ValRecorder(NullTracker):
    def __init__(self):
        self.val = {}

    def log(self, metrics, step=None):
        if "val/loss" in metrics:
            self.val[step] = metrics["val/loss"]


def test_select_best_val_ends_with_the_weights_of_the_lowest_validation_loss(tmp_path):
    """With a learning rate that overshoots, validation loss falls then rises; select=best_val ends
    with exactly the adapter weights checkpointed at the step of the lowest one (as upstream's
    load_best_model_at_end), and reports that step's validation loss."""
    from safetensors.torch import load_file

    examples, val = token_examples(16, seed=1), token_examples(6, seed=9)
    common = dict(max_steps=6, eval_every=1, lr=0.1, warmup_steps=0, checkpoint_every=1, keep_checkpoints=10)
    recorder = ValRecorder()
    last_model, last = run(trainer_cfg(**common), examples, val=val, checkpoint_dir=tmp_path / "last", tracker=recorder)
    best_step = min(recorder.val, key=recorder.val.get)
    assert 1 < best_step < 6, recorder.val  # the case is one where best and last differ
    assert last.selected_step == 6 and last.val_loss == recorder.val[6]
    best_model, best = run(trainer_cfg(**common, select="best_val"), examples, val=val, checkpoint_dir=tmp_path / "best")
    assert best.selected_step == best_step and best.val_loss == recorder.val[best_step]
    assert best.loss_history == last.loss_history  # the same training; only the weights it ends with differ
    saved = load_file(str(tmp_path / "last" / f"step-{best_step:07d}" / "adapter_model.safetensors"))
    for name, weight in trainable(best_model).items():
        assert torch.equal(weight, saved[name]), name
    assert any(not torch.equal(w, trainable(last_model)[n]) for n, w in trainable(best_model).items())


def test_select_best_val_survives_a_resume(tmp_path):
    class StopAt(NullTracker):
        def log(self, metrics, step=None):
            if step == 5:
                raise KeyboardInterrupt

    examples, val = token_examples(16, seed=1), token_examples(6, seed=9)
    cfg = trainer_cfg(max_steps=6, eval_every=1, lr=0.1, warmup_steps=0, checkpoint_every=1, select="best_val")
    full_model, full = run(cfg, examples, val=val)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, examples, val=val, checkpoint_dir=tmp_path, tracker=StopAt())
    resumed_model, resumed = run(cfg, examples, val=val, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 4 and resumed.selected_step == full.selected_step < 4
    for name, weight in trainable(full_model).items():
        assert torch.equal(weight, trainable(resumed_model)[name]), name


def test_select_best_val_needs_validation():
    with pytest.raises(TrainerConfigError, match="trainer.select=best_val: needs validation"):
        check_trainer_config(TrainerConfig(select="best_val", eval_every=0))
    with pytest.raises(TrainerConfigError, match=r"best_val: needs validation during training \(dataset.val_set_size=0,"):
        check_trainer_config(TrainerConfig(select="best_val"), val_set_size=0)
    assert check_trainer_config(TrainerConfig(select="best_val"), val_set_size=1).cfg.select == Select.best_val
