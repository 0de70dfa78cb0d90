"""A paper model from its known shape with random weights (``model.init=random``): nothing is
downloaded, so a whole table can be timed on the real shapes without the weights.

The shape comes from ``model.arch`` (each paper model's ``conf/model/*.yaml`` holds its
``config.json`` facts); the tokenizer from ``model.local_path`` when one is given, else the local
byte-level BPE (the caller's choice, ``causal_lm.build_model``). Random weights cost the same FLOPs
and memory as real ones, but the model never learns to stop: generations run to their budget.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn as nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from adapters_lab.config import ArchConfig

log = logging.getLogger(__name__)

# ArchConfig's common names under each model type's own config key (the rest are the same).
RENAMES = {
    "gptj": {"intermediate_size": "n_inner", "norm_eps": "layer_norm_epsilon"},
    "bloom": {"norm_eps": "layer_norm_epsilon"},
}
DEFAULT_RENAMES = {"norm_eps": "rms_norm_eps"}


def arch_config_kwargs(arch: ArchConfig, model_name: str) -> dict:
    """``arch`` as keyword arguments of its model type's transformers config; a key that type does
    not take fails naming it (BLOOM, say, has no intermediate_size: its MLP is 4 x hidden)."""
    if arch.model_type not in CONFIG_MAPPING:
        raise ValueError(f"model={model_name}: model.arch.model_type={arch.model_type!r} is not a transformers "
                         "model type")
    config_class = CONFIG_MAPPING[arch.model_type]
    accepted = set(inspect.signature(config_class.__init__).parameters) | set(config_class.attribute_map)
    accepted |= {"rope_theta"} if "rope_parameters" in accepted else set()
    renames = RENAMES.get(arch.model_type, DEFAULT_RENAMES)
    kwargs = {}
    for key in ArchConfig.__dataclass_fields__:
        value = getattr(arch, key)
        if key == "model_type" or value is None:
            continue
        name = renames.get(key, key)
        if name not in accepted:
            raise ValueError(f"model={model_name}: model.arch.{key} is not a key of {arch.model_type} configs")
        kwargs[name] = value
    if arch.hidden_size % arch.num_attention_heads:
        raise ValueError(f"model={model_name}: model.arch.hidden_size={arch.hidden_size} is not a multiple of "
                         f"num_attention_heads={arch.num_attention_heads}")
    return kwargs


def build_random_model(arch: ArchConfig | None, model_name: str, tokenizer, dtype: torch.dtype,
                       attn_implementation: str, device: torch.device | str | None = None) -> nn.Module:
    """The architecture ``arch`` with transformers' own random init, built in ``dtype`` directly on
    ``device`` (a 7B model initialises in seconds on a GPU, minutes on a CPU; ``meta``: no memory)."""
    if arch is None:
        raise ValueError(f"model={model_name}: model.init=random needs model.arch (the architecture's shape)")
    kwargs = arch_config_kwargs(arch, model_name)
    if len(tokenizer) > arch.vocab_size:
        raise ValueError(f"model={model_name}: the tokenizer has {len(tokenizer)} tokens, more than "
                         f"model.arch.vocab_size={arch.vocab_size}")
    config = CONFIG_MAPPING[arch.model_type](
        **kwargs, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    log.info("model=%s: random init (%s, %s parameters) on %s", model_name, arch.model_type,
             f"{sum(p.numel() for p in model.parameters()):,}", device or "cpu")
    return model
