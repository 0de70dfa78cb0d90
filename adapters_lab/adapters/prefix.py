"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation", arXiv:2101.00190): ``num_virtual_tokens`` learned keys and values prepended to the
attention of every layer, entering the model as a pre-filled KV cache.

With ``projection=true`` the prefixes are reparameterised during training, as in the paper, by
an MLP ``Linear(d, projection_hidden) -> tanh -> Linear(projection_hidden, layers * 2 * d)``
over a ``(num_virtual_tokens, d)`` embedding (d = key/value width); otherwise the embedding
holds the keys and values directly. The tensor layout matches HF PEFT's ``PrefixEncoder``
(``embedding``, ``transform.0``, ``transform.2``) so weights carry over.

Packed training rows (``trainer.batching=paper_packed``: ``virtual_tokens.PACKED_ROWS`` calls) take
the prefixes without the cache when the model runs the prefix attention (``prefix_attention``,
chosen by the trainer's speed paths): a cache's ``update(k, v, layer_idx)`` makes every compiled
decoder layer guard on its own index, so each layer compiled its own graph and past Dynamo's
recompile limit (8) the rest ran eagerly. Instead the hook sets each layer's prefix keys and values
(batch-expanded, in the model's dtype, in the autograd graph) as attributes of its attention module
for the duration of the call (cleared after it, also on an error), and the prefix attention, a
function registered with transformers' ``AttentionInterface`` as ``adapters_lab_prefix_<base>``,
puts them in front of the layer's keys and values (after RoPE on the new keys; the prefix keys are
not rotated, as in the cache) and calls the base attention (sdpa, eager or flex_attention) with
the caller's 4D mask over the n + L keys. Every layer reads the same attribute names, so all
layers share one graph. The trainer's validation under it runs its padded rows as packed ones
(``training/speed/__init__.py``), so it too passes no cache. Without those attributes (generation,
padded training, our decoder) the prefix attention is its base attention and the prefixes come
from the cache.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from adapters_lab.adapters import virtual_tokens
from adapters_lab.adapters.base import (
    PREFIX_PACKED_ATTENTION,
    Adapter,
    AdapterConfigError,
    InjectionReport,
    LayerPlacement,
)
from adapters_lab.adapters.placement import architecture, decoder_layers, kv_shape, model_type
from adapters_lab.models import CACHE_ARGUMENTS, cache_argument, call_cache

MODULE_NAME = "prefix_tuning"
PREFIX_KEY, PREFIX_VALUE = "prefix_tuning_key", "prefix_tuning_value"  # attention-module attributes in a packed call
PREFIX_ATTENTION = "adapters_lab_prefix_"  # + the base attention's name: the prefix attention's registered names


class PrefixEncoder(virtual_tokens.VirtualTokenModule):
    """Per-layer key/value prefixes: ``(batch, layers * 2, kv_heads, n, head_dim)`` as k0, v0, k1, v1, ..."""

    def __init__(self, num_virtual_tokens: int, layers: int, kv_heads: int, head_dim: int, projection: bool,
                 projection_hidden: int, device: torch.device):
        super().__init__(num_virtual_tokens)
        self.shape = (num_virtual_tokens, layers * 2, kv_heads, head_dim)
        width = kv_heads * head_dim
        kwargs = dict(device=device, dtype=torch.float32)
        if projection:
            self.embedding = nn.Embedding(num_virtual_tokens, width, **kwargs)
            self.transform = nn.Sequential(nn.Linear(width, projection_hidden, **kwargs), nn.Tanh(),
                                           nn.Linear(projection_hidden, layers * 2 * width, **kwargs))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, layers * 2 * width, **kwargs)
            self.transform = None

    def forward(self) -> torch.Tensor:
        flat = self.embedding.weight
        if self.transform is not None:
            flat = self.transform(flat)
        return flat.view(self.shape).permute(1, 2, 0, 3)  # (layers * 2, kv_heads, n, head_dim)


def base_attention(implementation: str | None) -> str | None:
    """The attention a prefix attention wraps (``adapters_lab_prefix_sdpa``: ``sdpa``); any other name as given."""
    if implementation is not None and implementation.startswith(PREFIX_ATTENTION):
        return implementation[len(PREFIX_ATTENTION):]
    return implementation


def uses_prefix_attention(model: nn.Module) -> bool:
    implementation = model.config._attn_implementation
    return base_attention(implementation) != implementation


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, *, base: str, **kwargs):
    """transformers attention function (``(batch, heads, seq, dim)`` in): ``module``'s prefix keys and
    values, where a packed call set them, in front of its ``(batch, kv_heads, L, dim)`` keys and
    values, then the ``base`` attention (which repeats the kv heads for grouped-query attention)."""
    prefix_key = getattr(module, PREFIX_KEY, None)
    if prefix_key is not None:
        key = torch.cat([prefix_key, key], dim=2)
        value = torch.cat([getattr(module, PREFIX_VALUE), value], dim=2)
    if base == "eager":  # transformers registers no eager function: each model's module defines its own
        forward = sys.modules[type(module).__module__].eager_attention_forward
    else:
        forward = ALL_ATTENTION_FUNCTIONS[base]
    return forward(module, query, key, value, attention_mask, **kwargs)


