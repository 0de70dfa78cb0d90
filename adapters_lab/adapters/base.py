"""The adapter interface: a method is a dataclass (its own config schema) with ``inject``.

A class is registered once in ``registry.py``; ``conf/adapter/<name>.yaml`` pulls its schema
(``schema/adapter/<Class>``) into its defaults list, Hydra validates the YAML against the class's
fields, and :func:`build_adapter` turns the composed node into an instance. ``inject(model, tokenizer)``
freezes nothing by itself: the pipeline freezes the base first, then the method adds trainable modules
and reports where it put them. A method also says what it can do after training: ``merge`` into the
base weights, ``peft_export`` in HF PEFT's format (each refuses with one line where it cannot), and
how many ``virtual_tokens`` it puts before every sequence.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from omegaconf import MISSING, DictConfig, OmegaConf

from adapters_lab.config import Batching, Distributed

# the attention a prefix on packed rows trains under (the 4D mask: training/speed/packed_mask.py)
PREFIX_PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")


class AdapterConfigError(ValueError):
    """A bad adapter option, raised before any training; the message names the key."""


@dataclass
class LayerPlacement:
    """Which decoder layers a method goes into: ``all``, a list of indices, or a ``start:stop``
    range; ``exclude_layers`` drops some. Methods that are not tied to named modules (prefix
    tuning) use only this."""

    layers: Any = "all"
    exclude_layers: list[int] = field(default_factory=list)


@dataclass
class Placement(LayerPlacement):
    """Where a module-wrapping method goes, the same words for every family (AdapterHub / PEFT style).

    ``modules``: generic names (``q k v o gate up down``; ``attn`` / ``mlp`` for sublayers)
    mapped per architecture in ``placement.py``, or raw module-name suffixes.
    ``regex``: a full-match regex over module names, used instead of ``modules``.
    """

    modules: list[str] = field(default_factory=lambda: ["q", "v"])
    regex: Any = None


@dataclass
class NoPlacement:
    """For methods that act on the input only (prompt tuning): no placement key is accepted."""


@dataclass
class InjectionReport:
    """What an adapter touched: full module names, grouped for a compact log line."""

    method: str
    adapted: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)

    def summary(self) -> str:
        if not self.adapted:
            return f"{self.method}: no module adapted"
        by_leaf: dict[str, int] = defaultdict(int)
        for name in self.adapted:
            by_leaf[name.rsplit(".", 1)[-1]] += 1
        leaves = ", ".join(f"{leaf} x{n}" for leaf, n in sorted(by_leaf.items()))
        layers = sorted(set(self.layers))
        span = f"layers {compact_ranges(layers)}" if layers else "no layer index"
        return f"{self.method}: {len(self.adapted)} modules ({leaves}) in {span}"


def compact_ranges(indices: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


@dataclass
class Adapter:
    """Base of every PEFT method. Subclasses add their fields and implement ``inject``."""

    _target_: str = MISSING
    name: str = MISSING
    placement: Placement = field(default_factory=Placement)

    @property
    def trains(self) -> bool:
        """False for a baseline that only evaluates."""
        return True

    def validate(self) -> None:
        """Check options that need no model; raise AdapterConfigError naming the key."""

    @property
    def virtual_tokens(self) -> int:
        """Positions the method puts before every sequence (prompt and prefix tuning); 0 for the others."""
        return 0

    def check_training(self, trainer: Any) -> None:
        """Refuse trainer options (the typed ``TrainerConfig``) this method cannot train with (before any
        weight loads)."""
        if self.virtual_tokens:
            self.check_virtual_token_training(trainer)
        if trainer.distributed == Distributed.fsdp and not self.can_shard():
            raise AdapterConfigError(f"trainer.distributed=fsdp: adapter={self.name} ({type(self).__name__}) does not "
                                     "train on a sharded model; use trainer.distributed=ddp")

    @property
    def virtual_tokens_in_cache(self) -> bool:
        """Whether the virtual tokens are keys and values in the cache only (prefix tuning), which a packed
        row's mask can show to each of its sequences (``trainer.batching=paper_packed``), rather than
        input positions (prompt tuning)."""
        return False

    def check_virtual_token_training(self, trainer: Any) -> None:
        """check_training's refusals for a method with virtual tokens."""
        batching = Batching(trainer.batching)
        in_cache = self.virtual_tokens_in_cache
        if batching == Batching.packed or (batching == Batching.paper_packed and not in_cache):
            also = " or trainer.batching=paper_packed" if in_cache else ""
            raise AdapterConfigError(
                f"trainer.batching={batching.value}: {self.name} puts virtual tokens before each sequence "
                f"and a packed row holds several; use trainer.batching=padded{also}"
            )
        attention = trainer.attn_implementation
        if batching == Batching.paper_packed and attention not in (None, *PREFIX_PACKED_ATTENTION):
            raise AdapterConfigError(
                f"trainer.attn_implementation={attention}: {self.name} on packed rows needs an explicit 4D mask over "
                f"its prefix slots; use one of {', '.join(PREFIX_PACKED_ATTENTION)}"
            )
        if trainer.fused_loss:
            preset = " (trainer=paper_packed sets it true)" if batching == Batching.paper_packed else ""
            raise AdapterConfigError(
                f"trainer.fused_loss=true: {self.name} adds its virtual tokens in the model's own forward, which the "
                f"chunked loss bypasses (it calls the decoder alone); use trainer.fused_loss=false{preset}"
            )

    def inject(self, model: nn.Module, tokenizer: Any = None) -> InjectionReport:
        """Add the method's modules to ``model`` in place; ``tokenizer`` only for text-initialised prompts."""
        raise NotImplementedError

    def prepare_load(self) -> None:
        """Before ``inject`` into a model whose adapter tensors will be loaded from a file: drop any
        initialisation that needs more than the model (the loaded tensors replace it)."""

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the injected modules into the base weights, in place; returns the plain model."""
        raise AdapterConfigError(f"export.merged=true: adapter={self.name} cannot be merged into the weights "
                                 f"({type(self).__name__} adds computation that is no weight change)")

    def peft_export(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The injected tensors under HF PEFT's names and the method's part of PEFT's ``adapter_config.json``."""
        raise AdapterConfigError(f"export.peft=true: adapter={self.name} has no HF PEFT export "
                                 f"({type(self).__name__} has no PEFT counterpart here)")

    @classmethod
    def can_merge(cls) -> bool:
        return cls.merge is not Adapter.merge

    @classmethod
    def can_export_peft(cls) -> bool:
        return cls.peft_export is not Adapter.peft_export

    @classmethod
    def can_shard(cls) -> bool:
        """Whether the method trains under trainer.distributed=fsdp (every registered family does:
        tests/test_fsdp.py); a family that cannot overrides this to return False."""
        return True


