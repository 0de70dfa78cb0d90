"""The trainer's speed and memory paths behind one interface, ``SpeedPaths``: packed-row
attention (``trainer.attn_implementation``, varlen segments), compiled decoder layers
(``trainer.compile``), the chunked loss (``trainer.fused_loss``), the fused LoRA op
(``trainer.fused_lora``), activation recomputation (``trainer.gradient_checkpointing``) and the FP8
frozen base (``model.base_precision=fp8``: ``fp8.py``, checked against bf16 within FP8's error, not equal)
and, for prefix tuning under ``trainer.batching=paper_packed``, the prefix attention, which gives the
packed rows' layers their prefixes without the cache, so that compiled layers share one graph
(``adapters/prefix.py``).
Each changes how, never what, is computed (tests/test_train_fast.py checks each against the plain
path). The loop calls ``apply`` before training and ``restore`` after it, ``batch_extras`` when a
batch is collated, ``loss`` for a training forward and ``logits`` for a validation one."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from adapters_lab.adapters import virtual_tokens
from adapters_lab.adapters.prefix import prefix_attention
from adapters_lab.config import BasePrecision, Batching, TrainerConfig, TrainerConfigError
from adapters_lab.data.paper_packing import LOSS_WEIGHTS
from adapters_lab.training.settings import typed_trainer_config
from adapters_lab.training.speed.fp8 import FP8Swap, apply_fp8_base, restore_fp8_base
from adapters_lab.training.speed.layers import (
    compile_decoder_layers,
    enable_gradient_checkpointing,
    uncompile_decoder_layers,
)
from adapters_lab.training.speed.loss import check_fused_loss_supported, chunked_causal_lm_loss, weighted_causal_lm_loss
from adapters_lab.training.speed.packed_mask import packed_prefix_mask, with_packed_block_mask
from adapters_lab.training.speed.varlen import (
    VARLEN,
    check_varlen_supported,
    padded_position_ids,
    register_varlen_attention,
    varlen_batch_kwargs,
)

log = logging.getLogger(__name__)


def mark_dynamic_segments(inputs: dict) -> None:
    """varlen's segment boundaries change length per batch: one compiled graph for all."""
    if "varlen_cu_seqlens" in inputs:
        torch._dynamo.maybe_mark_dynamic(inputs["varlen_cu_seqlens"], 0)


