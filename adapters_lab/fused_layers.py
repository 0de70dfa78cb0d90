"""The decoder's LLaMA-family layers with two fusions, as Triton kernels on a GPU: each residual add
with the RMSNorm after it (the attention's with the layer's second norm, the MLP's with the next
layer's first; one kernel where there were two), and SwiGLU's SiLU with its product (one, not two).

A 4-beam step of the random-init LLaMA-7B shape spent about 0.65 ms of its 20.6 on the residual adds
and the norms and 0.48 ms on SwiGLU's SiLU and product, each an elementwise pass over the batch's
rows (scripts/profile_decoding.py, H200, docs/benchmarks.md). The kernels round where transformers
rounds: the sum and the SiLU to the input's dtype before they are used, the norm once at the end (as
``F.rms_norm``, ``fused_norms``); in float32 they compute what transformers computes.

The decoder swaps the layers' and MLPs' forwards (instance attributes, as ``fused_norms``) only around
its own calls (``fused``). The layer forward calls the same submodules (``self_attn``, ``mlp``, the
norms but the next layer's first), so adapters hooked on them run as before; a layer or MLP whose
forward is already an instance attribute is left alone, and ``layer_forward`` gives ``step_lanes`` the
forward to run inside its own. A layer's input that is not the tensor the layer before returned (a hook
replaced it) is normed by the layer's own norm.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

try:  # CUDA builds of torch ship triton; the CPU wheel does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})
MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP"})  # down(silu(gate(x)) * up(x))
BLOCK = 1024  # elements a program of the SiLU product
log = logging.getLogger(__name__)
_fused_layers: set[int] = set()  # ids of the layers whose fused forward runs now
_following: dict[int, nn.Module] = {}  # a fused layer's id -> the next layer's input norm
_pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a layer's output, the next layer's norm of it)
_agree: dict[tuple, bool] = {}  # ``kernels_agree``'s answers


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _add_rms_norm(x, delta, weight, summed, normed, cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * cols
        offs = tl.arange(0, BLOCK)
        inside = offs < cols
        total = tl.load(x + row + offs, mask=inside, other=0.0).to(tl.float32)
        total += tl.load(delta + row + offs, mask=inside, other=0.0).to(tl.float32)
        total = total.to(summed.dtype.element_ty)  # rounded as transformers' add rounds it
        tl.store(summed + row + offs, total, mask=inside)
        total = total.to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(total * total, 0) / cols + eps)
        w = tl.load(weight + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(normed + row + offs, (total * scale * w).to(normed.dtype.element_ty), mask=inside)

    @triton.jit
    def _silu_mul(gate, up, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        g = tl.load(gate + offs, mask=inside, other=0.0).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty).to(tl.float32)  # rounded as F.silu rounds it
        u = tl.load(up + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out + offs, (silu * u).to(out.dtype.element_ty), mask=inside)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, norm(x + delta))`` for an RMSNorm ``norm`` (``weight``, ``variance_epsilon``)."""
    cols = x.shape[-1]
    if not (x.is_contiguous() and delta.is_contiguous() and x.shape == delta.shape and norm.weight.shape == (cols,)):
        summed = x + delta
        return summed, norm(summed)
    summed, normed = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(cols)
    _add_rms_norm[(x.numel() // cols,)](x, delta, norm.weight, summed, normed, cols, norm.variance_epsilon,
                                        BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return summed, normed


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``."""
    if not (gate.is_contiguous() and up.is_contiguous() and gate.shape == up.shape and gate.dtype == up.dtype):
        return nn.functional.silu(gate) * up
    out = torch.empty_like(gate)
    _silu_mul[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), BLOCK=BLOCK)
    return out


def kernels_agree(device: torch.device, dtype: torch.dtype, hidden: int) -> bool:
    """Whether both kernels compile here and agree with torch on small inputs (once per device, dtype
    and width); a decoder whose kernels do not runs transformers' layers, and the log says why."""
    key = (str(device), dtype, hidden)
    if triton is None:
        return False
    if key not in _agree:
        try:
            generator = torch.Generator(device=device).manual_seed(0)
            x, delta = (torch.randn(3, 1, hidden, generator=generator, device=device).to(dtype) for _ in range(2))
            weight = torch.rand(hidden, generator=generator, device=device).to(dtype) + 0.5
            norm = nn.Module()
            norm.weight, norm.variance_epsilon = weight, 1e-6
            summed, normed = add_rms_norm(x, delta, norm)
            tolerance = dict(rtol=1.6e-2, atol=1e-2)
            torch.testing.assert_close(normed, nn.functional.rms_norm(x + delta, (hidden,), weight, 1e-6), **tolerance)
            torch.testing.assert_close(silu_mul(x, delta), nn.functional.silu(x) * delta, **tolerance)
            if not torch.equal(summed, x + delta):
                raise AssertionError("the residual sums round differently from torch's")
            _agree[key] = True
        except Exception as error:  # the Triton compiler's errors are not all RuntimeErrors
            log.warning("eval: fused decoder layers off (%s)", str(error)[:200])
            _agree[key] = False
    return _agree[key]


def fusable(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The model's decoder layers (``LAYERS``) and SiLU MLPs (``MLPS``) whose forwards are their class's."""
    own = [m for m in model.modules() if "forward" not in vars(m)]
    layers = [m for m in own if type(m).__name__ in LAYERS and hasattr(m.post_attention_layernorm, "variance_epsilon")]
    mlps = [m for m in own if type(m).__name__ in MLPS and type(getattr(m, "act_fn", None)).__name__ in
            {"SiLU", "SiLUActivation"}]
    return layers, mlps


def _layer(layer: nn.Module, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
    """transformers' LLaMA decoder layer, each residual add fused into the norm after it: the
    attention's into ``post_attention_layernorm``, the MLP's into the next layer's ``input_layernorm``,
    whose result waits in ``_pending`` for that layer (the last layer's add is the model's own)."""
    normed = _take(hidden_states)
    if normed is None:  # the first layer, or an input the previous layer did not return
        normed = layer.input_layernorm(hidden_states)
    attended, _ = layer.self_attn(hidden_states=normed, attention_mask=attention_mask, position_ids=position_ids,
                                  position_embeddings=position_embeddings, **kwargs)
    residual, normed = add_rms_norm(hidden_states, attended, layer.post_attention_layernorm)
    out = layer.mlp(normed)
    following = _following.get(id(layer))
    if following is None:
        return residual + out
    summed, normed = add_rms_norm(residual, out, following)
    _pending.append((summed, normed))
    return summed


def _take(hidden_states: torch.Tensor) -> torch.Tensor | None:
    """The next norm of ``hidden_states`` if a layer computed it (``_pending``), taken out; else None."""
    for i, (summed, normed) in enumerate(_pending):
        if summed is hidden_states:
            del _pending[i]
            return normed
    return None


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))


def layer_forward(layer: nn.Module):
    """The unbound forward a layer runs now: the fused one inside ``fused``, else its class's."""
    return _layer if id(layer) in _fused_layers else type(layer).forward


@contextlib.contextmanager
def fused(layers: list[nn.Module], mlps: list[nn.Module]):
    """Inside the block, ``layers`` and ``mlps`` (``fusable``) run fused."""
    patched = [(m, _layer if m in layers else _mlp) for m in [*layers, *mlps] if "forward" not in vars(m)]
    for module, forward in patched:
        module.forward = forward.__get__(module)
    _fused_layers.update(id(m) for m in layers)
    for layer, after in zip(layers, layers[1:]):  # consecutive layers: the MLP's add joins the next layer's norm
        if after.self_attn.layer_idx == layer.self_attn.layer_idx + 1:
            _following[id(layer)] = after.input_layernorm
    try:
        yield
    finally:
        _fused_layers.difference_update(id(m) for m in layers)
        _following.clear()
        _pending.clear()
        for module, _ in patched:
            del module.forward
