"""The decoder's rotary position embedding as one Triton kernel for the queries and one for the keys.

transformers' ``apply_rotary_pos_emb`` (LLaMA, Mistral, Qwen2) runs five kernels for the queries
and five for the keys (two products, the negation and concatenation of ``rotate_half``, the sum):
on the random-init LLaMA-7B shape with 4 beams they took about 2 ms of a 22 ms decoding step
(``scripts/profile_decoding.py``, H200). This kernel rotates every head of one token in one program,
in float32, rounding once to the input's dtype where transformers rounds after each operation (in
float32 the two are the same computation). The decoder swaps it in, on a GPU, only around its own
forwards (``fused``), by the name the attention layers call; ``tests/test_fused_rotary.py`` runs it
under Triton's CPU interpreter against transformers' function and through the decoder.
"""

from __future__ import annotations

import contextlib
import sys
from types import ModuleType

import torch
import torch.nn as nn

try:  # CUDA builds of torch ship triton; the CPU wheel does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

ATTENTIONS = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention"})


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _rotate(x, out, cos, sin, b, s, x_b, x_h, x_s, o_b, o_h, o_s, c_b, c_s, heads,
                HALF: tl.constexpr, HEADS: tl.constexpr):
        rows, cols = tl.arange(0, HEADS), tl.arange(0, HALF)
        real = rows[:, None] < heads
        c1 = tl.load(cos + b * c_b + s * c_s + cols).to(tl.float32)
        c2 = tl.load(cos + b * c_b + s * c_s + HALF + cols).to(tl.float32)
        s1 = tl.load(sin + b * c_b + s * c_s + cols).to(tl.float32)
        s2 = tl.load(sin + b * c_b + s * c_s + HALF + cols).to(tl.float32)
        first = x + b * x_b + s * x_s + rows[:, None] * x_h + cols[None, :]
        x1 = tl.load(first, mask=real, other=0.0).to(tl.float32)
        x2 = tl.load(first + HALF, mask=real, other=0.0).to(tl.float32)
        target = out + b * o_b + s * o_s + rows[:, None] * o_h + cols[None, :]
        tl.store(target, (x1 * c1[None, :] - x2 * s1[None, :]).to(out.dtype.element_ty), mask=real)
        tl.store(target + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(out.dtype.element_ty), mask=real)

    @triton.jit
    def _rotary(q, k, q_out, k_out, cos, sin, seq,
                q_b, q_h, q_s, k_b, k_h, k_s, qo_b, qo_h, qo_s, ko_b, ko_h, ko_s, c_b, c_s, q_heads, k_heads,
                HALF: tl.constexpr, HEADS: tl.constexpr):
        token = tl.program_id(0)
        b, s = token // seq, token % seq
        if tl.program_id(1) == 0:
            _rotate(q, q_out, cos, sin, b, s, q_b, q_h, q_s, qo_b, qo_h, qo_s, c_b, c_s, q_heads, HALF, HEADS)
        else:
            _rotate(k, k_out, cos, sin, b, s, k_b, k_h, k_s, ko_b, ko_h, ko_s, c_b, c_s, k_heads, HALF, HEADS)


def takes(q: torch.Tensor, cos: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether the kernel takes these inputs: ``(b, heads, seq, d)`` with ``d / 2`` a power of two
    and a unit last stride, ``cos`` and ``sin`` ``(b or 1, seq, d)``."""
    half = q.shape[-1] // 2
    return (triton is not None and unsqueeze_dim == 1 and q.dim() == 4 and cos.dim() == 3 and q.stride(-1) == 1
            and half >= 1 and half & (half - 1) == 0 and cos.shape[1:] == (q.shape[2], q.shape[3]))


def rotary_kernel(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``apply_rotary_pos_emb(q, k, cos, sin)`` (``rotate_half`` convention) in two programs a token."""
    batch, q_heads, seq, dim = q.shape
    k_heads = k.shape[1]
    cos, sin = (t.expand(batch, seq, dim).contiguous() if t.stride(-1) != 1 else t.expand(batch, seq, dim)
                for t in (cos, sin))
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _rotary[(batch * seq, 2)](
        q, k, q_out, k_out, cos, sin, seq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), q_heads, k_heads,
        HALF=dim // 2, HEADS=triton.next_power_of_2(max(q_heads, k_heads)))
    return q_out, k_out


def rotary_modules(model: nn.Module) -> list[ModuleType]:
    """The transformers modeling modules whose attention layers (``ATTENTIONS``) the model holds."""
    names = {type(m).__module__ for m in model.modules() if type(m).__name__ in ATTENTIONS}
    return [sys.modules[n] for n in sorted(names) if hasattr(sys.modules.get(n), "apply_rotary_pos_emb")]


@contextlib.contextmanager
def fused(modules: list[ModuleType]):
    """Inside the block, the attention layers of ``modules`` rotate through the kernel (inputs it
    does not take go to transformers' own function)."""
    saved = [m.apply_rotary_pos_emb for m in modules]

    def swap(original):
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            if takes(q, cos, unsqueeze_dim) and k.stride(-1) == 1:
                return rotary_kernel(q, k, cos, sin)
            return original(q, k, cos, sin, unsqueeze_dim)
        return apply_rotary_pos_emb

    for module, original in zip(modules, saved):
        module.apply_rotary_pos_emb = swap(original)
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.apply_rotary_pos_emb = original