def forward_loss(model: nn.Module, batch: dict, fused: bool) -> torch.Tensor:
    """Mean next-token loss of a batch (padded: attention_mask; packed: position_ids; varlen
    attention: also varlen_cu_seqlens and varlen_max_seqlen); a paper_packed batch's weighted sum
    (its ``loss_weights``: the padded step's loss). Packed rows under flex attention get their block
    mask here (``packed_mask``: built without a host read); a paper_packed batch on a model with a
    prefix gets its 4D mask over the prefix slots for any attention (``with_prefix_packed_mask``)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", LOSS_WEIGHTS)}
    weights = batch.get(LOSS_WEIGHTS)
    prefix = virtual_tokens.count(model) if weights is not None else 0
    inputs = with_prefix_packed_mask(model, inputs, prefix) if prefix else with_packed_block_mask(model, inputs)
    mark_dynamic_segments(inputs)
    if not fused and weights is None:
        return model(**inputs, labels=batch["labels"], use_cache=False).loss
    if not fused:
        return weighted_causal_lm_loss(model(**inputs, use_cache=False).logits, batch["labels"], weights)
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
    return chunked_causal_lm_loss(hidden, model.get_output_embeddings(), batch["labels"], weights=weights)


def with_prefix_packed_mask(model: nn.Module, inputs: dict, prefix: int) -> dict:
    """A paper_packed batch's inputs for a model with ``prefix`` virtual tokens: the 4D mask over the
    prefix slots and the rows' examples, said explicitly to the virtual-token hook, which adds the
    prefix to the position ids and the cache (``adapters/virtual_tokens.py``; prompt tuning refuses there)."""
    mask = packed_prefix_mask(model, inputs["position_ids"], prefix)
    return {**inputs, "attention_mask": mask, virtual_tokens.PACKED_ROWS: True}


def padded_as_packed_rows(model: nn.Module, inputs: dict, prefix: int) -> dict:
    """A right-padded batch's inputs as packed rows (``with_prefix_packed_mask``) of one example each, its
    padding a segment of its own: the same logits at the example's tokens, without a cache (validation
    under the prefix attention, whose compiled layers then share their graph as in training)."""
    inputs = dict(inputs)
    positions = padded_position_ids(inputs.pop("attention_mask"))
    return with_prefix_packed_mask(model, {**inputs, "position_ids": positions}, prefix)


class SpeedPaths:
    """The configured speed paths for one training run on ``device``; ``cfg`` is typed (its choices enum
    members: ``check_trainer_config``'s, or ``prepare_model``'s conversion); ``base_precision``: the run's
    ``model.base_precision`` (checked at config time: ``checks.py``)."""

    def __init__(self, cfg: TrainerConfig, device: torch.device, base_precision: BasePrecision = BasePrecision.bf16):
        self.cfg, self.device = cfg, torch.device(device)
        self.varlen = cfg.attn_implementation == VARLEN
        self.evaluation_attention: str | None = None
        self.fp8 = BasePrecision(base_precision) == BasePrecision.fp8
        self.fp8_swap: FP8Swap | None = None
        self.packed_prefix = False  # the prefix attention is on (paper_packed prefix tuning)

    def check(self, model: nn.Module) -> None:
        """A one-line error for a path this model or device cannot take."""
        if self.cfg.fused_loss:
            reason = check_fused_loss_supported(model)
            if reason:
                raise TrainerConfigError(f"trainer.fused_loss=true: {reason}")
        if self.varlen:
            reason = check_varlen_supported(self.device)
            if reason:
                raise TrainerConfigError(f"trainer.attn_implementation=varlen: {reason}")

    def apply(self, model: nn.Module) -> "SpeedPaths":
        """Switch the paths on, in place, on the (adapter-injected) model."""
        from adapters_lab.adapters.lora import enable_fused_lora  # the adapters import the fused op from here

        cfg = self.cfg
        self.check(model)
        self.evaluation_attention = model.config._attn_implementation
        if cfg.gradient_checkpointing:
            layers = enable_gradient_checkpointing(model, cfg.checkpoint_layers)
            log.info("gradient checkpointing on %d decoder layers", layers)
        if self.varlen:
            model.set_attn_implementation(register_varlen_attention())
        elif cfg.attn_implementation:
            model.set_attn_implementation(cfg.attn_implementation)
        packed_prefix = prefix_attention(model) if Batching(cfg.batching) == Batching.paper_packed else None
        if packed_prefix:
            model.set_attn_implementation(packed_prefix)
            self.packed_prefix = True
        if cfg.fused_lora:
            log.info("fused LoRA op on %d layers", enable_fused_lora(model))
        if self.fp8:  # a fused LoRA layer then calls its FP8 base and adds its update (fused_lora.py)
            self.fp8_swap = apply_fp8_base(model)
            log.info("FP8 frozen base: %d linear layers", len(self.fp8_swap.swapped))
        if cfg.compile:
            mode = cfg.compile_mode.value
            log.info("compiled %d decoder layers (mode %s)", compile_decoder_layers(model, mode), mode)
        return self

    def restore(self, model: nn.Module) -> None:
        """Generation after training runs eager layers, the model's own attention and its bf16 base."""
        if self.cfg.compile:
            uncompile_decoder_layers(model)
        if self.fp8_swap is not None:  # the original bf16 layers, never written
            restore_fp8_base(self.fp8_swap)
            self.fp8_swap = None
        if self.evaluation_attention not in (None, model.config._attn_implementation):
            model.set_attn_implementation(self.evaluation_attention)
        self.packed_prefix = False

    def batch_extras(self, batch: dict, max_segment: int) -> dict:
        """Entries a path needs beside a collated (CPU) batch: varlen's segment boundaries."""
        return varlen_batch_kwargs(batch, max_segment) if self.varlen else {}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return forward_loss(model, batch, self.cfg.fused_loss)

    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Logits of a padded validation batch (with its extras when varlen attention is on; as packed rows
        under the prefix attention)."""
        mark_dynamic_segments(batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # image-text batches carry pixel_values too
        if self.packed_prefix:
            inputs = padded_as_packed_rows(model, inputs, virtual_tokens.count(model))
        return model(**inputs, use_cache=False).logits


def prepare_model(model: nn.Module, cfg: TrainerConfig, device: torch.device = torch.device("cpu"),
                  base_precision: BasePrecision | str = BasePrecision.bf16) -> SpeedPaths:
    """``SpeedPaths(cfg, device, base_precision).apply(model)``, for a ``cfg`` built with strings too."""
    return SpeedPaths(typed_trainer_config(cfg), device, BasePrecision(base_precision)).apply(model)
