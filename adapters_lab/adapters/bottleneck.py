"""Bottleneck adapters: ``a(h) = s * up(act(down(dropout(h))))`` with ``rank`` as the width.

- Series, after a sublayer (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer et al., 2021,
  arXiv:2005.00247): ``y = f(x) + a(f(x))``; ``position=both`` is Houlsby (after attention and
  after the MLP), ``after_mlp`` is Pfeiffer.
- Parallel to a sublayer (He et al., 2022, "Towards a Unified View of Parameter-Efficient
  Transfer Learning", arXiv:2110.04366): ``y = f(x) + a(x)``.
- LLM-Adapters' per-linear variants (Hu et al., 2023, arXiv:2304.01933): series on the input of
  a linear ``W (x + a(x))`` (upstream's ``mh_adapter``), series on its output ``W x + a(W x)``
  (``output_adapter``), or parallel ``W x + a(x)``; upstream uses width 256, tanh, scaling 1,
  no bias and the "bert" init (down and up both N(0, 0.02), so not the identity at step 0).
  ``init=zero_up`` (Kaiming down, zero up; upstream's ``mam_adapter``) starts at the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from adapters_lab.adapters.base import AdapterConfigError, InjectionReport, Placement, RankedAdapter
from adapters_lab.adapters.lora import linear_shape, replace_module, require_linear
from adapters_lab.adapters.placement import Target, check_patterns, pattern_value, select_modules, series_site


class Position(str, Enum):
    after_attn = "after_attn"  # a whole attention sublayer
    after_mlp = "after_mlp"  # a whole MLP sublayer
    both = "both"  # after_attn and after_mlp (Houlsby)
    input = "input"  # per linear: on its input (series) / reading its input (parallel)
    output = "output"  # per linear: on its output (series only)


SUBLAYER_POSITIONS = {Position.after_attn: ["attn"], Position.after_mlp: ["mlp"], Position.both: ["attn", "mlp"]}


class Init(str, Enum):
    bert = "bert"  # down and up N(0, 0.02): LLM-Adapters' default
    zero_up = "zero_up"  # down Kaiming-uniform, up zero: identity at step 0


@dataclass
class BottleneckPlacement(Placement):
    """Placement plus ``position``. Sublayer positions pick the sublayers themselves, so
    ``modules`` must stay empty; per-linear positions (``input``/``output``) need ``modules``,
    and ``position_pattern`` sets the position per module (e.g. ``{down: output}``)."""

    modules: list[str] = field(default_factory=list)
    position: Position = Position.after_mlp
    position_pattern: dict[str, Position] = field(default_factory=dict)


class BottleneckAdapter(nn.Module):
    """``s * up(act(down(dropout(h))))``, computed in fp32 and cast back to the input's dtype."""

    def __init__(self, in_features: int, out_features: int, rank: int, activation: str, dropout: float,
                 scaling: float, bias: bool, init: Init, device: torch.device):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=bias, device=device, dtype=torch.float32)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=torch.float32)
        self.act = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        if not self.down.weight.is_meta:
            self.reset_parameters(init)

    def reset_parameters(self, init: Init) -> None:
        if init == Init.bert:
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        for linear in (self.down, self.up):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.up(self.act(self.down(self.dropout(h.to(self.down.weight.dtype))))) * self.scaling
        return out.to(h.dtype)


class BottleneckLinear(nn.Module):
    """A frozen linear layer with a bottleneck adapter on its input, its output, or in parallel."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter, mode: str):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.mode = mode  # "input" | "output" | "parallel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "input":
            return self.base_layer(x + self.adapter(x))
        out = self.base_layer(x)
        return out + self.adapter(out if self.mode == "output" else x)


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _sublayer_hook(adapter: BottleneckAdapter, parallel: bool):
    """Forward hook adding the adapter after (series) or beside (parallel) a whole sublayer."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = _hidden(output)
        source = (args[0] if args else kwargs["hidden_states"]) if parallel else hidden
        new = hidden + adapter(source)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


