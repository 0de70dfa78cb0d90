"""The frozen base in FP8 for training (``model.base_precision=fp8``): every frozen linear layer of the
decoder runs its matmuls through ``torch._scaled_mm`` on float8 operands; the adapter and the loss keep
their own precision.

- Weights are quantized once to ``float8_e4m3fn`` with one fp32 scale per output channel
  (``amax / 448``), kept in two layouts: (out, in) row-major for the forward GEMM's ``b`` operand
  (``w_q.t()`` is column-major, as ``_scaled_mm`` wants ``b``) and its transpose for the backward's.
- Forward: the input is quantized per row (per token) to e4m3 with its own scale;
  ``y = _scaled_mm(x_q, w_q.t(), scale_a=(M, 1), scale_b=(1, N), out_dtype=bf16) + bias``.
- Backward: the input gradient only (the weights are frozen, no weight gradient is formed). The weight's
  per-output-channel scale lies along the contraction dimension there, so it is folded into
  ``grad_out`` before that is quantized per row; ``grad_out`` is quantized to e4m3 too, not e5m2: with a
  scale per row the range is not the limit, the mantissa is (e4m3 gave about half e5m2's error on
  the CPU, tests/test_fp8.py). Nothing of the input is kept for backward.
- ``_scaled_mm`` needs both GEMM dimensions of the weight (in and out features) to be multiples of 16;
  a layer that is not is refused by name (``fp8_shape_refusal``), before weights load where the model's
  skeleton is checked (``checks.py``).

``apply_fp8_base`` swaps the layers in and returns what ``restore_fp8_base`` needs to put the very
same ``nn.Linear`` modules (their bf16 weights untouched) back after training, so evaluation, merging
and the saved adapter see the original base. Under ``trainer.fused_lora`` the fused LoRA op calls the FP8
base and adds its update (``fused_lora._LoRAUpdateFunction``); DoRA layers keep their bf16 base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
GEMM_MULTIPLE = 16  # _scaled_mm: the weight's both dimensions (the GEMMs' K and N) multiples of 16
MIN_SCALE = 1e-12  # an all-zero row quantizes to zeros instead of dividing by zero


def quantize_rows(t: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with ``t ~= q * scale``: ``t`` 2-D, one fp32 scale per row (shape (rows, 1)) mapping
    the row's largest magnitude to the format's largest value."""
    largest = torch.finfo(dtype).max
    scale = (t.abs().amax(dim=1, keepdim=True).float() / largest).clamp_min(MIN_SCALE)
    q = (t.float() / scale).clamp(-largest, largest).to(dtype)
    return q, scale


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
    """``(a_q * a_scale) @ (b_q * b_scale)`` for row-major ``a_q`` (M, K) and column-major ``b_q``
    (K, N), scales (M, 1) and (1, N) fp32: the layout ``_scaled_mm`` takes on CUDA."""
    return torch._scaled_mm(a_q, b_q, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)


