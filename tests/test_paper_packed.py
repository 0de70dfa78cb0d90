"""trainer.batching=paper_packed: the padded recipe's optimiser steps (same seeded order, same
micro-batches, same loss weighting) computed as packed rows, one forward a step."""

from __future__ import annotations

import pytest
import torch

from adapters_lab.config import Batching
from adapters_lab.data.paper_packing import LOSS_WEIGHTS, PaperPackedCollator, example_weights, step_groups
from adapters_lab.data.tokenize import IGNORE_INDEX
from tests.train_helpers import PAD, run, tiny_lora_model, token_examples, trainable, trainer_cfg

# 70 examples in micro-batches of 4: 18 an epoch (the last of 2 examples), 5 steps of 4 (the last of 2):
# 20 steps cross three epoch ends with a short micro-batch and a short step.
RECIPE = dict(max_steps=20, batch_size=16, micro_batch_size=4, lr=1e-2, warmup_steps=3, max_grad_norm=1.0)


def count_forwards(model) -> list[int]:
    calls = [0]
    model.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("fused,pack_length", [(False, 0), (False, 24), (True, 40)])
def test_paper_packed_trains_what_padded_trains_over_20_steps(fused, pack_length):
    examples = token_examples(70, seed=3)
    padded_model = tiny_lora_model(0)
    padded_calls = count_forwards(padded_model)
    _, padded = run(trainer_cfg(**RECIPE, fused_loss=fused), examples, model=padded_model)
    packed_model = tiny_lora_model(0)
    packed_calls = count_forwards(packed_model)
    _, packed = run(trainer_cfg(**RECIPE, fused_loss=fused, batching="paper_packed", pack_length=pack_length),
                    examples, model=packed_model)
    assert packed.steps == padded.steps == 20
    torch.testing.assert_close(torch.tensor(packed.loss_history), torch.tensor(padded.loss_history),
                               rtol=1e-5, atol=1e-6)
    padded_weights, packed_weights = trainable(padded_model), trainable(packed_model)
    for name, weight in padded_weights.items():
        torch.testing.assert_close(packed_weights[name], weight, rtol=1e-4, atol=1e-6, msg=name)
    assert packed.tokens == padded.tokens and packed.padded_tokens < padded.padded_tokens
    assert padded_calls[0] == 18 * 20 // 5 and packed_calls[0] == 20  # 4, 4, 4, 4, 2 forwards a step vs one


def test_step_weights_make_the_mean_of_micro_batch_means():
    examples = token_examples(11, seed=5)
    micro = step_groups([list(range(i, min(i + 4, 11))) for i in range(0, 11, 4)], accumulation=4)
    assert len(micro) == 1 and [len(m) for m in micro[0]] == [4, 4, 3]
    step = [[examples[i] for i in m] for m in micro[0]]
    batch = PaperPackedCollator(PAD, row_length=40)(step)
    weights = batch[LOSS_WEIGHTS]
    assert weights.sum().item() == pytest.approx(1.0)  # each micro-batch's tokens weigh 1/3 in all
    assert torch.all((weights > 0) == (batch["labels"] != IGNORE_INDEX))
    per_example = example_weights(step)
    assert len(set(per_example[:4])) == 1 and per_example[0] != per_example[4]  # per micro-batch, not per token


def test_uniform_token_weights_would_not_match_the_padded_loss():
    """The equality above can fail: the mean over the step's tokens (transformers' Trainer today)
    differs from the mean of the micro-batch means on the same step."""
    from adapters_lab.training.speed.loss import weighted_causal_lm_loss

    model = tiny_lora_model(0)
    examples = token_examples(16, seed=3)
    step = [examples[i : i + 4] for i in range(0, 16, 4)]
    batch = PaperPackedCollator(PAD, row_length=0)(step)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        paper = weighted_causal_lm_loss(logits, batch["labels"], batch[LOSS_WEIGHTS])
        uniform = (batch[LOSS_WEIGHTS] > 0).float()
        token_mean = weighted_causal_lm_loss(logits, batch["labels"], uniform / uniform.sum())
        from adapters_lab.data.tokenize import PaddedCollator

        means = [model(**PaddedCollator(PAD)(m), use_cache=False).loss for m in step]
    assert paper.item() == pytest.approx(sum(m.item() for m in means) / 4, rel=1e-5)
    assert abs(token_mean.item() - paper.item()) > 1e-3


def test_prompt_tuning_refuses_paper_packed_and_prefix_tuning_takes_it(make_cfg):
    """Prompt tuning's virtual tokens are input positions; prefix tuning's are cache slots a packed row's
    mask shows to every example (tests/test_prefix_packed.py: the padded recipe's loss and weights)."""
    from adapters_lab.adapters import build_adapter
    from adapters_lab.adapters.base import AdapterConfigError

    adapter = build_adapter(make_cfg("adapter=prompt").adapter)
    with pytest.raises(AdapterConfigError, match="trainer.batching=paper_packed: prompt"):
        adapter.check_training(trainer_cfg(batching=Batching.paper_packed))
    build_adapter(make_cfg("adapter=prefix").adapter).check_training(trainer_cfg(batching=Batching.paper_packed))


def test_paper_packed_under_a_multi_process_launcher_fails_in_one_line_naming_the_key(monkeypatch):
    from adapters_lab.config import TrainerConfigError
    from adapters_lab.training.settings import check_trainer_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainerConfigError, match=r"^trainer.batching=paper_packed: runs in one process .*not 2;") as e:
        check_trainer_config(trainer_cfg(batching=Batching.paper_packed))
    assert "\n" not in str(e.value)
    assert check_trainer_config(trainer_cfg(batching=Batching.padded)).accumulation == 2  # padded runs under 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert check_trainer_config(trainer_cfg(batching=Batching.paper_packed)).accumulation == 1
