"""Speed paths of the trainer that change how, never what, is computed; each is selected by a
``trainer.*`` key and checked against the plain path in ``tests/test_train_fast.py``."""

from __future__ import annotations

import torch
import torch.nn as nn

from adapters_lab.data.tokenize import IGNORE_INDEX


class _LinearCrossEntropySum(torch.autograd.Function):
    """Sum of token cross-entropies of ``hidden @ weight.T`` for a frozen ``weight``.

    The logits exist one chunk of rows at a time (fp32 only inside the chunk); the gradient
    with respect to ``hidden``, ``(softmax - onehot) @ weight``, is formed in the same pass
    and kept, so backward is one multiply. The frozen weight gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        total = None  # partial sums added up as they come (no zero-filled accumulator)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = (h @ weight.T).to(accumulate)
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None])[:, 0]
            part = torch.where(valid, lse - picked, 0.0).sum()
            total = part if total is None else total + part
            if grad is not None:
                probs = torch.exp(logits.sub_(lse[:, None]))
                probs.scatter_add_(1, target[:, None], -torch.ones_like(probs[:, :1]))
                probs.mul_(valid[:, None])
                grad[start : start + chunk] = (probs.to(h.dtype) @ weight.to(h.dtype))
        ctx.save_for_backward(grad)
        if total is None:  # no rows
            return hidden.new_zeros((), dtype=accumulate)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens, as transformers' causal-LM loss
    (position t predicts label t+1), without materialising the full-vocabulary logits."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    shifted = labels[:, 1:].reshape(-1)
    weight = head.weight
    if torch.is_autocast_enabled(hidden.device.type):
        weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
        hidden = hidden.to(weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        total = _LinearCrossEntropySum.apply(hidden, weight, shifted, chunk)
    return total / (shifted != IGNORE_INDEX).sum().clamp(min=1)


def check_fused_loss_supported(model: nn.Module) -> str | None:
    """Why the chunked loss cannot stand in for the model's own head and loss, or None."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return f"the output head is {type(head).__name__} with bias={getattr(head, 'bias', None) is not None}, not a bias-free nn.Linear"
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(model.config, key, None) not in (None, 1.0):
            return f"model.config.{key}={getattr(model.config, key)} rescales the logits"
    if head.weight.requires_grad:
        return "the output head is trainable"
    return None


def matmul_weights(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) element counts of the weights of every linear layer: the N in the
    ~2N forward FLOPs per token of a decoder (embeddings are lookups, not matmuls)."""
    frozen = trainable = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if module.weight.requires_grad:
                trainable += module.weight.numel()
            else:
                frozen += module.weight.numel()
    return frozen, trainable


def flops_per_token(model: nn.Module) -> int:
    """Training FLOPs per token: forward 2N and input gradients 2N for every weight, plus
    weight gradients 2N for trainable ones (attention scores are left out, as in the usual 6N)."""
    frozen, trainable = matmul_weights(model)
    return 4 * frozen + 6 * trainable


# Dense bf16 tensor-core peak by device name (datasheets, without sparsity), TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# trainer.compile_mode's values (checked in train.check_trainer_config): CUDA-graph modes do not suit
# per-layer graphs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_decoder_layers(model: nn.Module, mode: str = "default") -> int:
    """``torch.compile`` each decoder layer (the repeated block), leaving the data-dependent
    mask building and the loss outside the graphs; returns how many were compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)


def uncompile_decoder_layers(model: nn.Module) -> None:
    """Back to eager layers after training: generation's changing shapes would recompile them."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found (expected .layers or .h)")
    return layers


# ---------------------------------------------------------------------------------------------
# Variable-length attention over packed rows (``trainer.attn_implementation=varlen``).
#
# A packed micro-batch is ``rows x row_length`` tokens whose position ids restart at 0 for every
# example. Flattened to ``rows * row_length`` tokens, the examples are contiguous segments, and
# causal attention inside each segment is exactly the block-diagonal causal mask that the flex and
# SDPA paths build from the position ids. The segments are described by ``cu_seqlens`` (int32,
# first token of each segment, then the token count), computed on the CPU when the batch is
# collated, so the compiled layers see no host synchronisation and no per-batch mask.

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
    import inspect

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
                         "forward call (the trainer adds them to packed batches; see kernels.varlen_batch_kwargs)")
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
