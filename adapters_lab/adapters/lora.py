"""LoRA: low-rank updates of frozen linear layers (Hu et al., 2021, arXiv:2106.09685).

``y = W x + (alpha / r) * B A dropout(x)`` with A Kaiming-uniform and B zero, so the
adapted model equals the base at step 0. ``use_rslora`` scales by ``alpha / sqrt(r)``
(Kalajdzievski, 2023). Parameter names follow HF PEFT (``lora_A``, ``lora_B``,
``base_layer``) so weights export without renaming.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from adapters_lab.adapters.base import Adapter, AdapterConfigError, InjectionReport
from adapters_lab.adapters.placement import Target, select_modules


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or GPT-2 style Conv1D (weight stored transposed)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(type(module).__name__)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the layer stores."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float, use_rslora: bool):
        super().__init__()
        in_features, out_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.rank = rank
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense (out, in) matrix."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        lora_in = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(lora_in)) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with the update folded into its weight."""
        delta = self.delta_weight()
        weight = self.base_layer.weight
        weight += (delta.T if isinstance(self.base_layer, Conv1D) else delta).to(weight.dtype)
        return self.base_layer


@dataclass
class LoRA(Adapter):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    use_rslora: bool = False
    # Per-module rank overrides: generic name, module-name suffix or regex -> rank.
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        for key, rank in {"adapter.rank": self.rank, **{
            f"adapter.rank_pattern.{k}": v for k, v in self.rank_pattern.items()}}.items():
            if rank <= 0:
                raise AdapterConfigError(f"{key}={rank}: rank must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError(f"adapter.dropout={self.dropout}: must be in [0, 1)")

    def rank_for(self, target: Target) -> int:
        for pattern, rank in self.rank_pattern.items():
            if pattern == target.key or target.name.endswith("." + pattern) or re.fullmatch(pattern, target.name):
                return rank
        return self.rank

    def inject(self, model: nn.Module) -> InjectionReport:
        report = InjectionReport(method=self.name)
        for target in select_modules(model, self.placement):
            if not isinstance(target.module, (nn.Linear, Conv1D)):
                raise AdapterConfigError(
                    f"adapter.placement.modules: {target.key!r} selects {target.name} "
                    f"({type(target.module).__name__}); {self.name} adapts linear layers only"
                )
            layer = LoRALinear(target.module, self.rank_for(target), self.alpha, self.dropout, self.use_rslora)
            replace_module(model, target.name, layer)
            report.adapted.append(target.name)
            report.layers.append(target.layer)
        return report


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and drop the adapter modules."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            replace_module(model, name, module.merged())
    return model
