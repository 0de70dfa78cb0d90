"""The FP8 frozen base (``model.base_precision=fp8``, training/speed/fp8.py): the FP8 linear against the
bf16 matmul within FP8's error (and measurably not equal to it), the GEMM layout CUDA requires, LoRA
gradients and a 20-step loss curve through an FP8 base against the bf16 base, restoring the exact bf16
weights, and the one-line refusals before any weight loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra.errors import ConfigCompositionException

from adapters_lab import pipeline
from adapters_lab.adapters.lora import LoRALinear
from adapters_lab.checks import SettingError
from adapters_lab.tracking import NullTracker
from adapters_lab.training.loop import train
from adapters_lab.training.metrics import flops_per_token
from adapters_lab.training.settings import check_trainer_config, make_accelerator, typed_trainer_config
from adapters_lab.training.speed import SpeedPaths
from adapters_lab.training.speed.fp8 import FP8Linear, apply_fp8_base, quantize_rows, restore_fp8_base
from tests.train_helpers import PAD, tiny_lora_model, token_examples, trainer_cfg

FP8_TOLERANCE = 0.06  # relative Frobenius error of an e4m3 GEMM (3 mantissa bits, per-row scales)
LORA_GRAD_TOLERANCE = 0.12  # a LoRA gradient through two FP8 decoder layers, against the bf16 base's
BF16_NOISE = 0.01  # the bf16 matmul's own error against fp32: the FP8 error must stand well above it


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


def tiny_bf16_lora_model(seed: int = 0, layers: int = 2, dora: bool = False) -> nn.Module:
    """A bf16 random LLaMA whose linear layers are all multiples of 16 (48 hidden, 80 MLP, 16-wide k/v
    heads), LoRA r=4 on q,k,v,up,down with non-zero B."""
    return tiny_lora_model(seed, layers=layers, intermediate=80, dtype=torch.bfloat16, dora=dora)


def linear_case(in_features=80, out_features=112, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 7, in_features, dtype=torch.bfloat16, requires_grad=True)  # leading shape (3, 7)
    grad_y = torch.randn(3, 7, out_features, dtype=torch.bfloat16)
    return layer, x, grad_y


def forward_backward(module, x, grad_y):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_y)
    return y, x.grad


def fp32_reference(layer, x, grad_y):
    w, b = layer.weight.float(), layer.bias.float() if layer.bias is not None else 0.0
    return x.detach().float() @ w.T + b, grad_y.float() @ w


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_output_and_input_gradient_are_within_fp8_error_of_the_matmul(bias):
    layer, x, grad_y = linear_case(bias=bias)
    want_y, want_gx = fp32_reference(layer, x, grad_y)
    y8, gx8 = forward_backward(FP8Linear(layer), x, grad_y)
    y16, gx16 = forward_backward(layer, x, grad_y)
    assert y8.shape == y16.shape == (3, 7, 112) and gx8.shape == (3, 7, 80)
    assert y8.dtype == gx8.dtype == torch.bfloat16
    errors = {"fp8 y": rel_error(y8, want_y), "fp8 grad_x": rel_error(gx8, want_gx),
              "bf16 y": rel_error(y16, want_y), "bf16 grad_x": rel_error(gx16, want_gx)}
    print("relative Frobenius errors against fp32:", {k: f"{v:.4f}" for k, v in errors.items()})
    assert errors["fp8 y"] < FP8_TOLERANCE and errors["fp8 grad_x"] < FP8_TOLERANCE
    # the bf16 layer (unquantized) is far closer: the FP8 path is really quantized, and this test can fail
    assert errors["bf16 y"] < BF16_NOISE and errors["bf16 grad_x"] < BF16_NOISE
    assert errors["fp8 y"] > 2 * errors["bf16 y"] and errors["fp8 grad_x"] > 2 * errors["bf16 grad_x"]


def test_a_wrong_weight_scale_is_caught():
    """The tolerance is tight enough to see a mistake in the scales (here the weight scale left out)."""
    layer, x, grad_y = linear_case()
    want_y, _ = fp32_reference(layer, x, grad_y)
    broken = FP8Linear(layer)
    broken.w_scale = broken.w_scale * 1.15
    y, _ = forward_backward(broken, x, grad_y)
    assert rel_error(y, want_y) > FP8_TOLERANCE


def gradient_error(fmt: torch.dtype, seed: int) -> float:
    """Relative error of grad_x with grad_y quantized to ``fmt`` (weights e4m3), heavy-tailed gradients."""
    layer, _, _ = linear_case(seed=seed)
    grad_y = (torch.randn(64, 112) * torch.distributions.StudentT(3.0).sample((64, 1))).to(torch.bfloat16)
    w_q, w_scale = quantize_rows(layer.weight)
    g_q, g_scale = quantize_rows(grad_y.float() * w_scale.view(1, -1), fmt)
    got = (g_q.float() * g_scale) @ w_q.float()
    return rel_error(got, grad_y.float() @ layer.weight.float())


def test_e4m3_gradients_lose_less_than_e5m2_with_per_row_scales():
    """Why grad_out is quantized to e4m3: per row, the range is covered and the extra mantissa bit wins."""
    e4m3 = sum(gradient_error(torch.float8_e4m3fn, s) for s in range(4)) / 4
    e5m2 = sum(gradient_error(torch.float8_e5m2, s) for s in range(4)) / 4
    print(f"grad_x relative error: e4m3 {e4m3:.4f}, e5m2 {e5m2:.4f}")
    assert e4m3 < FP8_TOLERANCE and e4m3 < 0.75 * e5m2


def test_the_gemms_take_cuda_s_layout(monkeypatch):
    """a row-major, b column-major, K and N multiples of 16, scales (M, 1) and (1, N) fp32, e4m3 operands."""
    calls = []
    real = torch._scaled_mm

    def strict(a, b, scale_a, scale_b, out_dtype):
        assert a.is_contiguous() and b.t().is_contiguous(), (a.stride(), b.stride())
        assert a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0
        assert scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, b.shape[1])
        assert scale_a.dtype == scale_b.dtype == torch.float32 and a.dtype == b.dtype == torch.float8_e4m3fn
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", strict)
    layer, x, grad_y = linear_case()
    forward_backward(FP8Linear(layer), x, grad_y)
    assert calls == [((21, 80), (80, 112)), ((21, 112), (112, 80))]


def test_shapes_that_are_not_multiples_of_16_are_refused_in_one_line():
    layer = nn.Linear(48, 76).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"^mlp.gate_proj is 48 -> 76 features; FP8 GEMMs \(torch._scaled_mm\) "
                                         r"need both multiples of 16$"):
        FP8Linear(layer, "mlp.gate_proj")


def lora_loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def lora_batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 24), generator=generator)
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def test_swap_covers_the_decoder_s_frozen_linears_and_restore_is_bit_exact():
    model = tiny_bf16_lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    flops = flops_per_token(model)
    swap = apply_fp8_base(model)
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8_names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert "model.layers.0.self_attn.q_proj.base_layer" in fp8_names and "model.layers.1.self_attn.o_proj" in fp8_names
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert all(type(m.lora_A) is nn.Linear for m in model.modules() if isinstance(m, LoRALinear))
    assert flops_per_token(model) == flops  # the FP8 layers still count their weights
    assert set(model.state_dict()) < set(before)  # no FP8 tensor in the state dict (checkpoints unchanged)
    assert restore_fp8_base(swap) == 14
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key].view(torch.uint8), value.view(torch.uint8)), key  # bit for bit
    assert all(model.get_submodule(n) is m for n, m in originals.items())  # the very same modules


def test_lora_gradients_through_the_fp8_base_are_close_to_the_bf16_base_s():
    model, batch = tiny_bf16_lora_model(), lora_batch()
    loss16, grads16 = lora_loss_and_grads(model, batch)
    swap = apply_fp8_base(model)
    loss8, grads8 = lora_loss_and_grads(model, batch)
    restore_fp8_base(swap)
    loss_again, grads_again = lora_loss_and_grads(model, batch)
    assert len(grads16) == 2 * 5 * 2  # A and B on q, k, v, up, down of two layers
    errors = {n: rel_error(grads8[n], g) for n, g in grads16.items()}
    worst = max(errors, key=errors.get)
    print(f"loss bf16 {loss16:.5f} fp8 {loss8:.5f}; worst LoRA gradient error {errors[worst]:.4f} ({worst})")
    assert abs(loss8 - loss16) < 0.01 * loss16 and loss8 != loss16
    # two layers of FP8 forwards and backwards compound: about 7% per tensor (one GEMM alone: 3.5%)
    assert errors[worst] < LORA_GRAD_TOLERANCE and sum(errors.values()) / len(errors) < 0.1
    flat8, flat16 = (torch.cat([g[n].flatten() for n in grads16]) for g in (grads8, grads16))
    assert torch.nn.functional.cosine_similarity(flat8, flat16, dim=0) > 0.995
    assert loss_again == loss16 and all(torch.equal(grads_again[n], g) for n, g in grads16.items())  # restored


def test_dora_layers_keep_their_bf16_base():
    """DoRA reads its base weight (the norm of W + sBA), so its base is not swapped; the other linears are."""
    model = tiny_bf16_lora_model(dora=True, layers=1)
    swap = apply_fp8_base(model)
    assert {type(m.base_layer) for m in model.modules() if isinstance(m, LoRALinear)} == {nn.Linear}
    assert len(swap.swapped) == 2  # o_proj and gate_proj, which carry no adapter
    lora_loss_and_grads(model, lora_batch())
    restore_fp8_base(swap)


def run_training(model, examples, cfg, base_precision: str):
    torch.manual_seed(0)
    return train(model, examples, [], PAD, check_trainer_config(cfg), make_accelerator(cfg), NullTracker(), 0,
                 base_precision=base_precision)


def test_twenty_steps_with_an_fp8_base_follow_the_bf16_curve():
    examples = token_examples(8, seed=3)  # memorised over 10 epochs: the loss has somewhere to go
    curves = {}
    for precision in ("bf16", "fp8"):
        model = tiny_bf16_lora_model(seed=1)
        before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
        result = run_training(model, examples, trainer_cfg(max_steps=20, lr=3e-2), base_precision=precision)
        curves[precision] = result.loss_history
        assert not any(isinstance(m, FP8Linear) for m in model.modules())  # restored after training
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    bf16, fp8 = curves["bf16"], curves["fp8"]
    print("bf16 losses", [round(v, 4) for v in bf16], "\nfp8 losses ", [round(v, 4) for v in fp8])
    assert len(fp8) == 20 and fp8 != bf16
    assert max(abs(a - b) for a, b in zip(fp8, bf16)) < 0.01 * bf16[0]
    assert sum(fp8[-5:]) / 5 < sum(fp8[:5]) / 5 - 0.05 * fp8[0]  # still learning


def grads_through(model, fused: bool, fp8: bool, seed: int = 5):
    """(loss, gradients) of one training forward with trainer.fused_lora and the FP8 base as asked."""
    speed = SpeedPaths(typed_trainer_config(trainer_cfg(fused_lora=fused)), torch.device("cpu"),
                       "fp8" if fp8 else "bf16").apply(model)
    model.train()
    swapped = sum(isinstance(m, FP8Linear) for m in model.modules())
    torch.manual_seed(seed)  # the fused op's dropout seeds
    result = lora_loss_and_grads(model, lora_batch())
    speed.restore(model)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.fused = False
    assert swapped == (14 if fp8 else 0)
    return result


def test_the_fused_lora_op_on_the_fp8_base_is_as_close_to_the_bf16_base_as_the_plain_layers_are():
    """Dropout 0: the fused op on an FP8 base against the plain layers on the bf16 base, within the same FP8
    tolerance as the plain layers on the FP8 base (the LoRA part's rounding differs between the two paths,
    and FP8 rounding downstream magnifies it: they are not equal to each other)."""
    model = tiny_bf16_lora_model()
    loss16, bf16 = grads_through(model, fused=False, fp8=False)
    for fused in (False, True):
        loss8, fp8 = grads_through(model, fused=fused, fp8=True)
        errors = [rel_error(fp8[n], g) for n, g in bf16.items()]
        assert abs(loss8 - loss16) < 0.01 * loss16
        assert max(errors) < LORA_GRAD_TOLERANCE and sum(errors) / len(errors) < 0.1, (fused, max(errors))


def test_the_fused_lora_op_with_dropout_on_the_fp8_base_follows_the_bf16_base():
    """Dropout 0.1 (the same seeded masks): LoRA gradients through the fused op on an FP8 base within the FP8
    tolerance of the fused op on the bf16 base; a different mask is much further off."""
    model = tiny_bf16_lora_model()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.dropout = 0.1
    _, bf16 = grads_through(model, fused=True, fp8=False)
    _, fp8 = grads_through(model, fused=True, fp8=True)
    _, other_mask = grads_through(model, fused=True, fp8=False, seed=6)
    errors = [rel_error(fp8[n], g) for n, g in bf16.items()]
    assert max(errors) < LORA_GRAD_TOLERANCE
    assert max(rel_error(other_mask[n], g) for n, g in bf16.items()) > 2 * max(errors)


@pytest.fixture
def no_weights(monkeypatch):
    monkeypatch.setattr(pipeline, "build_model", lambda *_: pytest.fail("model weights loaded before the check"))


BF16_80 = ["model.base_precision=fp8", "model.dtype=bfloat16", "model.tiny.intermediate_size=80"]


@pytest.mark.parametrize("overrides,message", [
    (["model.base_precision=fp8"], r"model.base_precision=fp8: model.dtype=float32 is not supported \(the FP8 GEMMs "
                                   r"give bf16; use bfloat16\)"),
    ([*BF16_80, "trainer.distributed=fsdp"], r"model.base_precision=fp8: trainer.distributed=fsdp is not supported"),
    (["model.base_precision=fp8", "model.dtype=bfloat16"],
     r"model.base_precision=fp8: model.layers.0.mlp.gate_proj is 48 -> 76 features; FP8 GEMMs "
     r"\(torch._scaled_mm\) need both multiples of 16"),
])
def test_combinations_that_cannot_work_fail_in_one_line_before_weights_load(make_cfg, no_weights, overrides, message):
    with pytest.raises(SettingError) as err:
        pipeline.run(make_cfg("model=tiny_llama", "adapter=lora", *overrides))
    assert "\n" not in str(err.value)
    assert err.match("^" + message)


def test_an_unknown_base_precision_fails_at_compose(make_cfg):
    with pytest.raises(ConfigCompositionException) as info:
        make_cfg("model.base_precision=fp4")
    assert "fp4" in str(info.value) + str(info.value.__cause__)
    assert make_cfg().model.base_precision == "bf16"


@pytest.mark.parametrize("fused", ["false", "true"])
def test_a_run_with_an_fp8_base_trains_and_evaluates_on_the_bf16_base(make_cfg, caplog, fused):
    cfg = make_cfg("model=tiny_llama", "adapter=lora", *BF16_80, f"trainer.fused_lora={fused}")
    with caplog.at_level("INFO", logger="adapters_lab.training.speed"):
        pipeline.run(cfg)
    assert "FP8 frozen base: 21 linear layers" in caplog.text  # 3 layers x (q, k, v, o, gate, up, down)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3 and all(v == v for v in metrics["train"]["loss_history"])
    assert metrics["eval"]


def test_compiled_decoder_layers_run_the_fp8_base_as_the_eager_ones_do():
    """trainer.compile traces the FP8 op (Inductor fuses the quantization), here under the fused LoRA op as the
    bench's ``ours_fp8`` runs it: the same losses within bf16 rounding."""
    examples = token_examples(8, seed=3)
    losses = {}
    for compiled in (False, True):
        model = tiny_bf16_lora_model(seed=1)
        cfg = trainer_cfg(max_steps=3, lr=3e-2, compile=compiled, fused_lora=True)
        losses[compiled] = run_training(model, examples, cfg, base_precision="fp8").loss_history
        assert not any(isinstance(m, FP8Linear) for m in model.modules())
    assert max(abs(a - b) for a, b in zip(losses[True], losses[False])) < 2e-3
