"""LoRA: low-rank updates of frozen linear layers (Hu et al., 2021, arXiv:2106.09685), and DoRA.

``y = W x + (alpha / r) * B A dropout(x)`` with A Kaiming-uniform and B zero, so the
adapted model equals the base at step 0. ``use_rslora`` scales by ``alpha / sqrt(r)``
(Kalajdzievski, 2023). ``use_dora`` (Liu et al., 2024, arXiv:2402.09353) splits the adapted
weight into a learned magnitude and a direction: ``W' = m * (W + s B A) / ||W + s B A||`` with
the norm taken per output row and detached from the graph (the paper's section 4.3), and ``m``
initialised to ``||W||`` so step 0 is again the base. Parameter names follow HF PEFT
(``lora_A``, ``lora_B``, ``lora_magnitude_vector``, ``base_layer``) so weights export without renaming.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from adapters_lab.adapters.base import AdapterConfigError, InjectionReport, RankedAdapter
from adapters_lab.adapters.placement import Target, check_patterns, pattern_value, select_modules
from adapters_lab.training.speed.fused_lora import fused_lora_linear


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


def set_dense_weight(module: nn.Module, dense: torch.Tensor) -> None:
    """Write an (out, in) matrix back in the layer's own layout and dtype."""
    module.weight.data.copy_((dense.T if isinstance(module, Conv1D) else dense).to(module.weight.dtype))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def merge_layers(model: nn.Module, layer_type: type[nn.Module]) -> nn.Module:
    """Replace every ``layer_type`` wrapper by its ``merged()`` base layer (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, layer_type):
            replace_module(model, name, module.merged())
    return model


def names_regex(names: list[str]) -> str:
    """A full-match regex naming exactly these modules (PEFT's string form of ``target_modules``)."""
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def layers_of(model: nn.Module, layer_type: type[nn.Module]) -> dict[str, nn.Module]:
    """The ``layer_type`` wrappers by full name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, layer_type)}


def fan_in_fan_out(layers: dict[str, nn.Module]) -> bool:
    """PEFT's flag for GPT-2 style Conv1D bases (weight stored transposed)."""
    return any(isinstance(layer.base_layer, Conv1D) for layer in layers.values())


def require_linear(target: Target, method: str) -> None:
    """Methods that wrap a weight matrix cannot go on a whole sublayer or a norm."""
    if not isinstance(target.module, (nn.Linear, Conv1D)):
        raise AdapterConfigError(
            f"adapter.placement.modules: {target.key!r} selects {target.name} "
            f"({type(target.module).__name__}); {method} adapts linear layers only"
        )


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (and, for DoRA, a magnitude)."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float, use_rslora: bool,
                 use_dora: bool = False):
        super().__init__()
        in_features, out_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.rank = rank
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.dropout = dropout
        self.fused = False  # trainer.fused_lora: training forwards through fused_lora.fused_lora_linear
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_magnitude_vector = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=torch.float32)) if use_dora else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_magnitude_vector is not None:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm())

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense (out, in) matrix."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def weight_norm(self) -> torch.Tensor:
        """Per-output-row L2 norm of ``W + s B A``, detached (DoRA treats it as a constant)."""
        weight = dense_weight(self.base_layer).float() + self.delta_weight().detach()
        return weight.norm(p=2, dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.training:
            return fused_lora_linear(x, self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling,
                                     self.dropout)
        out = self.base_layer(x)
        lora_in = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        lora_out = self.lora_B(self.lora_A(lora_in)) * self.scaling
        if self.lora_magnitude_vector is None:
            return out + lora_out.to(out.dtype)
        # DoRA: m / ||W'|| * (W x + s B A x) + b, with W x taken on the same (dropped-out) input.
        scale = self.lora_magnitude_vector / self.weight_norm()
        weight = dense_weight(self.base_layer)
        base_out = lora_in @ weight.to(lora_in.dtype).T
        return out + ((scale - 1) * base_out + scale * lora_out).to(out.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with the update folded into its weight."""
        weight = dense_weight(self.base_layer).float() + self.delta_weight()
        if self.lora_magnitude_vector is not None:
            weight = weight * (self.lora_magnitude_vector / self.weight_norm()).unsqueeze(1)
        set_dense_weight(self.base_layer, weight)
        return self.base_layer


def enable_fused_lora(model: nn.Module) -> int:
    """Route the training forward of every LoRA layer the fused op covers (a frozen ``nn.Linear``
    base, no DoRA) through ``fused_lora_linear``; returns how many."""
    count = 0
    for module in model.modules():
        if (isinstance(module, LoRALinear) and module.lora_magnitude_vector is None
                and isinstance(module.base_layer, nn.Linear) and not module.base_layer.weight.requires_grad):
            module.fused = True
            count += 1
    return count


@dataclass
class LoRA(RankedAdapter):
    """LoRA / rsLoRA / DoRA on the linear layers the placement selects."""

    alpha: float = 16.0
    dropout: float = 0.05
    use_rslora: bool = False
    use_dora: bool = False

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError(f"adapter.dropout={self.dropout}: must be in [0, 1)")

    def inject(self, model: nn.Module, tokenizer: Any = None) -> InjectionReport:
        report = InjectionReport(method=self.name)
        targets = select_modules(model, self.placement)
        check_patterns(self.rank_pattern, targets, "adapter.rank_pattern")
        for target in targets:
            require_linear(target, self.name)
            rank = pattern_value(self.rank_pattern, target, self.rank)
            layer = LoRALinear(target.module, rank, self.alpha, self.dropout, self.use_rslora, self.use_dora)
            replace_module(model, target.name, layer)
            report.adapted.append(target.name)
            report.layers.append(target.layer)
        return report

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_layers(model, LoRALinear)

    def peft_export(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        layers = layers_of(model, LoRALinear)
        tensors = {}
        for name, layer in layers.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.weight
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.weight
            if layer.lora_magnitude_vector is not None:
                tensors[f"base_model.model.{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
        config = {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                  "use_rslora": self.use_rslora, "use_dora": self.use_dora, "target_modules": names_regex(list(layers)),
                  "bias": "none", "init_lora_weights": True, "alpha_pattern": {},
                  "rank_pattern": {re.escape(n): layer.rank for n, layer in layers.items() if layer.rank != self.rank},
                  "fan_in_fan_out": fan_in_fan_out(layers)}
        return tensors, config
