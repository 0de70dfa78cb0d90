"""Variable-length attention over packed rows (``trainer.attn_implementation=varlen``).

A packed micro-batch is ``rows x row_length`` tokens whose position ids restart at 0 for every
example. Flattened to ``rows * row_length`` tokens, the examples are contiguous segments, and
causal attention inside each segment is exactly the block-diagonal causal mask that the flex and
SDPA paths build from the position ids. The segments are described by ``cu_seqlens`` (int32,
first token of each segment, then the token count), computed on the CPU when the batch is
collated, so the compiled layers see no host synchronisation and no per-batch mask.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

VARLEN = "varlen"  # the trainer.attn_implementation value
VARLEN_ATTENTION = "adapters_lab_varlen"  # the name registered with transformers' AttentionInterface
VARLEN_KWARGS = ("varlen_cu_seqlens", "varlen_max_seqlen")  # the batch keys the attention reads


def varlen_cu_seqlens(position_ids: torch.Tensor, max_segment: int | None = None) -> torch.Tensor:
    """int32 ``cu_seqlens`` of the flattened rows: a segment starts at every row start and wherever
    the position id does not continue the previous one (a restart, as the packed collator writes
    them). With ``max_segment``, segments longer than that are cut into pieces of at most
    ``max_segment`` tokens: only filler segments (padding, no labels) can be that long when
    ``max_segment`` is at least the longest example, so the loss and gradients do not change and
    ``max_segment`` is a fixed bound on the segment length for the kernel."""
    rows, length = position_ids.shape
    flat = position_ids.reshape(-1)
    index = torch.arange(flat.numel(), device=flat.device)
    start = index % length == 0
    start[1:] |= flat[1:] != flat[:-1] + 1
    if max_segment is not None:
        if max_segment <= 0:
            raise ValueError(f"max_segment={max_segment}: must be positive")
        segment_start = torch.where(start, index, 0).cummax(0).values
        start |= (index - segment_start) % max_segment == 0
    boundaries = torch.cat([start.nonzero()[:, 0], index.new_tensor([flat.numel()])])
    return boundaries.to(torch.int32)


def varlen_batch_kwargs(batch: dict, max_segment: int) -> dict:
    """The extra entries of the varlen path for a collated batch (on the CPU): segments from its
    ``position_ids`` (packed rows) or, without them, from its right-padded ``attention_mask``."""
    positions = batch["position_ids"] if "position_ids" in batch else padded_position_ids(batch["attention_mask"])
    return {"varlen_cu_seqlens": varlen_cu_seqlens(positions.cpu(), max_segment),
            "varlen_max_seqlen": int(max_segment)}


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of right-padded rows with the padding as a segment of its own (restarting at
    0), so ``varlen_cu_seqlens`` describes a padded batch: each row is one example then padding."""
    length = attention_mask.shape[1]
    real = attention_mask.long().sum(1, keepdim=True)
    index = torch.arange(length, device=attention_mask.device).expand_as(attention_mask)
    if bool((attention_mask.long() != (index < real).long()).any()):
        raise ValueError("varlen attention supports right-padded rows only")
    return torch.where(index < real, index, index - real)


def reference_varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               cu_seqlens: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention inside each segment of ``(tokens, heads, dim)`` inputs with a dense
    block-diagonal mask: the contract of the CUDA varlen kernel, for CPU and tests."""
    tokens = query.shape[0]
    index = torch.arange(tokens, device=query.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(index.dtype), index, right=True)
    mask = (segment[:, None] == segment[None, :]) & (index[:, None] >= index[None, :])
    out = nn.functional.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1),
                                                     value.transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


_CUDA_VARLEN: dict = {}  # filled by check_varlen_supported: the kernel and its keyword arguments


def check_varlen_supported(device: torch.device) -> str | None:
    """Why varlen attention cannot run on ``device``, or None. On CUDA it needs
    ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10); elsewhere the reference path runs."""
    if torch.device(device).type != "cuda":
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return (f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10 has it); "
                "use trainer.attn_implementation=flex_attention")
    params = inspect.signature(varlen_attn).parameters
    # torch 2.10 takes is_causal; later versions take window_size=(-1, 0) for causal attention.
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    _CUDA_VARLEN.update(fn=varlen_attn, causal=causal, has_scale="scale" in params)
    return None


def _cuda_varlen_attention(query, key, value, cu_seqlens, max_seqlen: int, scale: float | None) -> torch.Tensor:
    if not _CUDA_VARLEN:
        reason = check_varlen_supported(query.device)
        if reason:
            raise RuntimeError(f"trainer.attn_implementation=varlen: {reason}")
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"trainer.attn_implementation=varlen: the CUDA kernel needs bf16 or fp16 activations, "
                           f"got {query.dtype} (trainer.precision=bf16)")
    extra = {}
    if scale is not None and _CUDA_VARLEN["has_scale"]:
        extra["scale"] = scale
    elif scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-12:
        query = query * (scale * query.shape[-1] ** 0.5)  # the kernel's own scale is 1/sqrt(dim)
    return _CUDA_VARLEN["fn"](query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                              **_CUDA_VARLEN["causal"], **extra)


def varlen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, dropout: float = 0.0, scaling: float | None = None,
                             varlen_cu_seqlens: torch.Tensor | None = None, varlen_max_seqlen: int | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function (``(batch, heads, seq, dim)`` in, ``(batch, seq, heads, dim)``
    out): causal attention inside the segments of ``varlen_cu_seqlens`` over the flattened rows,
    with the CUDA varlen flash kernel on GPU and ``reference_varlen_attention`` elsewhere."""
    if varlen_cu_seqlens is None:
        raise ValueError("attention implementation 'varlen' needs varlen_cu_seqlens and varlen_max_seqlen in the "
                         "forward call (the trainer adds them to packed batches; see training.speed.varlen.varlen_batch_kwargs)")
    if attention_mask is not None:
        raise ValueError("attention implementation 'varlen' takes no attention mask (segments come from "
                         "varlen_cu_seqlens)")
    if dropout:
        raise ValueError(f"attention implementation 'varlen' has no attention dropout (got {dropout})")
    if getattr(module, "is_causal", True) is False:
        raise ValueError("attention implementation 'varlen' is causal only")
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if groups > 1:  # grouped-query attention: one copy of each key/value head per query head
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    q, k, v = (t.transpose(1, 2).reshape(batch * length, heads, dim) for t in (query, key, value))
    if query.is_cuda:
        out = _cuda_varlen_attention(q, k, v, varlen_cu_seqlens, varlen_max_seqlen or length, scaling)
    else:
        out = reference_varlen_attention(q, k, v, varlen_cu_seqlens, scaling)
    return out.reshape(batch, length, heads, dim), None


def register_varlen_attention() -> str:
    """Register the varlen function with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    return VARLEN_ATTENTION