@dataclass
class Bottleneck(RankedAdapter):
    """Series or parallel bottleneck adapters after sublayers or on individual linear layers."""

    placement: BottleneckPlacement = field(default_factory=BottleneckPlacement)
    rank: int = 64
    parallel: bool = False
    activation: str = "relu"
    scaling: float = 1.0
    dropout: float = 0.0
    bias: bool = True
    init: Init = Init.zero_up

    def validate(self) -> None:
        super().validate()
        p = self.placement
        if self.activation not in ACT2FN:
            raise AdapterConfigError(f"adapter.activation={self.activation!r}: unknown; one of {sorted(ACT2FN)}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError(f"adapter.dropout={self.dropout}: must be in [0, 1)")
        positions = {p.position, *p.position_pattern.values()}
        sublayer = p.position in SUBLAYER_POSITIONS
        if sublayer and (p.modules or p.regex or p.position_pattern):
            raise AdapterConfigError(
                f"adapter.placement.modules={list(p.modules)}: position={p.position.value} picks the sublayers "
                "itself; leave modules, regex and position_pattern empty, or use position input/output"
            )
        if not sublayer and not (p.modules or p.regex):
            raise AdapterConfigError(
                f"adapter.placement.position={p.position.value}: a per-linear position needs "
                "adapter.placement.modules (e.g. [gate, up, down]) or regex"
            )
        if any(pos in SUBLAYER_POSITIONS for pos in p.position_pattern.values()):
            raise AdapterConfigError(
                f"adapter.placement.position_pattern={dict(p.position_pattern)}: only input/output per module"
            )
        if self.parallel and Position.output in positions:
            raise AdapterConfigError(
                "adapter.placement.position=output: a parallel adapter reads the layer's input and adds to its "
                "output (W x + a(x)); use position=input, or parallel=false for the series output adapter"
            )

    def _adapter(self, target: Target, in_features: int, out_features: int) -> BottleneckAdapter:
        device = next(target.module.parameters()).device
        rank = pattern_value(self.rank_pattern, target, self.rank)
        return BottleneckAdapter(in_features, out_features, rank, self.activation, self.dropout, self.scaling,
                                 self.bias, self.init, device)

    def inject(self, model: nn.Module, tokenizer: Any = None) -> InjectionReport:
        report = InjectionReport(method=self.name)
        p = self.placement
        if p.position in SUBLAYER_POSITIONS:
            words = SUBLAYER_POSITIONS[p.position]
            if not self.parallel:
                words = [series_site(model, w) for w in words]
            sublayers = Placement(modules=words, layers=p.layers, exclude_layers=list(p.exclude_layers))
            targets = select_modules(model, sublayers)
            check_patterns(self.rank_pattern, targets, "adapter.rank_pattern")
            hidden = model.get_input_embeddings().embedding_dim
            for target in targets:
                if target.key not in ("attn", "mlp"):  # a residual-inside sublayer: its output projection
                    _, out_features = linear_shape(target.module)
                    adapter = self._adapter(target, out_features, out_features)
                    replace_module(model, target.name, BottleneckLinear(target.module, adapter, "output"))
                    report.adapted.append(f"{target.name}[output]")
                    report.layers.append(target.layer)
                    continue
                adapter = self._adapter(target, hidden, hidden)
                target.module.add_module("bottleneck", adapter)
                target.module.register_forward_hook(_sublayer_hook(adapter, self.parallel), with_kwargs=True)
                report.adapted.append(target.name)
                report.layers.append(target.layer)
            return report

        targets = select_modules(model, p)
        check_patterns(self.rank_pattern, targets, "adapter.rank_pattern")
        check_patterns(p.position_pattern, targets, "adapter.placement.position_pattern")
        for target in targets:
            require_linear(target, self.name)
            in_features, out_features = linear_shape(target.module)
            position = Position(pattern_value(p.position_pattern, target, p.position))
            if self.parallel:
                mode, sizes = "parallel", (in_features, out_features)
            elif position == Position.input:
                mode, sizes = "input", (in_features, in_features)
            else:
                mode, sizes = "output", (out_features, out_features)
            replace_module(model, target.name, BottleneckLinear(target.module, self._adapter(target, *sizes), mode))
            report.adapted.append(f"{target.name}[{mode}]")
            report.layers.append(target.layer)
        return report
