"""Per-layer switches on the decoder's repeated block: ``torch.compile`` (``trainer.compile``)
and activation recomputation (``trainer.gradient_checkpointing``)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from adapters_lab.config import TrainerConfigError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found (expected .layers or .h)")
    return layers


def compile_decoder_layers(model: nn.Module, mode: str = "default", graph_per_layer: bool = False) -> int:
    """``torch.compile`` each decoder layer (the repeated block), leaving the data-dependent
    mask building and the loss outside the graphs; returns how many were compiled. The layers share
    one graph unless ``graph_per_layer``: a layer reading its own slot of a cache (prefix tuning's
    keys and values) is guarded on its index, so each layer compiles its own graph (Inductor's cache
    makes the later ones cheap), and Dynamo's recompile limit is raised to allow them until
    ``uncompile_decoder_layers`` (beyond 8 layers the rest would otherwise run eagerly)."""
    layers = decoder_layers(model)
    if graph_per_layer:
        limit = torch._dynamo.config.recompile_limit
        setattr(model, _LIMIT_BEFORE, limit)
        torch._dynamo.config.recompile_limit = max(limit, 4 * len(layers))  # training's and validation's shapes
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)


_LIMIT_BEFORE = "_recompile_limit_before_compile"  # a model attribute: the limit graph_per_layer raised


def uncompile_decoder_layers(model: nn.Module) -> None:
    """Back to eager layers after training: generation's changing shapes would recompile them."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
    if hasattr(model, _LIMIT_BEFORE):
        torch._dynamo.config.recompile_limit = getattr(model, _LIMIT_BEFORE)
        delattr(model, _LIMIT_BEFORE)


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
