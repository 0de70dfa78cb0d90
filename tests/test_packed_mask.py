"""Flex attention's block mask for packed rows, built by the trainer (training/speed/packed_mask.py):
the same attention as transformers' own packed mask, without its host read of a device tensor."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.flex_attention as hf_flex
import transformers.masking_utils as masking_utils

from adapters_lab.data.batching import BatchPlan
from adapters_lab.training.speed import forward_loss
from adapters_lab.training.speed.packed_mask import document_ids, packed_block_mask, with_packed_block_mask
from tests.train_helpers import PAD, tiny_lora_model, token_examples, trainer_cfg


def eager_flex(query, key, value, training=False, **kwargs):
    """transformers compiles flex attention; its eager form runs the same maths on CPU (forward only)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(query, key, value, **kwargs)


def paper_batch(pack_length: int) -> dict:
    plan = BatchPlan(token_examples(70, seed=3), trainer_cfg(batch_size=16, micro_batch_size=4, max_steps=5,
                                                             batching="paper_packed", pack_length=pack_length), PAD, 0)
    return plan.batch(plan.epoch(0)[-1])[0]  # the short step: filler rows or tokens too


def test_document_ids_start_a_segment_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert document_ids(positions).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1]]


@pytest.mark.parametrize("pack_length", [40, 0])
def test_flex_with_the_trainers_mask_matches_sdpa_with_transformers_mask(monkeypatch, pack_length):
    batch = paper_batch(pack_length)
    model = tiny_lora_model(0).eval()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        reference = model(**inputs, use_cache=False).logits  # sdpa: transformers' block-diagonal mask
        monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager_flex)
        monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                            lambda *_: pytest.fail("transformers built the packed mask (a host read)"))
        model.set_attn_implementation("flex_attention")
        flex = model(**with_packed_block_mask(model, inputs), use_cache=False).logits
        loss = forward_loss(model, batch, fused=True)
    torch.testing.assert_close(flex, reference, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(loss)


def test_block_mask_only_for_flex_on_packed_batches():
    model = tiny_lora_model(0)
    packed = {"input_ids": torch.ones(1, 4, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 0, 1]])}
    assert with_packed_block_mask(model, packed) is packed  # sdpa: transformers' own mask
    model.set_attn_implementation("flex_attention")
    padded = {**packed, "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert with_packed_block_mask(model, padded) is padded
    mask = with_packed_block_mask(model, packed)["attention_mask"]
    dense = mask.to_dense()  # blocks of 128 (one here): the block is partly masked, so it is kept
    assert tuple(mask.shape) == (1, 1, 4, 4) and dense.sum() == 1
    assert packed_block_mask(torch.tensor([[0, 1, 0, 1]])).mask_mod(0, 0, torch.tensor(2), torch.tensor(1)) == 0
