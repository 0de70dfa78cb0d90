"""LoRA linear layer as one autograd op (``trainer.fused_lora``): the same function as
``LoRALinear``'s plain path (Hu et al., 2021), computed with less memory traffic.

- The dropout mask is a function of a per-call seed: on CUDA a Triton kernel draws four uniforms
  per Philox call (``tl.rand4x``), where Inductor's dropout draws one per call, and backward draws
  the same mask again instead of keeping it (no boolean mask per LoRA input is stored).
- Backward keeps only the layer's input (which the other projections of that input keep as well)
  and the rank-``r`` activation ``h = dropout(x) A^T``.
- The low-rank update is accumulated into the frozen layer's output by ``addmm``, not added as a
  separate full-size tensor; in backward, its input gradient is added by ``addmm`` too (no dropout)
  or inside the dropout kernel, which applies the mask as it adds.

Measured on an H200 (docs/benchmarks.md, 2026-12-01, commit 357fd03): the same speed as the plain layers on the
LLaMA-7B shape and 6.6 GiB less peak memory.

Masks follow the same distribution as ``nn.Dropout`` (each element kept with probability
``1 - p`` and scaled by ``1 / (1 - p)``), drawn from a different random stream. CPU tensors take
their mask from a ``torch.Generator`` seeded with the same seed, so tests can check the op against
the plain path with the identical mask (``tests/test_fused_lora.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the CPU mask needs no Triton
    triton = None

BLOCK = 1024  # elements per Philox stream slice; a program handles 4 * BLOCK


if triton is not None:

    @triton.jit
    def _dropout_slice(src_ptr, out_ptr, offsets, n, uniform, p, scale, ACCUMULATE: tl.constexpr):
        inside = offsets < n
        values = tl.load(src_ptr + offsets, mask=inside).to(tl.float32)
        dropped = tl.where(uniform > p, values * scale, 0.0)
        if ACCUMULATE:
            dropped += tl.load(out_ptr + offsets, mask=inside).to(tl.float32)
        tl.store(out_ptr + offsets, dropped.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _seeded_dropout_kernel(src_ptr, out_ptr, seed_ptr, n, p, scale, ACCUMULATE: tl.constexpr,
                               BLOCK: tl.constexpr):
        """``out (+)= where(u > p, src * scale, 0)`` with ``u`` from Philox(seed, counter): one
        call gives four uniforms, for four slices of ``BLOCK`` elements of this program."""
        program = tl.program_id(0)
        seed = tl.load(seed_ptr)
        counters = program * BLOCK + tl.arange(0, BLOCK)
        u0, u1, u2, u3 = tl.rand4x(seed, counters)
        start = program.to(tl.int64) * 4 * BLOCK + tl.arange(0, BLOCK)
        _dropout_slice(src_ptr, out_ptr, start, n, u0, p, scale, ACCUMULATE)
        _dropout_slice(src_ptr, out_ptr, start + BLOCK, n, u1, p, scale, ACCUMULATE)
        _dropout_slice(src_ptr, out_ptr, start + 2 * BLOCK, n, u2, p, scale, ACCUMULATE)
        _dropout_slice(src_ptr, out_ptr, start + 3 * BLOCK, n, u3, p, scale, ACCUMULATE)


def triton_seeded_dropout(src: torch.Tensor, seed: torch.Tensor, p: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel on ``src`` (any device Triton runs on, or the CPU under
    ``TRITON_INTERPRET=1``): a new tensor, or ``out += dropout(src)`` when ``out`` is given."""
    if triton is None:
        raise RuntimeError("trainer.fused_lora on CUDA needs the triton package (it ships with CUDA builds of torch)")
    src = src.contiguous()
    n = src.numel()
    if n >= 2**33:  # 2^31 Philox counters x 4 uniforms
        raise ValueError(f"seeded dropout: {n} elements, at most 2^33 per call")
    accumulate = out is not None
    target = out if accumulate else torch.empty_like(src)
    grid = (triton.cdiv(n, 4 * BLOCK),)
    _seeded_dropout_kernel[grid](src, target, seed, n, p, 1.0 / (1.0 - p), ACCUMULATE=accumulate, BLOCK=BLOCK)
    return target


