"""Chunked cross-entropy (``trainer.fused_loss``): the causal-LM loss of the model's own head
without materialising the full-vocabulary fp32 logits."""

from __future__ import annotations

import torch
import torch.nn as nn

from adapters_lab.adapters import virtual_tokens
from adapters_lab.data.tokenize import IGNORE_INDEX


class _LinearCrossEntropySum(torch.autograd.Function):
    """Sum of token cross-entropies of ``hidden @ weight.T`` for a frozen ``weight``.

    The logits exist one chunk of rows at a time (fp32 only inside the chunk); the gradient
    with respect to ``hidden``, ``(softmax - onehot) @ weight``, is formed in the same pass
    and kept, so backward is one multiply. The frozen weight gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                token_weights: torch.Tensor | None = None):
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        total = None  # partial sums added up as they come (no zero-filled accumulator)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = (h @ weight.T).to(accumulate)
            valid = y != IGNORE_INDEX
            if token_weights is not None:  # each token's weight in the sum (0 for unlabelled ones)
                valid = valid * token_weights[start : start + chunk].to(accumulate)
            target = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None])[:, 0]
            part = torch.where(valid != 0, (lse - picked) * valid, 0.0).sum()
            total = part if total is None else total + part
            if grad is not None:
                probs = torch.exp(logits.sub_(lse[:, None]))
                probs.scatter_add_(1, target[:, None], -torch.ones_like(probs[:, :1]))
                probs.mul_(valid[:, None].to(probs.dtype))
                grad[start : start + chunk] = (probs.to(h.dtype) @ weight.to(h.dtype))
        ctx.save_for_backward(grad)
        if total is None:  # no rows
            return hidden.new_zeros((), dtype=accumulate)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk: int = 4096,
                           weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens, as transformers' causal-LM loss
    (position t predicts label t+1), without materialising the full-vocabulary logits; with
    ``weights`` (one per label position) their weighted sum instead."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    shifted = labels[:, 1:].reshape(-1)
    token_weights = weights[:, 1:].reshape(-1) if weights is not None else None
    weight = head.weight
    if torch.is_autocast_enabled(hidden.device.type):
        weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
        hidden = hidden.to(weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        total = _LinearCrossEntropySum.apply(hidden, weight, shifted, chunk, token_weights)
    if weights is not None:
        return total
    return total / (shifted != IGNORE_INDEX).sum().clamp(min=1)


def weighted_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The sum of next-token cross-entropies weighted per label position (``weights``, 0 where
    unlabelled): transformers' causal-LM loss with per-token weights in place of the mean. The logits go
    in as ``(tokens, vocab)``: given ``(rows, vocab, tokens)`` CUDA runs its strided softmax kernel, which
    took 55 of a 140 ms prefix-tuning step on the LLaMA-7B shape (H200, 2026-12-03)."""
    vocab = logits.shape[-1]
    token_losses = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab),
                                               labels[:, 1:].clamp(min=0).reshape(-1), reduction="none")
    return (token_losses * weights[:, 1:].reshape(-1)).sum()


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
    if virtual_tokens.count(model):
        return "virtual tokens (prefix or prompt tuning) are added in the model's own forward, which it bypasses"
    return None
