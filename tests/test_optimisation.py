"""The trainer's optimisation against a hand computation: the learning-rate schedule (linear or
cosine, with warm-up), gradient clipping by total norm, and AdamW with decoupled weight decay,
written out here from their definitions (Loshchilov and Hutter, 2019; HF's schedules), on the
same micro-batches in the same order. Tiny model, fp32, CPU."""

from __future__ import annotations

import math

import pytest
import torch

from adapters_lab.data.tokenize import PaddedCollator
from adapters_lab.data.batching import epoch_batches
from tests.train_helpers import PAD, run, tiny_lora_model, token_examples, trainable, trainer_cfg

BETAS, EPS = (0.9, 0.999), 1e-8


def scheduled_lr(kind: str, base: float, step: int, warmup: int, total: int) -> float:
    """The learning rate of update ``step`` (0-based): linear warm-up from 0, then linear decay to 0
    or a half cosine to 0."""
    if step < warmup:
        return base * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def reference_weights(cfg, examples, seed: int, clip: bool = True) -> dict[str, torch.Tensor]:
    """The adapter weights after ``cfg.max_steps`` updates, computed by hand."""
    torch.manual_seed(seed)
    model = tiny_lora_model(seed)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    collate = PaddedCollator(PAD)
    micro = epoch_batches(len(examples), cfg.micro_batch_size, seed, 0)
    per_step = cfg.batch_size // cfg.micro_batch_size
    for step in range(cfg.max_steps):
        group = micro[step * per_step : (step + 1) * per_step]
        for p in params.values():
            p.grad = None
        for indices in group:  # the step's loss: the mean of its micro-batches' mean token losses
            batch = collate([examples[i] for i in indices])
            (model(**batch, use_cache=False).loss / len(group)).backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        if clip and norm > cfg.max_grad_norm:
            grads = {n: g * (cfg.max_grad_norm / (norm + 1e-6)) for n, g in grads.items()}
        lr = scheduled_lr(cfg.schedule, cfg.lr, step, cfg.warmup_steps, cfg.max_steps)
        t = step + 1
        with torch.no_grad():
            for n, p in params.items():
                g = grads[n]
                p.mul_(1 - lr * cfg.weight_decay)
                m[n].mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
                v[n].mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
                m_hat, v_hat = m[n] / (1 - BETAS[0] ** t), v[n] / (1 - BETAS[1] ** t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + EPS))
    return {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_clipping_and_weight_decay_match_a_hand_computation(schedule):
    examples = token_examples(24, seed=2)  # 12 micro-batches of 2: the 6 steps stay in epoch 0
    cfg = trainer_cfg(max_steps=6, warmup_steps=2, schedule=schedule, weight_decay=0.1, max_grad_norm=0.05,
                      lr=2e-2)
    model, result = run(cfg, examples, seed=4)
    ours = trainable(model)
    expected = reference_weights(cfg, examples, seed=4)
    assert result.steps == 6 and ours.keys() == expected.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # the hand computation is sensitive to what it checks: without clipping it lands elsewhere
    unclipped = reference_weights(cfg, examples, seed=4, clip=False)
    assert max(float((unclipped[n] - ours[n]).abs().max()) for n in ours) > 1e-3


def test_the_schedule_shapes():
    assert [scheduled_lr("linear", 1.0, s, 2, 6) for s in range(6)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
    assert scheduled_lr("cosine", 1.0, 4, 2, 6) == pytest.approx(0.5)


class LrRecorder:
    def __init__(self):
        self.lrs = []

    def log(self, metrics, step=None):
        if "train/lr" in metrics:
            self.lrs.append(metrics["train/lr"])


def test_warmup_ratio_is_the_ceiling_of_its_share_of_the_steps():
    """trainer.warmup_ratio=0.25 of 6 steps: ceil(1.5) = 2 warm-up steps, as HF counts them; the
    logged learning rates and the weights are those of warmup_steps=2 computed by hand."""
    examples = token_examples(24, seed=2)
    cfg = trainer_cfg(max_steps=6, warmup_steps=100, warmup_ratio=0.25, log_every=1, lr=2e-2)
    recorder = LrRecorder()
    model, _ = run(cfg, examples, seed=4, tracker=recorder)
    # the rate after update k is the one update k+1 uses: warm-up 0, 1/2, then linear decay over 4 steps
    assert recorder.lrs == pytest.approx([2e-2 * x for x in (0.5, 1.0, 0.75, 0.5, 0.25, 0.0)], abs=1e-12)
    expected = reference_weights(trainer_cfg(max_steps=6, warmup_steps=2, lr=2e-2), examples, seed=4)
    for name, weight in trainable(model).items():
        torch.testing.assert_close(weight, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_warmup_longer_than_the_run_is_warned_with_the_numbers(caplog):
    examples = token_examples(16, seed=1)  # 8 micro-batches of 2, 2 per step: 4 steps an epoch
    with caplog.at_level("WARNING", logger="adapters_lab.training.schedule"):
        run(trainer_cfg(max_steps=-1, epochs=1, warmup_steps=5), examples)
    messages = [r.getMessage() for r in caplog.records if r.name == "adapters_lab.training.schedule"]
    assert any("trainer.warmup_steps=5" in m and "4 optimiser steps" in m and "peaks at 0.0075" in m
               and "trainer.lr=0.01" in m for m in messages), messages  # 0.01 * 3 / 4 on the last step
    assert any("trainer.epochs=1 gives 4 optimiser steps (8 micro-batches per epoch, 2 per step), fewer than the 5"
               in m for m in messages), messages
    caplog.clear()
    with caplog.at_level("WARNING", logger="adapters_lab.training.schedule"):
        run(trainer_cfg(max_steps=4, warmup_ratio=1.0), examples)
        run(trainer_cfg(max_steps=4, warmup_steps=3), examples)  # fits: no warning
    messages = [r.getMessage() for r in caplog.records if r.name == "adapters_lab.training.schedule"]
    assert len(messages) == 1 and "trainer.warmup_ratio=1.0 (4 steps)" in messages[0], messages