def prefix_attention(model: nn.Module) -> str | None:
    """Register the prefix attention over ``model``'s current attention (with that attention's mask
    building) and return its name; None when ``model`` has no prefix tuning."""
    if not isinstance(getattr(model, MODULE_NAME, None), PrefixEncoder):
        return None
    base = base_attention(model.config._attn_implementation)
    if base not in PREFIX_PACKED_ATTENTION:
        raise AdapterConfigError(f"attention {base!r}: prefix tuning on packed rows needs one of "
                                 f"{', '.join(PREFIX_PACKED_ATTENTION)}")
    name = PREFIX_ATTENTION + base
    AttentionInterface.register(name, partial(prefix_attention_forward, base=base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's attention module (the ``module`` an attention function is called with)."""
    arch = architecture(model)
    if arch is None or "attn" not in arch.modules:
        raise AdapterConfigError(f"model_type {model_type(model)!r}: no attention module known to hold the prefix "
                                 "of a packed row; use trainer.batching=padded")
    return [layer.get_submodule(arch.modules["attn"]) for layer in decoder_layers(model)[1]]


def release(held: list[nn.Module]) -> None:
    """Remove the prefix attributes from the attention modules in ``held`` (emptied)."""
    while held:
        module = held.pop()
        module.__dict__.pop(PREFIX_KEY, None)
        module.__dict__.pop(PREFIX_VALUE, None)


@dataclass
class PrefixTuning(Adapter):
    placement: LayerPlacement = field(default_factory=LayerPlacement)
    num_virtual_tokens: int = 20
    projection: bool = False
    projection_hidden: int = 512

    def validate(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise AdapterConfigError(f"adapter.num_virtual_tokens={self.num_virtual_tokens}: must be positive")
        if self.projection and self.projection_hidden <= 0:
            raise AdapterConfigError(f"adapter.projection_hidden={self.projection_hidden}: must be positive")
        if self.placement.layers != "all" or list(self.placement.exclude_layers):
            raise AdapterConfigError(
                f"adapter.placement.layers={self.placement.layers!r} exclude_layers="
                f"{list(self.placement.exclude_layers)}: prefix tuning prefixes every layer (the attention mask, "
                "which covers the prefix, is shared by all layers); use layers=all"
            )

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens

    def check_training(self, trainer: Any) -> None:
        super().check_training(trainer)
        if trainer.gradient_checkpointing:  # both batchings failed with a shape error in the first backward
            raise AdapterConfigError(
                "trainer.gradient_checkpointing=true: prefix tuning's keys and values exist for the forward call "
                "only (the cache grows by a recomputed layer's keys; packed rows' prefixes are released after the "
                "call), so a layer recomputed in backward would not see them; use trainer.gradient_checkpointing=false"
            )

    @property
    def virtual_tokens_in_cache(self) -> bool:
        return True  # trains under trainer.batching=paper_packed (training/speed/packed_mask.py)

    def inject(self, model: nn.Module, tokenizer: Any = None) -> InjectionReport:
        num_layers, kv_heads, head_dim = kv_shape(model)
        prefix_layers = len(decoder_layers(model)[1])
        if prefix_layers != num_layers:
            raise AdapterConfigError(f"adapter: model has {prefix_layers} decoder layers but config says {num_layers}")
        device = model.get_input_embeddings().weight.device
        encoder = PrefixEncoder(self.num_virtual_tokens, num_layers, kv_heads, head_dim, self.projection,
                                self.projection_hidden, device)
        model.add_module(MODULE_NAME, encoder)
        dtype = model.get_input_embeddings().weight.dtype
        name = cache_argument(model)
        held: list[nn.Module] = []  # the attention modules holding the prefixes of the call in flight

        def first_step(kwargs: dict, batch: int, packed: bool) -> None:
            prefixes = encoder().to(dtype)
            layers = [(prefixes[2 * layer].unsqueeze(0).expand(batch, -1, -1, -1),
                       prefixes[2 * layer + 1].unsqueeze(0).expand(batch, -1, -1, -1)) for layer in range(num_layers)]
            if packed and uses_prefix_attention(model):  # no cache: see the module docstring
                for attention, (key, value) in zip(attention_modules(model), layers):
                    setattr(attention, PREFIX_KEY, key)
                    setattr(attention, PREFIX_VALUE, value)
                    held.append(attention)
                return
            cache = call_cache(kwargs)
            if cache is None:
                for old in CACHE_ARGUMENTS:  # an explicit None under either name
                    kwargs.pop(old, None)
                cache = kwargs[name] = DynamicCache(config=model.config)
            for layer, (key, value) in enumerate(layers):
                cache.update(key, value, layer)

        virtual_tokens.install(model, self.num_virtual_tokens, first_step, inserts_tokens=False)
        model.register_forward_hook(lambda *_: release(held), always_call=True)  # also after an error
        return InjectionReport(method=self.name, adapted=[f"{MODULE_NAME} ({self.num_virtual_tokens} tokens)"],
                               layers=list(range(num_layers)))
