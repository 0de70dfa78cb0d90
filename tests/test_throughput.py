"""The steady training rate: real tokens over the optimiser steps after the first ones, with the
time of validations and checkpoints left out (each of them timed on its own)."""

from __future__ import annotations

import time

import pytest
import torch

from adapters_lab.training import checkpoints as checkpoints_module
from adapters_lab.training import loop as loop_module
from adapters_lab.training.checkpoints import LoopState
from adapters_lab.training.metrics import Throughput
from tests.train_helpers import run, token_examples, trainer_cfg


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_steady_rate_counts_steps_after_the_first_two_and_leaves_pauses_out(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    loop = LoopState()
    meter = Throughput(loop, updates=6, resumed_from=None, flops=1, peak_tflops=None, world=1,
                       device=torch.device("cpu"))
    for step, (seconds, tokens, pause) in enumerate([(30.0, 50, 0.0), (1.0, 50, 0.0), (2.0, 100, 0.0),
                                                     (2.0, 100, 7.0), (4.0, 200, 0.0), (2.0, 100, 9.0)], 1):
        clock.now += seconds
        loop.step, loop.tokens = step, loop.tokens + tokens
        meter.step(loop, tokens)
        if pause:
            with meter.paused("checkpoint" if step == 4 else "validation"):
                clock.now += pause
    # steps 3-6: 500 tokens in 2 + 2 + 4 + 2 = 10 s; step 1 (compilation) and step 2 set the start;
    # the 7 s checkpoint after step 4 and the 9 s validation after step 6 are not steps.
    assert meter.steady_rate(loop) == pytest.approx(500 / 10.0)
    assert meter.pauses == {"checkpoint": [7.0], "validation": [9.0]}


def test_a_run_of_one_step_reports_its_whole_rate():
    loop = LoopState(step=1, tokens=40, seconds=2.0)
    meter = Throughput(loop, updates=1, resumed_from=None, flops=1, peak_tflops=None, world=1,
                       device=torch.device("cpu"))
    meter.step(loop, 40)
    assert meter.steady_rate(loop) == pytest.approx(20.0)


def test_slow_checkpoints_and_validations_are_timed_but_leave_the_steady_rate_alone(tmp_path, monkeypatch):
    """Each checkpoint takes 0.4 s more and each validation 0.3 s more: the result times every one
    of them (every 2 steps of 6, the end included) and its steady rate stays that of the steps."""
    save, validation = checkpoints_module.save_checkpoint, loop_module.validation_loss

    def slow_save(*args, **kwargs):
        time.sleep(0.4)
        return save(*args, **kwargs)

    def slow_validation(*args, **kwargs):
        time.sleep(0.3)
        return validation(*args, **kwargs)

    monkeypatch.setattr(checkpoints_module, "save_checkpoint", slow_save)
    monkeypatch.setattr(loop_module, "validation_loss", slow_validation)
    cfg = trainer_cfg(max_steps=6, checkpoint_every=2, eval_every=2)
    _, result = run(cfg, token_examples(24, seed=3), checkpoint_dir=tmp_path, val=token_examples(4, seed=4))
    assert len(result.checkpoint_seconds) == 3 and min(result.checkpoint_seconds) >= 0.4  # steps 2, 4, 6
    assert len(result.validation_seconds) == 3 and min(result.validation_seconds) >= 0.3  # steps 2, 4 and the end
    # Over the whole run the pauses dominate (1.1 s of them fall after step 2); the steady rate is the steps'.
    assert result.steady_tokens_per_second > 3 * result.tokens_per_second
