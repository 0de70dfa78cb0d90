"""Each speed path of the trainer against the plain path: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch

from adapters_lab.data.tokenize import PackedCollator, PaddedCollator, pack_rows
from adapters_lab.config import Batching, TrainerConfigError
from adapters_lab.data.batching import BatchPlan
from adapters_lab.training.metrics import flops_per_token
from adapters_lab.training.settings import resolve_device
from adapters_lab.training.speed import forward_loss, prepare_model
from adapters_lab.training.speed.layers import enable_gradient_checkpointing
from adapters_lab.training.speed.loss import chunked_causal_lm_loss
from adapters_lab.training.speed.varlen import (VARLEN_ATTENTION, check_varlen_supported, padded_position_ids,
                                                reference_varlen_attention, varlen_batch_kwargs, varlen_cu_seqlens)
from tests.train_helpers import PAD, run, tiny_lora_model, token_examples, trainer_cfg


def loss_and_grads(model, batch, fused=False):
    model.zero_grad(set_to_none=True)
    loss = forward_loss(model, batch, fused)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(first, second, tol=1e-5):
    torch.testing.assert_close(first[0], second[0], rtol=tol, atol=tol)
    assert first[1].keys() == second[1].keys()
    for name in first[1]:
        torch.testing.assert_close(first[1][name], second[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_loss_matches_full_logits_cross_entropy(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).double().requires_grad_(False)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100
    labels[2, 7] = -100
    reference = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    (expected,) = torch.autograd.grad(reference, hidden)
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk=chunk)
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


def test_fused_loss_gives_the_model_loss_and_gradients():
    model = tiny_lora_model()
    batch = PaddedCollator(PAD)(token_examples(4, seed=2))
    assert_same(loss_and_grads(model, batch, fused=False), loss_and_grads(model, batch, fused=True))


@pytest.mark.parametrize("layers", [None, 1])
def test_gradient_checkpointing_gives_the_same_gradients(layers):
    model = tiny_lora_model()
    batch = PaddedCollator(PAD)(token_examples(4, seed=4))
    plain = loss_and_grads(model, batch)
    assert enable_gradient_checkpointing(model, layers) == (2 if layers is None else 1)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, layers is None]
    assert_same(plain, loss_and_grads(model, batch))


def test_compiled_layers_give_the_same_loss_and_gradients():
    model = tiny_lora_model()
    examples = token_examples(5, seed=6)
    rows = pack_rows(list(range(5)), [len(x["input_ids"]) for x in examples], 48)
    batch = PackedCollator(PAD, 48)([[examples[i] for i in row] for row in rows])
    plain = loss_and_grads(model, batch, fused=True)
    prepare_model(model, trainer_cfg(compile=True, fused_loss=True))
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert_same(plain, loss_and_grads(model, batch, fused=True), tol=1e-4)


def test_flops_per_token_counts_frozen_and_trainable_matmuls():
    model = tiny_lora_model()
    h, i, kv, v, r, layers = 48, 76, 16, 97, 4, 2  # kv: 1 kv head of size 16
    frozen = layers * (h * h + 2 * h * kv + h * h + 3 * h * i) + h * v  # q k v o gate up down, head
    trainable = layers * (r * (h + h) + r * (h + kv) * 2 + r * (h + i) + r * (i + h))  # lora A+B on q k v up down
    assert flops_per_token(model) == 4 * frozen + 6 * trainable


# ---------------------------------------------------------------------------------------------
# trainer.attn_implementation=varlen: on the CPU the reference branch (dense block-diagonal mask)
# runs the same contract as the CUDA varlen kernel; it must equal the packed path.

def packed_batch(count=9, seed=6, row_length=48, rows=None):
    examples = token_examples(count, seed=seed)
    packed = pack_rows(list(range(count)), [len(x["input_ids"]) for x in examples], row_length)
    return PackedCollator(PAD, row_length)([[examples[i] for i in row] for row in packed[:rows]])


def with_varlen(batch, max_segment=24):  # token_examples are at most 20 tokens long
    return {**batch, **varlen_batch_kwargs(batch, max_segment)}


def test_cu_seqlens_of_a_hand_made_packed_batch():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3],
                              [0, 1, 2, 3, 4, 5, 0, 0, 1]])
    assert varlen_cu_seqlens(positions).tolist() == [0, 3, 5, 9, 15, 16, 18]
    assert varlen_cu_seqlens(positions).dtype == torch.int32
    # segments longer than max_segment (fillers) are cut; shorter ones stay whole
    assert varlen_cu_seqlens(positions, max_segment=4).tolist() == [0, 3, 5, 9, 13, 15, 16, 18]
    assert varlen_cu_seqlens(positions, max_segment=2).tolist() == [0, 2, 3, 5, 7, 9, 11, 13, 15, 16, 18]
    # a row always starts a segment, even when its positions continue the previous row
    assert varlen_cu_seqlens(torch.tensor([[0, 1, 2], [3, 4, 5]])).tolist() == [0, 3, 6]
    # right padding is a segment of its own
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert padded_position_ids(mask).tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert varlen_cu_seqlens(padded_position_ids(mask)).tolist() == [0, 3, 4, 8]
    with pytest.raises(ValueError, match="right-padded"):
        padded_position_ids(torch.tensor([[0, 1, 1]]))


def test_cu_seqlens_of_collated_rows_match_the_examples():
    examples = token_examples(9, seed=6)
    lengths = [len(x["input_ids"]) for x in examples]
    rows = pack_rows(list(range(9)), lengths, 48)
    batch = PackedCollator(PAD, 48)([[examples[i] for i in row] for row in rows])
    expected, at = [0], 0
    for row in rows:
        for i in row:
            at += lengths[i]
            expected.append(at)
        filler = 48 - sum(lengths[i] for i in row)
        while filler > 0:  # the filler, cut at max_segment=24
            at += min(filler, 24)
            filler -= 24
            expected.append(at)
    assert varlen_cu_seqlens(batch["position_ids"], 24).tolist() == expected


def test_reference_varlen_attention_is_causal_attention_per_segment():
    torch.manual_seed(0)
    q, k, v = (torch.randn(10, 2, 8, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 4, 5, 10], dtype=torch.int32)
    out = reference_varlen_attention(q, k, v, cu, scale=0.3)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            is_causal=True, scale=0.3).transpose(0, 1)
        torch.testing.assert_close(out[start:end], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
def test_varlen_gives_the_packed_loss_and_gradients(fused):
    model = tiny_lora_model()  # 3 query heads, 1 key/value head: the grouped-query branch too
    batch = packed_batch()
    plain = loss_and_grads(model, batch, fused=fused)  # SDPA with the position-id block-diagonal mask
    prepare_model(model, trainer_cfg(attn_implementation="varlen", fused_loss=fused))
    assert model.config._attn_implementation == VARLEN_ATTENTION
    assert_same(plain, loss_and_grads(model, with_varlen(batch), fused=fused))
    assert_same(plain, loss_and_grads(model, with_varlen(batch, max_segment=48), fused=fused))  # no cut


def test_varlen_without_its_batch_entries_is_refused():
    model = tiny_lora_model()
    prepare_model(model, trainer_cfg(attn_implementation="varlen"))
    with pytest.raises(ValueError, match="varlen_cu_seqlens"):
        forward_loss(model, packed_batch(), fused=False)


def test_compiled_varlen_layers_compile_once_for_any_segment_count():
    from torch._dynamo.utils import counters

    model = tiny_lora_model()
    batches = [with_varlen(packed_batch(seed=s, rows=2)) for s in range(4)]
    assert len({b["varlen_cu_seqlens"].numel() for b in batches}) > 1  # the segment count changes
    prepare_model(model, trainer_cfg(attn_implementation="varlen", fused_loss=True))
    eager = [loss_and_grads(model, b, fused=True) for b in batches]
    torch._dynamo.reset()
    counters.clear()
    prepare_model(model, trainer_cfg(attn_implementation="varlen", fused_loss=True, compile=True))
    for batch, expected in zip(batches, eager):
        assert_same(expected, loss_and_grads(model, batch, fused=True), tol=1e-4)
    # two graphs (the first layer's input needs no gradient, the second's does), none per batch
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_training_with_varlen_matches_the_default_attention(batching):
    examples, val = token_examples(24, seed=8), token_examples(5, seed=9)
    common = dict(batching=batching, pack_length=48 if batching == "packed" else 0, fused_loss=True, eval_every=3)
    _, plain = run(trainer_cfg(**common), examples, val=val)
    model, fast = run(trainer_cfg(attn_implementation="varlen", **common), examples, val=val)
    torch.testing.assert_close(fast.loss_history, plain.loss_history, rtol=1e-5, atol=1e-5)
    assert fast.val_loss == pytest.approx(plain.val_loss, rel=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored after training


def test_batch_plan_adds_the_segments_on_the_cpu():
    examples = token_examples(30, seed=1)
    plan = BatchPlan(examples, trainer_cfg(batching=Batching.packed, pack_length=64, attn_implementation="varlen"), PAD, 0,
                     extras=varlen_batch_kwargs)
    batch, _ = plan.batch(plan.epoch(0)[0])
    assert batch["varlen_max_seqlen"] == plan.max_segment == 24  # longest example (20) rounded up to 8
    cu = batch["varlen_cu_seqlens"]
    assert cu.device.type == "cpu" and cu.dtype == torch.int32 and cu[-1] == batch["input_ids"].numel()
    assert int((cu[1:] - cu[:-1]).max()) <= plan.max_segment


def test_varlen_on_a_gpu_without_the_kernel_is_refused(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # import fails as on torch < 2.10
    assert "varlen_attn" in check_varlen_supported(torch.device("cuda"))
    assert check_varlen_supported(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(TrainerConfigError, match="trainer.attn_implementation=varlen"):
        cfg = trainer_cfg(attn_implementation="varlen", device="auto")
        prepare_model(tiny_lora_model(), cfg, resolve_device(cfg.device))


def _fake_kernels():
    """Stand-ins with the signatures of torch's varlen_attn (torch 2.10: is_causal, no scale; later:
    window_size and scale) that record their call and compute the reference."""
    calls = []

    def newer(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        calls.append(dict(window_size=window_size, scale=scale, max_q=max_q, max_k=max_k, same_cu=cu_seq_q is cu_seq_k))
        assert window_size == (-1, 0)  # causal
        return reference_varlen_attention(query, key, value, cu_seq_q, scale)

    def older(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        calls.append(dict(is_causal=is_causal, max_q=max_q, max_k=max_k, same_cu=cu_seq_q is cu_seq_k))
        assert is_causal
        return reference_varlen_attention(query, key, value, cu_seq_q, None)  # 1/sqrt(dim)

    return calls, newer, older


@pytest.mark.parametrize("version", ["newer", "older"])
def test_cuda_branch_calls_the_kernel_of_either_torch_signature(monkeypatch, version):
    """The CUDA-only kernel cannot run here: the glue around it (causal flag, scale, the shared
    cu_seqlens, max_seqlen) is checked against stand-ins with torch's two signatures."""
    import torch.nn.attention.varlen as torch_varlen

    from adapters_lab.training.speed import varlen as kernels

    calls, newer, older = _fake_kernels()
    monkeypatch.setattr(torch_varlen, "varlen_attn", newer if version == "newer" else older)
    monkeypatch.setattr(kernels, "_CUDA_VARLEN", {})
    assert check_varlen_supported(torch.device("cuda")) is None
    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    expected = reference_varlen_attention(q, k, v, cu, scale=0.2)
    out = kernels._cuda_varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, 8, 0.2)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    assert calls[0]["max_q"] == calls[0]["max_k"] == 8 and calls[0]["same_cu"]
    with pytest.raises(RuntimeError, match="bf16 or fp16"):
        kernels._cuda_varlen_attention(q, k, v, cu, 8, 0.2)
