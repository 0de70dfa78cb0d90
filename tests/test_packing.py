"""Packed batching computes what padded batching computes: the same per-token losses, and no
attention across examples that share a row."""

from __future__ import annotations

import random

import pytest
import torch

from adapters_lab.data.batching import length_grouped_batches, packed_batches
from adapters_lab.data.tokenize import IGNORE_INDEX, PackedCollator, PaddedCollator, pack_rows
from adapters_lab.training.speed import forward_loss
from tests.train_helpers import PAD, VOCAB, tiny_lora_model, token_examples


def packed(examples, rows_of_indices, row_length):
    return PackedCollator(PAD, row_length)([[examples[i] for i in row] for row in rows_of_indices])


@pytest.mark.parametrize("fused", [False, True])
def test_packed_and_padded_give_the_same_loss(fused):
    model = tiny_lora_model(dropout=0.0).eval()
    examples = token_examples(7, seed=3)
    rows = pack_rows(list(range(7)), [len(x["input_ids"]) for x in examples], row_length=40)
    assert len(rows) > 1 and any(len(r) > 1 for r in rows)  # several examples share a row
    with torch.no_grad():
        padded_loss = forward_loss(model, PaddedCollator(PAD)(examples), fused=False)
        packed_loss = forward_loss(model, packed(examples, rows, 40), fused=fused)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)


def test_changing_one_example_leaves_the_others_logits_unchanged():
    model = tiny_lora_model().eval()
    examples = token_examples(3, seed=5, shortest=6, longest=9)
    changed = [dict(x) for x in examples]
    changed[1] = {"input_ids": [1] + [(t + 7) % (VOCAB - 3) + 3 for t in examples[1]["input_ids"][1:]],
                  "labels": examples[1]["labels"]}
    rows = [[0, 1, 2]]
    with torch.no_grad():
        first = packed(examples, rows, 32)
        second = packed(changed, rows, 32)
        kwargs = lambda b: {"input_ids": b["input_ids"], "position_ids": b["position_ids"], "use_cache": False}  # noqa: E731
        a, b = model(**kwargs(first)).logits[0], model(**kwargs(second)).logits[0]
    n0, n1, n2 = (len(x["input_ids"]) for x in examples)
    assert not torch.allclose(a[n0 : n0 + n1], b[n0 : n0 + n1])  # the changed example's own logits moved
    torch.testing.assert_close(a[:n0], b[:n0], rtol=0, atol=0)
    torch.testing.assert_close(a[n0 + n1 : n0 + n1 + n2], b[n0 + n1 : n0 + n1 + n2], rtol=0, atol=0)
    # ...and each packed example sees exactly what it sees alone.
    alone = model(input_ids=torch.tensor([examples[2]["input_ids"]]), use_cache=False).logits[0]
    torch.testing.assert_close(a[n0 + n1 : n0 + n1 + n2], alone, rtol=1e-5, atol=1e-5)


def test_packed_collator_masks_the_first_label_of_each_example():
    examples = token_examples(3, seed=1)
    batch = packed(examples, [[0, 1, 2]], 64)
    starts = [0, len(examples[0]["input_ids"]), len(examples[0]["input_ids"]) + len(examples[1]["input_ids"])]
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)
    assert batch["position_ids"][0, starts[1]] == 0 and batch["position_ids"][0, starts[2]] == 0
    end = starts[2] + len(examples[2]["input_ids"])
    assert (batch["labels"][0, end:] == IGNORE_INDEX).all() and (batch["input_ids"][0, end:] == PAD).all()


def test_pack_rows_places_every_example_once_within_the_row_length():
    rng = random.Random(0)
    for trial in range(20):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 200))]
        order = list(range(len(lengths)))
        rng.shuffle(order)
        rows = pack_rows(order, lengths, row_length=64, window=rng.choice([4, 32, 1024]))
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    with pytest.raises(ValueError, match="more than the packed row length 8"):
        pack_rows([0], [9], row_length=8)


def test_batch_plans_cover_each_example_once_per_epoch():
    lengths = [random.Random(i).randint(3, 40) for i in range(50)]
    grouped = length_grouped_batches(lengths, 4, seed=0, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(50))
    assert grouped != length_grouped_batches(lengths, 4, seed=0, epoch=1)
    plan = packed_batches(lengths, rows=3, row_length=64, seed=0, epoch=0)
    assert sorted(i for mb in plan for row in mb for i in row) == list(range(50))
    assert all(len(mb) <= 3 for mb in plan)


def test_flex_attention_on_packed_rows_gives_the_padded_sdpa_loss():
    """The fast recipe's attention (trainer.attn_implementation=flex_attention): block-sparse
    over the packed examples, the same loss as plain padded batches."""
    model = tiny_lora_model().eval()
    examples = token_examples(6, seed=8)
    rows = pack_rows(list(range(6)), [len(x["input_ids"]) for x in examples], row_length=48)
    with torch.no_grad():
        padded_loss = forward_loss(model, PaddedCollator(PAD)(examples), fused=False)
        model.set_attn_implementation("flex_attention")
        packed_loss = forward_loss(model, packed(examples, rows, 48), fused=True)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)


def test_padded_collator_gives_what_data_collator_for_seq2seq_gives():
    """PaddedCollator against transformers' collator with right padding to a multiple of 8."""
    from transformers import DataCollatorForSeq2Seq

    from adapters_lab.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "right"
    examples = token_examples(5, seed=4, shortest=3, longest=30)
    reference = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
                                       return_tensors="pt")([dict(x) for x in examples])
    ours = PaddedCollator(tokenizer.pad_token_id)(examples)
    assert ours.keys() == {"input_ids", "labels", "attention_mask"}
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key
    assert ours["input_ids"].shape[1] == 32