def cpu_keep_mask(shape: torch.Size, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The CPU mask of ``seed``: ``torch.rand`` from a generator seeded with it."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed.item()))
    return torch.rand(shape, generator=generator) > p


@torch.library.custom_op("adapters_lab::seeded_dropout", mutates_args=())
def seeded_dropout(src: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout whose mask depends only on ``seed``, ``p`` and the shape: calling it twice with the
    same seed drops the same elements."""
    if src.is_cuda:
        return triton_seeded_dropout(src, seed, p)
    return torch.where(cpu_keep_mask(src.shape, seed, p), src / (1.0 - p), 0.0).to(src.dtype)


@seeded_dropout.register_fake
def _(src, seed, p):
    return torch.empty_like(src)


@torch.library.custom_op("adapters_lab::seeded_dropout_add_", mutates_args=("out",))
def seeded_dropout_add_(out: torch.Tensor, src: torch.Tensor, seed: torch.Tensor, p: float) -> None:
    """``out += seeded_dropout(src, seed, p)`` in one pass."""
    if src.is_cuda and out.is_contiguous():
        triton_seeded_dropout(src, seed, p, out=out)
    else:
        out.add_(seeded_dropout(src, seed, p))


@seeded_dropout_add_.register_fake
def _(out, src, seed, p):
    return None


class _LoRALinearFunction(torch.autograd.Function):
    """``y = x W^T + b + s * dropout(x) A^T B^T`` for 2-D ``x`` in one dtype; W and b frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, seed):
        dropped = seeded_dropout(x, seed, p) if p else x
        h = dropped @ lora_a.T
        y = torch.addmm(F.linear(x, weight, bias), h, lora_b.T, alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h, seed)
        ctx.scaling, ctx.p = scaling, p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, h, seed = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        grad_h = grad_y @ (lora_b * s)
        grad_b = grad_y.T @ (h * s)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if p:
                grad_x = grad_y @ weight
                seeded_dropout_add_(grad_x, grad_h @ lora_a, seed, p)
            else:
                grad_x = torch.addmm(grad_y @ weight, grad_h, lora_a)
        grad_a = grad_h.T @ (seeded_dropout(x, seed, p) if p else x)
        return grad_x, None, None, grad_a, grad_b, None, None, None


class _LoRAUpdateFunction(torch.autograd.Function):
    """``y = base_out + s * dropout(x) A^T B^T`` for 2-D ``x``: the same LoRA op beside a frozen base that
    computes its own output and input gradient (the FP8 base, ``fp8.py``); autograd adds the two input
    gradients."""

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scaling: float, p: float, seed):
        dropped = seeded_dropout(x, seed, p) if p else x
        h = dropped @ lora_a.T
        y = torch.addmm(base_out, h, lora_b.T, alpha=scaling)
        ctx.save_for_backward(x, lora_a, lora_b, h, seed)
        ctx.scaling, ctx.p = scaling, p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_a, lora_b, h, seed = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        grad_h = grad_y @ (lora_b * s)
        grad_b = grad_y.T @ (h * s)
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = seeded_dropout(grad_h @ lora_a, seed, p) if p else grad_h @ lora_a
        grad_a = grad_h.T @ (seeded_dropout(x, seed, p) if p else x)
        return grad_y, grad_x, grad_a, grad_b, None, None, None


def fused_lora_linear(x: torch.Tensor, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scaling: float, p: float) -> torch.Tensor:
    """``base(x) + scaling * B A dropout_p(x)`` through ``_LoRALinearFunction``, in the autocast
    dtype when autocast is on (as the plain path's matmuls run) and in ``x``'s dtype otherwise;
    the adapter weights' gradients reach their fp32 masters through the casts. A base that is not an
    ``nn.Linear`` (the FP8 base) runs its own op, and ``_LoRAUpdateFunction`` adds the update to its output."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    seed = torch.randint(0, 2**31 - 1, (1,), device=x.device) if p else torch.zeros(1, dtype=torch.long, device=x.device)
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    if not isinstance(base, nn.Linear):
        with torch.autocast(device, enabled=False):
            y = _LoRAUpdateFunction.apply(base(flat).to(dtype), flat, lora_a.to(dtype), lora_b.to(dtype), scaling, p,
                                          seed)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    bias = base.bias.to(dtype) if base.bias is not None else None
    with torch.autocast(device, enabled=False):
        y = _LoRALinearFunction.apply(flat, base.weight.to(dtype), bias, lora_a.to(dtype), lora_b.to(dtype),
                                      scaling, p, seed)
    return y.reshape(*x.shape[:-1], y.shape[-1])
