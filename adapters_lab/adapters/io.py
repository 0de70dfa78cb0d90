"""Adapter-only checkpoints: the trainable tensors as safetensors plus the adapter's config,
never the base model. Loading re-injects the same adapter into a fresh base and copies the
tensors back, so outputs reproduce exactly."""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from adapters_lab.adapters.base import Adapter, adapter_state_dict, build_adapter, freeze
from adapters_lab.files import atomic_path, write_json_atomic

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def save_adapter(model: nn.Module, adapter: Adapter, directory: Path, base_model: str = "") -> Path:
    directory = Path(directory)
    tensors = {name: t.contiguous().cpu() for name, t in adapter_state_dict(model).items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "base_model": base_model})
    config = OmegaConf.to_container(OmegaConf.structured(adapter), resolve=True)
    write_json_atomic(directory / CONFIG, {"base_model": base_model, "adapter": config})
    return directory


def load_adapter(model: nn.Module, directory: Path) -> Adapter:
    """Freeze ``model``, inject the saved adapter and load its weights (all keys must match)."""
    directory = Path(directory)
    saved = json.loads((directory / CONFIG).read_text())["adapter"]
    adapter = build_adapter(OmegaConf.merge(OmegaConf.structured(_class_of(saved)), saved))
    freeze(model)
    adapter.inject(model)
    tensors = load_file(str(directory / WEIGHTS))
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        raise ValueError(
            f"{directory / WEIGHTS}: tensors do not match the injected adapter "
            f"(missing {sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]})"
        )
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        params[name].data.copy_(tensor)
    return adapter


def _class_of(saved: dict) -> type:
    from hydra.utils import get_class

    return get_class(saved["_target_"])
