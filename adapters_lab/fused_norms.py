"""The decoder's RMSNorms as one fused kernel each (``torch.nn.functional.rms_norm``).

transformers' LLaMA, Mistral and Qwen2 RMSNorm runs as eight kernels (a float32 copy, the square,
the mean, the epsilon, the reciprocal root, the product, the cast back, the weight); with 65 norms
in a 32-layer model that is some 500 launches of a decoding step's 900. ``F.rms_norm`` computes the
same in one kernel on a GPU (``aten._fused_rms_norm``): float32 inside and one rounding to the input's
dtype at the end, where transformers rounds before multiplying by the weight as well. In float32 the
two are the same computation (the decoder's token tests against ``generate`` run with it). The
decoder swaps the forwards in only around its own calls (``fused``); the model is left as it was.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})  # weight * x / rms(x), as transformers has them


def rms_norms(model: nn.Module) -> list[nn.Module]:
    """The model's RMSNorm modules of the kinds in ``NORMS``, but those whose forward is already an
    instance attribute (an accelerate hook placing tensors on devices, say): they are left alone."""
    return [m for m in model.modules()
            if type(m).__name__ in NORMS and hasattr(m, "variance_epsilon") and "forward" not in vars(m)]


def _fused_forward(module: nn.Module):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden_states, module.weight.shape, module.weight, module.variance_epsilon)
    return forward


@contextlib.contextmanager
def fused(norms: list[nn.Module]):
    """``norms`` run as ``F.rms_norm`` inside the block (an instance forward over the class's)."""
    for module in norms:
        module.forward = _fused_forward(module)
    try:
        yield
    finally:
        for module in norms:
            del module.forward
