"""The parts of an image-text model, found by object in one place: the language model (its
``get_decoder()``), the vision tower (the sub-model built from ``config.vision_config``) and the
vision-language connector (LLaVA's multi-modal projector, Qwen2-VL's patch merger, which sits
inside its vision tower). Their attribute paths have moved between transformers releases; their
types and configs have not."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from transformers import PreTrainedModel

# Class-name endings of the connectors known here (LLaVA / LLaVA-NeXT; Qwen2-VL / Qwen2.5-VL).
CONNECTOR_TYPES = ("MultiModalProjector", "PatchMerger")


@dataclass
class Parts:
    language_model: nn.Module
    vision_tower: nn.Module
    connector: nn.Module


def model_parts(model: nn.Module) -> Parts:
    """The three parts of an image-text model; ValueError naming the type when one is missing."""
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is None:
        raise ValueError(f"{type(model).__name__}: no vision_config, not an image-text model")
    vision = next((m for m in model.modules() if m is not model and isinstance(m, PreTrainedModel)
                   and getattr(m.config, "model_type", None) == vision_config.model_type), None)
    connector = next((m for m in model.modules() if type(m).__name__.endswith(CONNECTOR_TYPES)), None)
    if vision is None or connector is None:
        missing = "vision tower" if vision is None else f"connector (a module whose type ends in {CONNECTOR_TYPES})"
        raise ValueError(f"{type(model).__name__}: no {missing} found")
    return Parts(language_model=model.get_decoder(), vision_tower=vision, connector=connector)


def _ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def part_of_parameters(model: nn.Module) -> dict[str, str]:
    """Full parameter name -> ``vision_tower`` | ``connector`` | ``language_model`` | ``other``
    (the LM head, top-level adapter modules such as a prefix encoder)."""
    parts = model_parts(model)
    connector, vision, language = _ids(parts.connector), _ids(parts.vision_tower), _ids(parts.language_model)
    names = {}
    for name, param in model.named_parameters():
        key = id(param)
        names[name] = ("connector" if key in connector else "vision_tower" if key in vision
                       else "language_model" if key in language else "other")
    return names


def count_by_part(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameters per part; ``adapter`` is every trainable one outside the
    connector (the adapter in the LLM, wherever its modules hang)."""
    where = part_of_parameters(model)
    counts = {part: {"trainable": 0, "total": 0} for part in ("language_model", "vision_tower", "connector", "other")}
    adapter = 0
    for name, param in model.named_parameters():
        part = counts[where[name]]
        part["total"] += param.numel()
        part["trainable"] += param.numel() if param.requires_grad else 0
        adapter += param.numel() if param.requires_grad and where[name] != "connector" else 0
    return {**counts, "adapter": {"trainable": adapter, "total": adapter}}


def set_connector_trainable(model: nn.Module, trainable: bool) -> int:
    """Unfreeze (or freeze) the whole connector; returns its parameter count."""
    params = list(model_parts(model).connector.parameters())
    for param in params:
        param.requires_grad_(trainable)
    return sum(p.numel() for p in params)


def parameter_groups(model: nn.Module, lr: float, connector_lr: float | None) -> list[dict]:
    """The optimiser's groups: trainable connector parameters at ``connector_lr`` (None: ``lr``),
    every other trainable parameter at ``lr``; a group with no parameter is left out."""
    connector = _ids(model_parts(model).connector)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in connector], "lr": lr, "name": "adapter"},
              {"params": [p for p in trainable if id(p) in connector], "lr": connector_lr or lr, "name": "connector"}]
    return [g for g in groups if g["params"]]
