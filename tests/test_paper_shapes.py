"""trainer.batching=paper_packed keeps one batch shape for a whole run, so compiled decoder layers
and flex attention's block mask are built once: filler rows or tokens (pad ids, no labels, weight 0)
bring every step to the largest shape any step of the run's seeded epochs needs."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import adapters_lab.training.speed as speed
from adapters_lab.data.batching import BatchPlan
from adapters_lab.data.paper_packing import LOSS_WEIGHTS
from adapters_lab.data.tokenize import IGNORE_INDEX, pack_rows
from adapters_lab.training.speed.layers import decoder_layers
from tests.train_helpers import PAD, run, token_examples, trainer_cfg

# 70 examples, micro-batches of 4, steps of 16: 5 steps an epoch, the last of 2 micro-batches.
RECIPE = dict(batch_size=16, micro_batch_size=4, batching="paper_packed")


def epoch_shapes(plan: BatchPlan, epochs: int) -> list[tuple[int, ...]]:
    return [tuple(plan.batch(step)[0]["input_ids"].shape) for e in range(epochs) for step in plan.epoch(e)]


@pytest.mark.parametrize("pack_length", [24, 40, 0])
def test_every_step_of_a_run_has_one_shape(pack_length):
    examples = token_examples(70, seed=3)
    plan = BatchPlan(examples, trainer_cfg(**RECIPE, max_steps=20, pack_length=pack_length), PAD, seed=0)
    assert len(set(epoch_shapes(plan, 4))) == 1  # 4 epochs: the 20 steps, short steps included
    rows, length = plan.paper_step_shape()
    assert epoch_shapes(plan, 1)[0] == (rows, length)
    if pack_length:
        assert length == pack_length
    else:
        assert rows == 1 and length == -(-max(sum(len(examples[i]["input_ids"]) for m in step for i in m)
                                              for e in range(4) for step in plan.epoch(e)) // 8) * 8


def test_filler_carries_no_weight_and_is_a_segment_of_its_own():
    examples = token_examples(70, seed=3)
    for pack_length in (24, 0):
        plan = BatchPlan(examples, trainer_cfg(**RECIPE, max_steps=20, pack_length=pack_length), PAD, seed=0)
        last = plan.epoch(0)[-1]  # the short step (2 micro-batches): the most filler
        batch, real = plan.batch(last)
        weights, labels, positions = batch[LOSS_WEIGHTS], batch["labels"], batch["position_ids"]
        assert weights.sum().item() == pytest.approx(1.0)
        assert torch.all((weights > 0) == (labels != IGNORE_INDEX))
        assert batch["input_ids"].numel() > real  # there is filler
        for r in range(positions.shape[0]):  # real tokens first, then filler from position 0 (a new segment)
            ids = batch["input_ids"][r]
            used = int((labels[r] != IGNORE_INDEX).nonzero().max()) + 1 if (labels[r] != IGNORE_INDEX).any() else 0
            tail = positions[r, used:]
            assert torch.all(ids[used:][tail > 0] == PAD) or used == 0 or tail.numel() == 0
        empty = [r for r in range(positions.shape[0]) if not (labels[r] != IGNORE_INDEX).any()]
        for r in empty:  # a filler row: pad ids, positions 0.. (attends only to itself)
            assert torch.all(batch["input_ids"][r] == PAD) and positions[r].tolist() == list(range(positions.shape[1]))
        if pack_length:
            assert empty, "the short step should get filler rows"


def counting_compile(counter: CompileCounter):
    def compile_layers(model, mode="default"):
        for layer in decoder_layers(model):
            layer.compile(backend=counter)
        return len(decoder_layers(model))
    return compile_layers


def test_compiled_layers_compile_once_over_a_run(monkeypatch):
    """Over 12 steps whose examples pack into different row counts, the layers (compiled with a
    counting backend, on CPU) compile their graph once, not again when a step needs fewer rows."""
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(speed, "compile_decoder_layers", counting_compile(counter))
    examples = token_examples(70, seed=3)
    cfg = trainer_cfg(**RECIPE, max_steps=12, pack_length=24, compile=True, fused_loss=True)
    steps = [[len(examples[i]["input_ids"]) for m in step for i in m] for step in BatchPlan(examples, cfg, PAD, 0).epoch(0)]
    assert len({len(pack_rows(list(range(len(ls))), ls, 24)) for ls in steps}) > 1  # the steps themselves need different row counts
    _, result = run(cfg, examples)
    torch._dynamo.reset()
    assert result.steps == 12
    # two graphs for the whole run: the first layer's (its input, the frozen embedding, needs no
    # gradient) and the one the second layer reuses; a new row count would add two more
    assert counter.frame_count == 2
