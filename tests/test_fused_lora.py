"""trainer.fused_lora against the plain LoRA path: same outputs and gradients (with the same
dropout mask), and the CUDA dropout kernel under Triton's CPU interpreter."""

from __future__ import annotations

import pytest
import torch

from adapters_lab.adapters.lora import LoRALinear, enable_fused_lora
from adapters_lab.data.tokenize import PackedCollator, PaddedCollator, pack_rows
from adapters_lab.training.speed import prepare_model
from adapters_lab.training.speed.fused_lora import cpu_keep_mask
from adapters_lab.training.speed.layers import enable_gradient_checkpointing
from tests.test_train_fast import assert_same, loss_and_grads
from tests.train_helpers import run, tiny_lora_model, token_examples, trainable, trainer_cfg
from tests.triton_interpreter import needs_triton, run_interpreted


def lora_layer(bias: bool, dropout: float, dtype=torch.float32) -> LoRALinear:
    torch.manual_seed(0)
    base = torch.nn.Linear(13, 11, bias=bias).to(dtype).requires_grad_(False)
    layer = LoRALinear(base, rank=3, alpha=6.0, dropout=dropout, use_rslora=False)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.3)
    return layer


def outputs_and_grads(layer: LoRALinear, x: torch.Tensor, seed: int, autocast: bool = False):
    """Output and gradients (input, A, B) of ``layer`` on ``x``; the global RNG is seeded first,
    so the fused op draws its dropout seed as ``dropout_seed(seed)`` says."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


def dropout_seed(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, 2**31 - 1, (1,))


class MaskDropout(torch.nn.Module):
    """nn.Dropout with a given mask: the plain path with the fused op's mask."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return torch.where(self.keep.reshape(x.shape), x / (1 - self.p), 0.0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_layer_equals_the_plain_layer_with_its_mask(bias, dropout):
    x = torch.randn(2, 5, 13)
    layer = lora_layer(bias, dropout)
    layer.fused = True
    fused = outputs_and_grads(layer, x, seed=7)
    layer.fused = False
    if dropout:
        layer.lora_dropout = MaskDropout(cpu_keep_mask(torch.Size([10, 13]), dropout_seed(7), dropout), dropout)
    plain = outputs_and_grads(layer, x, seed=7)
    for name, a, b in zip(("output", "input grad", "A grad", "B grad"), fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    if dropout:  # the mask dropped something, so a wrong mask in backward would show
        assert not bool(cpu_keep_mask(torch.Size([10, 13]), dropout_seed(7), dropout).all())


def test_fused_layer_under_autocast_keeps_fp32_adapter_grads_and_matches_plain():
    x = torch.randn(3, 4, 13)
    layer = lora_layer(True, 0.0)
    layer.fused = True
    fused = outputs_and_grads(layer, x, seed=1, autocast=True)
    layer.fused = False
    plain = outputs_and_grads(layer, x, seed=1, autocast=True)
    assert fused[0].dtype == plain[0].dtype == torch.bfloat16
    assert fused[2].dtype == fused[3].dtype == torch.float32
    for name, a, b in zip(("output", "input grad", "A grad", "B grad"), fused, plain):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


def test_fused_path_is_for_training_only_and_dropout_draws_fresh_masks():
    layer = lora_layer(False, 0.5)
    layer.fused = True
    x = torch.randn(4, 13)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # a new seed per call


def test_enable_fused_lora_covers_every_plain_lora_layer():
    model = tiny_lora_model()
    assert enable_fused_lora(model) == 2 * 5
    dora = LoRALinear(torch.nn.Linear(8, 8).requires_grad_(False), 2, 4.0, 0.0, False, use_dora=True)
    assert enable_fused_lora(torch.nn.Sequential(dora)) == 0


def test_training_with_fused_lora_reaches_the_plain_weights():
    examples = token_examples(8, seed=3)
    plain_model, plain = run(trainer_cfg(), examples)
    fused_model, fused = run(trainer_cfg(fused_lora=True), examples)
    assert all(m.fused for m in fused_model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(fused.loss_history, plain.loss_history, rtol=1e-5, atol=1e-5)
    for name, weight in trainable(plain_model).items():
        torch.testing.assert_close(trainable(fused_model)[name], weight, rtol=1e-5, atol=1e-5, msg=name)


def test_compiled_layers_with_fused_lora_give_the_plain_loss_and_gradients():
    model = tiny_lora_model()
    examples = token_examples(5, seed=6)
    rows = pack_rows(list(range(5)), [len(x["input_ids"]) for x in examples], 48)
    batch = PackedCollator(0, 48)([[examples[i] for i in row] for row in rows])
    plain = loss_and_grads(model, batch, fused=True)
    prepare_model(model, trainer_cfg(compile=True, fused_loss=True, fused_lora=True))
    assert_same(plain, loss_and_grads(model, batch, fused=True), tol=1e-4)


KERNEL_CHECK = """
import torch
from adapters_lab.training.speed.fused_lora import triton_seeded_dropout
x = torch.randn(3, 5000) + 3.0  # no zeros, so a zero is a dropped element
seed = torch.tensor([11])
out = triton_seeded_dropout(x, seed, 0.25)
keep = out != 0
assert torch.equal(triton_seeded_dropout(x, seed, 0.25), out), "same seed, same mask"
assert not torch.equal(triton_seeded_dropout(x, torch.tensor([12]), 0.25) != 0, keep), "new seed, new mask"
torch.testing.assert_close(out[keep], x[keep] / 0.75)
rate = keep.float().mean().item()
assert abs(rate - 0.75) < 0.015, rate
slices = keep.reshape(-1)[: 4 * 1024].reshape(4, 1024).float()  # the four uniforms of one Philox call
assert (slices[0] != slices[1]).any() and (slices[2] != slices[3]).any()
acc = torch.randn(3, 5000)
expected = acc + out
triton_seeded_dropout(x, seed, 0.25, out=acc)
torch.testing.assert_close(acc, expected)
print("kernel ok", rate)
"""


@needs_triton
def test_cuda_dropout_kernel_under_the_triton_interpreter():
    run_interpreted(KERNEL_CHECK, "kernel ok")


def test_gradient_checkpointing_recomputes_the_fused_layers_with_their_masks():
    """Recomputed layers draw their dropout seeds again: checkpointing restores the RNG state, so
    they draw the same masks and the gradients are those of the run without checkpointing."""
    batch = PaddedCollator(0)(token_examples(4, seed=5))
    results = []
    for checkpointing in (False, True):
        model = tiny_lora_model(dropout=0.3)
        enable_fused_lora(model)
        if checkpointing:
            enable_gradient_checkpointing(model, None)
        model.train()
        torch.manual_seed(3)
        results.append(loss_and_grads(model, batch))
    assert_same(results[0], results[1], tol=1e-6)
    torch.manual_seed(4)  # another draw of the masks gives other gradients: the check can fail
    other = loss_and_grads(model, batch)
    assert not torch.allclose(other[1]["model.layers.0.self_attn.q_proj.lora_A.weight"],
                              results[1][1]["model.layers.0.self_attn.q_proj.lora_A.weight"])