class _FP8LinearFunction(torch.autograd.Function):
    """``y = x W^T (+ b)`` for 2-D ``x`` with ``W = w_q * w_scale`` frozen in FP8; the input gradient only."""

    @staticmethod
    def forward(ctx, x, w_q, w_q_t, w_scale, ones_in, bias, out_dtype: torch.dtype):
        x_q, x_scale = quantize_rows(x)
        y = fp8_gemm(x_q, x_scale, w_q.t(), w_scale.view(1, -1), out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(w_q_t, w_scale, ones_in)
        ctx.out_dtype = out_dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        w_q_t, w_scale, ones_in = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            # grad_x = grad_y @ (w_q * w_scale): the per-output-channel scale folded into grad_y's columns
            g_q, g_scale = quantize_rows(grad_y.float() * w_scale.view(1, -1))
            grad_x = fp8_gemm(g_q, g_scale, w_q_t.t(), ones_in, ctx.out_dtype)
        return grad_x, None, None, None, None, None, None


def fp8_shape_reason(name: str, in_features: int, out_features: int) -> str | None:
    """Why an (in, out) layer cannot take the FP8 GEMMs, or None."""
    if in_features % GEMM_MULTIPLE or out_features % GEMM_MULTIPLE:
        return (f"{name} is {in_features} -> {out_features} features; FP8 GEMMs (torch._scaled_mm) need both "
                f"multiples of {GEMM_MULTIPLE}")
    return None


class FP8Linear(nn.Module):
    """A frozen ``nn.Linear`` with its weight in FP8 (per-output-channel scales); ``base`` itself is not
    kept here (``apply_fp8_base`` keeps it for restoring). The FP8 tensors are plain attributes, not
    parameters or buffers: no state dict, checkpoint or DDP buffer broadcast sees them."""

    def __init__(self, base: nn.Linear, name: str = "layer", out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        reason = fp8_shape_reason(name, base.in_features, base.out_features)
        if reason:
            raise ValueError(reason)
        self.in_features, self.out_features, self.out_dtype = base.in_features, base.out_features, out_dtype
        with torch.no_grad():
            w_q, scale = quantize_rows(base.weight.detach())
        self.w_q = w_q  # (out, in) row-major: w_q.t() is the forward's column-major b
        self.w_q_t = w_q.t().contiguous()  # (in, out) row-major: w_q_t.t() is the backward's column-major b
        self.w_scale = scale.view(-1)  # (out,) fp32
        self.ones_in = torch.ones(1, base.in_features, dtype=torch.float32, device=w_q.device)
        self.bias = base.bias  # shared with the base layer, frozen

    @property
    def frozen_weight_numel(self) -> int:
        """The weight's size, for the FLOP count (``metrics.matmul_weights``)."""
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            y = _FP8LinearFunction.apply(flat, self.w_q, self.w_q_t, self.w_scale, self.ones_in, self.bias,
                                         self.out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "e4m3 per-channel scales")


def wraps_base(parent: nn.Module) -> bool:
    """Whether a frozen linear child of ``parent`` may be swapped: parent is a model's own module, or a
    LoRA layer that only calls its base (not DoRA, which reads the base weight; the fused LoRA op calls an
    FP8 base and adds its update). Other adapters' wrappers keep their base as it is."""
    from adapters_lab.adapters.lora import LoRALinear  # the adapters import the speed paths

    if isinstance(parent, LoRALinear):
        return parent.lora_magnitude_vector is None
    return type(parent).__module__.startswith("transformers.")


def fp8_targets(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(full name, parent, attribute, layer) of every frozen ``nn.Linear`` inside the decoder layers that
    can be swapped (``wraps_base``): q, k, v, o, gate, up, down and LoRA's base layers; not the
    embeddings, not the output head (outside ``get_decoder()``)."""
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    found = []
    for parent_name, parent in decoder.named_modules():
        for attribute, child in parent.named_children():
            if (type(child) is nn.Linear and not child.weight.requires_grad and wraps_base(parent)):
                name = ".".join(p for p in (prefix, parent_name, attribute) if p)
                found.append((name, parent, attribute, child))
    return found


def fp8_shape_refusal(model: nn.Module) -> str | None:
    """The first layer ``apply_fp8_base`` would refuse for its shape (works on a meta-device skeleton)."""
    for name, _, _, layer in fp8_targets(model):
        reason = fp8_shape_reason(name, layer.in_features, layer.out_features)
        if reason:
            return reason
    return None


@dataclass
class FP8Swap:
    """What ``restore_fp8_base`` puts back: (parent, attribute, original layer) per swapped layer."""

    swapped: list[tuple[nn.Module, str, nn.Linear]]


def apply_fp8_base(model: nn.Module, out_dtype: torch.dtype = torch.bfloat16) -> FP8Swap:
    """Swap the decoder's frozen linear layers for ``FP8Linear`` in place (a layer of unsuitable shape
    raises ``ValueError`` naming it, before any is swapped)."""
    targets = fp8_targets(model)
    reason = next((r for r in (fp8_shape_reason(n, m.in_features, m.out_features) for n, _, _, m in targets) if r),
                  None)
    if reason:
        raise ValueError(reason)
    swapped = []
    for name, parent, attribute, layer in targets:
        setattr(parent, attribute, FP8Linear(layer, name, out_dtype))
        swapped.append((parent, attribute, layer))
    return FP8Swap(swapped)


def restore_fp8_base(swap: FP8Swap) -> int:
    """Put the original layers back (their weights were never written); returns how many."""
    for parent, attribute, layer in swap.swapped:
        setattr(parent, attribute, layer)
    count = len(swap.swapped)
    swap.swapped = []
    return count


def fp8_config_refusal(model_cfg, trainer_cfg) -> str | None:
    """The one-line reason ``model.base_precision=fp8`` cannot run with these options, or None (typed
    configs: enum members)."""
    from adapters_lab.config import BasePrecision, Distributed, DType, ModelKind

    if model_cfg.base_precision != BasePrecision.fp8:
        return None
    head = "model.base_precision=fp8"
    if model_cfg.dtype != DType.bfloat16:
        return f"{head}: model.dtype={model_cfg.dtype.value} is not supported (the FP8 GEMMs give bf16; use bfloat16)"
    if trainer_cfg.distributed == Distributed.fsdp:
        return f"{head}: trainer.distributed=fsdp is not supported (FSDP shards the weights the FP8 layers replace)"
    if model_cfg.kind != ModelKind.causal_lm:
        return f"{head}: model.kind={model_cfg.kind.value} is not supported (only causal_lm is tested)"
    return None
