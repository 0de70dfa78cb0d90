"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation", arXiv:2101.00190): ``num_virtual_tokens`` learned keys and values prepended to the
attention of every layer, entering the model as a pre-filled KV cache.

With ``projection=true`` the prefixes are reparameterised during training, as in the paper, by
an MLP ``Linear(d, projection_hidden) -> tanh -> Linear(projection_hidden, layers * 2 * d)``
over a ``(num_virtual_tokens, d)`` embedding (d = key/value width); otherwise the embedding
holds the keys and values directly. The tensor layout matches HF PEFT's ``PrefixEncoder``
(``embedding``, ``transform.0``, ``transform.2``) so weights carry over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from transformers import DynamicCache

from adapters_lab.adapters import virtual_tokens
from adapters_lab.adapters.base import Adapter, AdapterConfigError, InjectionReport, LayerPlacement
from adapters_lab.adapters.placement import decoder_layers, kv_shape
from adapters_lab.models import CACHE_ARGUMENTS, cache_argument, call_cache

MODULE_NAME = "prefix_tuning"


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

        def first_step(kwargs: dict, batch: int) -> None:
            cache = call_cache(kwargs)
            if cache is None:
                for old in CACHE_ARGUMENTS:  # an explicit None under either name
                    kwargs.pop(old, None)
                cache = kwargs[name] = DynamicCache(config=model.config)
            prefixes = encoder().to(dtype)
            for layer in range(num_layers):
                key, value = (prefixes[2 * layer + j].unsqueeze(0).expand(batch, -1, -1, -1) for j in (0, 1))
                cache.update(key, value, layer)

        virtual_tokens.install(model, self.num_virtual_tokens, first_step, inserts_tokens=False)
        return InjectionReport(method=self.name, adapted=[f"{MODULE_NAME} ({self.num_virtual_tokens} tokens)"],
                               layers=list(range(num_layers)))