@dataclass
class RankedAdapter(Adapter):
    """A method with a capacity: ``rank`` is the LoRA rank or the bottleneck width, one word for
    both so ``adapter.rank=8,16,32`` sweeps across families; ``rank_pattern`` overrides it per
    module (generic name, module-name suffix or full-match regex -> rank)."""

    rank: int = 8
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        ranks = {"adapter.rank": self.rank, **{f"adapter.rank_pattern.{k}": v for k, v in self.rank_pattern.items()}}
        for key, rank in ranks.items():
            if rank <= 0:
                raise AdapterConfigError(f"{key}={rank}: rank must be a positive integer")


@dataclass
class NoAdapter(Adapter):
    """Zero-shot baseline: nothing is added or trained, the base model is only evaluated."""

    @property
    def trains(self) -> bool:
        return False

    placement: NoPlacement = field(default_factory=NoPlacement)

    def inject(self, model: nn.Module, tokenizer: Any = None) -> InjectionReport:
        return InjectionReport(method=self.name)


def build_adapter(node: DictConfig | Adapter) -> Adapter:
    """The composed ``cfg.adapter`` node as an instance of its class, validated."""
    adapter = OmegaConf.to_object(node) if isinstance(node, DictConfig) else node
    if not isinstance(adapter, Adapter):
        raise AdapterConfigError(
            f"adapter._target_={getattr(node, '_target_', None)!r} is not an Adapter subclass"
        )
    adapter.validate()
    return adapter


def freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (shared tensors counted once)."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return {"trainable": trainable, "total": total}


def adapter_state_dict(model: nn.Module) -> dict:
    """Only what training changes: the trainable parameters, by full name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
