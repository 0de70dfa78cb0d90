"""IA3: learned rescaling of activations (Liu et al., 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", arXiv:2205.05638).

Keys and values are scaled on the output side of their projections (``l_k * W_k x``), the
feed-forward activation on the input side of the down projection (``W_down (l_ff * x)``);
every vector starts at ones, so step 0 is the base model. HF PEFT's LLaMA default is the
same (``k_proj``, ``v_proj``, ``down_proj`` with ``down_proj`` as the feed-forward module), and
the parameter is named ``ia3_l`` as there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from adapters_lab.adapters.base import Adapter, InjectionReport, Placement
from adapters_lab.adapters.lora import (
    dense_weight,
    fan_in_fan_out,
    layers_of,
    linear_shape,
    merge_layers,
    names_regex,
    replace_module,
    require_linear,
    set_dense_weight,
)
from adapters_lab.adapters.placement import check_patterns, matches, select_modules


class IA3Linear(nn.Module):
    """A frozen linear layer whose input (feed-forward) or output (keys, values) is rescaled."""

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        in_features, out_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.feedforward = feedforward
        size = in_features if feedforward else out_features
        self.ia3_l = nn.Parameter(torch.empty(size, device=base_layer.weight.device, dtype=torch.float32))
        if not self.ia3_l.is_meta:
            nn.init.ones_(self.ia3_l)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return self.base_layer((x * self.ia3_l).to(x.dtype))
        out = self.base_layer(x)
        return (out * self.ia3_l).to(out.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """Fold the scale into the weight: columns for the input side, rows (and bias) for the output side."""
        weight = dense_weight(self.base_layer).float()
        if self.feedforward:
            set_dense_weight(self.base_layer, weight * self.ia3_l.unsqueeze(0))
        else:
            set_dense_weight(self.base_layer, weight * self.ia3_l.unsqueeze(1))
            if self.base_layer.bias is not None:
                self.base_layer.bias.mul_(self.ia3_l.to(self.base_layer.bias.dtype))
        return self.base_layer


@dataclass
class IA3(Adapter):
    placement: Placement = field(default_factory=lambda: Placement(modules=["k", "v", "down"]))
    # Modules scaled on their input (the feed-forward activation); every other selected module
    # is scaled on its output. Generic names, suffixes or regexes, as in rank_pattern.
    feedforward_modules: list[str] = field(default_factory=lambda: ["down"])

    def inject(self, model: nn.Module, tokenizer: Any = None) -> InjectionReport:
        report = InjectionReport(method=self.name)
        targets = select_modules(model, self.placement)
        check_patterns(dict.fromkeys(self.feedforward_modules), targets, "adapter.feedforward_modules")
        for target in targets:
            require_linear(target, self.name)
            feedforward = any(matches(p, target) for p in self.feedforward_modules)
            replace_module(model, target.name, IA3Linear(target.module, feedforward))
            report.adapted.append(target.name)
            report.layers.append(target.layer)
        return report

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_layers(model, IA3Linear)

    def peft_export(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        layers = layers_of(model, IA3Linear)
        tensors = {f"base_model.model.{name}.ia3_l": layer.ia3_l.reshape((1, -1) if layer.feedforward else (-1, 1))
                   for name, layer in layers.items()}
        config = {"peft_type": "IA3", "target_modules": names_regex(list(layers)),
                  "feedforward_modules": names_regex([n for n, layer in layers.items() if layer.feedforward]),
                  "init_ia3_weights": True, "fan_in_fan_out": fan_in_fan_out(layers)}
        return tensors, config
