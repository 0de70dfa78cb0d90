"""Per-layer switches on the decoder's repeated block: ``torch.compile`` (``trainer.compile``)
and activation recomputation (``trainer.gradient_checkpointing``)."""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from adapters_lab.config import TrainerConfigError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found (expected .layers or .h)")
    return layers


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


def enable_gradient_checkpointing(model: nn.Module, layers: int | None) -> int:
    """Recompute the first ``layers`` decoder layers (all when None) in backward instead of
    keeping their activations; returns how many. Uses transformers' per-layer switch."""
    blocks = decoder_layers(model)
    count = len(blocks) if layers is None else min(layers, len(blocks))
    for index, block in enumerate(blocks):
        if not hasattr(block, "gradient_checkpointing"):
            raise TrainerConfigError(f"trainer.gradient_checkpointing: {type(block).__name__} has no checkpointing switch")
        block.gradient_checkpointing = index < count
        block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    return count
