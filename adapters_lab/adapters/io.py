"""Adapter checkpoints, merging and HF PEFT export.

- ``save_adapter`` / ``load_adapter``: the trainable tensors as safetensors plus the adapter's
  config, never the base model. Loading re-injects the same adapter into a fresh base and
  copies the tensors back, so outputs reproduce exactly.
- ``merge_adapter``: folds LoRA, DoRA and IA3 into the base weights (a plain model for deployment).
- ``export_peft``: LoRA, DoRA, IA3 and prompt tuning in HF PEFT's format (``adapter_config.json``
  + ``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained(base, path)`` gives the
  same logits. PEFT itself is not needed to write it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from adapters_lab.adapters.base import Adapter, AdapterConfigError, adapter_state_dict, build_adapter, freeze
from adapters_lab.adapters.ia3 import IA3, IA3Linear
from adapters_lab.adapters.lora import LoRA, LoRALinear, replace_module
from adapters_lab.adapters.placement import kv_shape
from adapters_lab.adapters.prompt import MODULE_NAME as PROMPT_MODULE
from adapters_lab.adapters.prompt import PromptTuning
from adapters_lab.files import atomic_path, write_json_atomic

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MERGEABLE = (LoRA, IA3)
PEFT_EXPORTABLE = (LoRA, IA3, PromptTuning)


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
    adapter = build_adapter(OmegaConf.merge(OmegaConf.structured(_class_of(saved)), saved))
    if isinstance(adapter, PromptTuning):
        adapter.init = type(adapter.init).random  # the saved embedding replaces any init; no tokenizer needed
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


def _class_of(saved: dict) -> type:
    from hydra.utils import get_class

    return get_class(saved["_target_"])


def check_export(adapter: Adapter, peft: bool, merged: bool) -> None:
    """Before any weight loads: refuse an export the method does not have."""
    if peft and not isinstance(adapter, PEFT_EXPORTABLE):
        raise AdapterConfigError(
            f"export.peft=true: adapter={adapter.name} has no HF PEFT export (LoRA, DoRA, IA3 and prompt tuning do)"
        )
    if merged and not isinstance(adapter, MERGEABLE):
        raise AdapterConfigError(
            f"export.merged=true: adapter={adapter.name} cannot be merged into the weights (LoRA, DoRA and IA3 can)"
        )


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every LoRA/DoRA/IA3 layer into its base weight and drop the adapter modules (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoRALinear, IA3Linear)):
            replace_module(model, name, module.merged())
    return model


def _names_regex(names: list[str]) -> str:
    """A full-match regex naming exactly these modules (PEFT's string form of ``target_modules``)."""
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def export_peft(model: nn.Module, adapter: Adapter, directory: Path, base_model: str = "") -> Path:
    """Write ``adapter``'s weights from ``model`` in HF PEFT's on-disk format."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "inference_mode": True,
              "revision": None}
    if isinstance(adapter, LoRA):
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        for name, layer in layers.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.weight
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.weight
            if layer.lora_magnitude_vector is not None:
                tensors[f"base_model.model.{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
        config = {**common, "peft_type": "LORA", "r": adapter.rank, "lora_alpha": adapter.alpha,
                  "lora_dropout": adapter.dropout, "use_rslora": adapter.use_rslora, "use_dora": adapter.use_dora,
                  "target_modules": _names_regex(list(layers)), "bias": "none", "init_lora_weights": True,
                  "rank_pattern": {re.escape(n): l.rank for n, l in layers.items() if l.rank != adapter.rank},
                  "alpha_pattern": {},
                  "fan_in_fan_out": any(isinstance(l.base_layer, Conv1D) for l in layers.values())}
    elif isinstance(adapter, IA3):
        layers = {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}
        for name, layer in layers.items():
            shape = (1, -1) if layer.feedforward else (-1, 1)
            tensors[f"base_model.model.{name}.ia3_l"] = layer.ia3_l.reshape(shape)
        config = {**common, "peft_type": "IA3", "target_modules": _names_regex(list(layers)),
                  "feedforward_modules": _names_regex([n for n, l in layers.items() if l.feedforward]),
                  "init_ia3_weights": True,
                  "fan_in_fan_out": any(isinstance(l.base_layer, Conv1D) for l in layers.values())}
    elif isinstance(adapter, PromptTuning):
        tensors["prompt_embeddings"] = model.get_submodule(PROMPT_MODULE).embedding.weight
        num_layers, _, _ = kv_shape(model)
        text_config = model.config.get_text_config()
        config = {**common, "peft_type": "PROMPT_TUNING", "num_virtual_tokens": adapter.num_virtual_tokens,
                  "token_dim": model.get_input_embeddings().embedding_dim, "num_transformer_submodules": 1,
                  "num_attention_heads": text_config.num_attention_heads, "num_layers": num_layers,
                  "prompt_tuning_init": "RANDOM"}
    else:
        raise AdapterConfigError(f"export.peft=true: adapter={adapter.name} has no HF PEFT export")
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
        merge_adapter(model).save_pretrained(out_dir / "merged_model")
