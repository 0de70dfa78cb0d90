"""Each speed path of the trainer against the plain path: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch

from adapters_lab.data.tokenize import PackedCollator, PaddedCollator, pack_rows
from adapters_lab.kernels import chunked_causal_lm_loss, flops_per_token
from adapters_lab.train import enable_gradient_checkpointing, forward_loss, prepare_model
from tests.train_helpers import PAD, tiny_lora_model, token_examples, trainer_cfg


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
