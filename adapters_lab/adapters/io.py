"""Adapter files: checkpoints and the export formats, written from what each method reports.

- ``save_adapter`` / ``load_adapter``: the trainable tensors as safetensors plus the adapter's
  config, never the base model. Loading re-injects the same adapter into a fresh base and
  copies the tensors back, so outputs reproduce exactly.
- ``export_peft``: the method's ``peft_export`` (tensors and config) in HF PEFT's on-disk format
  (``adapter_config.json`` + ``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained(base, path)``
  gives the same logits. PEFT itself is not needed to write it.
- ``write_exports``: ``export.peft`` and ``export.merged`` (the method's ``merge``) of a finished run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from adapters_lab.adapters.base import Adapter, AdapterConfigError, adapter_state_dict, build_adapter, freeze
from adapters_lab.adapters.registry import adapter_class, capable, schema
from adapters_lab.files import atomic_path, write_json_atomic

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(tmp), metadata=metadata)


def save_adapter(model: nn.Module, adapter: Adapter, directory: Path, base_model: str = "") -> Path:
    directory = Path(directory)
    _save_tensors(adapter_state_dict(model), directory / WEIGHTS, {"format": "pt", "base_model": base_model})
    config = OmegaConf.to_container(OmegaConf.structured(adapter), resolve=True)
    write_json_atomic(directory / CONFIG, {"base_model": base_model, "adapter": config})
    return directory


def load_adapter(model: nn.Module, directory: Path, tokenizer: Any = None) -> Adapter:
    """Freeze ``model``, inject the saved adapter and load its weights (all keys must match)."""
    directory = Path(directory)
    saved = json.loads((directory / CONFIG).read_text())["adapter"]
    adapter = build_adapter(OmegaConf.merge(schema(adapter_class(saved["_target_"])), saved))
    adapter.prepare_load()
    freeze(model)
    adapter.inject(model, tokenizer)
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


def check_export(adapter: Adapter, peft: bool, merged: bool) -> None:
    """Before any weight loads: refuse an export the method does not have."""
    if peft and not adapter.can_export_peft():
        raise AdapterConfigError(f"export.peft=true: adapter={adapter.name} has no HF PEFT export "
                                 f"({', '.join(capable('export_peft'))} have one)")
    if merged and not adapter.can_merge():
        raise AdapterConfigError(f"export.merged=true: adapter={adapter.name} cannot be merged into the weights "
                                 f"({', '.join(capable('merge'))} can)")


def export_peft(model: nn.Module, adapter: Adapter, directory: Path, base_model: str = "") -> Path:
    """Write ``adapter``'s weights from ``model`` in HF PEFT's on-disk format."""
    directory = Path(directory)
    tensors, method_config = adapter.peft_export(model)
    config = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "inference_mode": True,
              "revision": None, **method_config}
    _save_tensors(tensors, directory / WEIGHTS, {"format": "pt"})
    write_json_atomic(directory / CONFIG, config)
    return directory


def save_base_model(model: nn.Module, tokenizer: Any, directory: Path) -> Path:
    """The (random-init) base with its tokenizer, so a saved or exported adapter can be loaded elsewhere."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_exports(model: nn.Module, adapter: Adapter, out_dir: Path, export: Any, base_model: str = "") -> None:
    """``export.peft`` -> ``peft_adapter/``; ``export.merged`` -> ``merged_model/`` (last: it merges in place)."""
    out_dir = Path(out_dir)
    if export.peft:
        export_peft(model, adapter, out_dir / "peft_adapter", base_model)
    if export.merged:
        adapter.merge(model).save_pretrained(out_dir / "merged_model")
