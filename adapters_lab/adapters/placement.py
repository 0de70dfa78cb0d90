"""The one place that maps placement words to modules, for every architecture.

Generic names (``q k v o gate up down``, ``qkv`` for fused projections, ``attn`` / ``mlp``
for whole sublayers) are looked up per ``model_type`` in :data:`ARCHITECTURES`; any other
entry is a raw module-name suffix (PEFT's list semantics); ``regex`` is a full match over
module names (PEFT's string semantics). The search is confined to the language model
(``model.get_decoder()``), so a multimodal model's vision tower is never adapted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from adapters_lab.adapters.base import AdapterConfigError, Placement

_LLAMA_LIKE = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
    "attn": "self_attn",
    "mlp": "mlp",
}


@dataclass(frozen=True)
class Architecture:
    """How one model family names its decoder layers and the modules inside a layer."""

    layers: str  # attribute of the decoder (``model.get_decoder()``) holding the layer list
    modules: dict[str, str] = field(default_factory=dict)  # generic name -> path inside a layer
    fused_qkv: bool = False  # q, k and v share one projection
    # Sublayers that add the residual inside their own forward (BLOOM): a series adapter "after" such a
    # sublayer goes on the output of the projection named here, the last op before the residual add.
    series_sites: dict[str, str] = field(default_factory=dict)


ARCHITECTURES: dict[str, Architecture] = {
    **{t: Architecture("layers", _LLAMA_LIKE) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                                                "qwen2_vl_text")},
    "opt": Architecture(
        "layers",
        {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
         "o": "self_attn.out_proj", "up": "fc1", "down": "fc2", "attn": "self_attn"},
    ),
    "gptj": Architecture(
        "h",
        {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.out_proj",
         "up": "mlp.fc_in", "down": "mlp.fc_out", "attn": "attn", "mlp": "mlp"},
    ),
    "gpt2": Architecture(
        "h",
        {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj",
         "attn": "attn", "mlp": "mlp"},
        fused_qkv=True,
    ),
    "bloom": Architecture(
        "h",
        {"qkv": "self_attention.query_key_value", "o": "self_attention.dense",
         "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h", "attn": "self_attention", "mlp": "mlp"},
        fused_qkv=True,
        series_sites={"attn": "o", "mlp": "down"},
    ),
    "gpt_neox": Architecture(
        "layers",
        {"qkv": "attention.query_key_value", "o": "attention.dense",
         "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h", "attn": "attention", "mlp": "mlp"},
        fused_qkv=True,
    ),
}
GENERIC_NAMES = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "attn", "mlp")


@dataclass
class Target:
    """One selected module: its full name, the module, its layer index and the word that chose it."""

    name: str
    module: nn.Module
    layer: int | None
    key: str


def model_type(model: nn.Module) -> str:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text_config.model_type


def architecture(model: nn.Module) -> Architecture | None:
    return ARCHITECTURES.get(model_type(model))


def decoder_layers(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """The language model and its list of decoder layers."""
    decoder = model.get_decoder()
    arch = architecture(model)
    if arch is not None:
        return decoder, list(getattr(decoder, arch.layers))
    lists = [m for m in decoder.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise AdapterConfigError(f"model_type {model_type(model)!r}: no decoder layer list found")
    return decoder, list(max(lists, key=len))


def parse_layers(spec: Any, exclude: list[int], num_layers: int, key: str) -> list[int]:
    """``all`` | int | list of ints | ``start:stop`` -> sorted layer indices, checked against the model."""
    if spec is None or spec == "all":
        chosen = list(range(num_layers))
    elif isinstance(spec, int):
        chosen = [spec]
    elif isinstance(spec, str) and re.fullmatch(r"-?\d*:-?\d*", spec.strip()):
        start, stop = (int(s) if s else None for s in spec.split(":"))
        chosen = list(range(num_layers))[slice(start, stop)]
    elif isinstance(spec, (list, tuple)) or hasattr(spec, "__iter__") and not isinstance(spec, str):
        chosen = [int(i) for i in spec]
    else:
        raise AdapterConfigError(f"{key}.layers={spec!r}: expected 'all', an index, a list or 'start:stop'")
    for name, indices in (("layers", chosen), ("exclude_layers", exclude)):
        bad = [i for i in indices if not 0 <= i < num_layers]
        if bad:
            raise AdapterConfigError(
                f"{key}.{name}={list(indices)}: layer {bad[0]} is out of range 0..{num_layers - 1}"
            )
    layers = sorted(set(chosen) - set(exclude))
    if not layers:
        raise AdapterConfigError(f"{key}: layers={spec!r} minus exclude_layers={list(exclude)} leaves no layer")
    return layers


def _inner_names(layer: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in layer.named_modules() if name}


def select_modules(model: nn.Module, placement: Placement, key: str = "adapter.placement") -> list[Target]:
    """Resolve a placement to modules, or raise AdapterConfigError naming the key and value."""
    decoder, layers = decoder_layers(model)
    full_names = {id(m): n for n, m in model.named_modules()}
    layer_prefix = {i: full_names[id(layer)] for i, layer in enumerate(layers)}
    selected = parse_layers(placement.layers, list(placement.exclude_layers), len(layers), key)
    arch = architecture(model)
    targets: dict[str, Target] = {}

    if placement.regex:
        pattern = re.compile(placement.regex)
        for i in selected:
            for inner, module in _inner_names(layers[i]).items():
                name = f"{layer_prefix[i]}.{inner}"
                if pattern.fullmatch(name):
                    targets[name] = Target(name, module, i, placement.regex)
        if not targets:
            raise AdapterConfigError(
                f"{key}.regex={placement.regex!r} matches no module in layers {selected}; "
                f"layer {selected[0]} has: {sorted(_inner_names(layers[selected[0]]))}"
            )
        return list(targets.values())

    for word in placement.modules:
        found = 0
        for i in selected:
            inner_modules = _inner_names(layers[i])
            if word in GENERIC_NAMES:
                path = _generic_path(arch, word, model, inner_modules, key)
                matches = {path: inner_modules[path]}
            else:
                matches = {n: m for n, m in inner_modules.items() if n == word or n.endswith("." + word)}
            for inner, module in matches.items():
                name = f"{layer_prefix[i]}.{inner}"
                targets.setdefault(name, Target(name, module, i, word))
                found += 1
        if not found:
            sample = sorted(_inner_names(layers[selected[0]]))
            raise AdapterConfigError(
                f"{key}.modules: {word!r} matches no module of {model_type(model)} "
                f"in layers {selected}; a layer has: {sample}"
            )
    return list(targets.values())


def _generic_path(arch: Architecture | None, word: str, model: nn.Module,
                  inner_modules: dict[str, nn.Module], key: str) -> str:
    if arch is None:
        raise AdapterConfigError(
            f"{key}.modules: generic name {word!r} needs a placement map, and model_type "
            f"{model_type(model)!r} has none (known: {sorted(ARCHITECTURES)}); name modules directly, "
            f"e.g. one of {sorted(inner_modules)}"
        )
    if arch.fused_qkv and word in ("q", "k", "v"):
        word = "qkv"  # one fused projection serves q, k and v
    path = arch.modules.get(word)
    if path is None:
        raise AdapterConfigError(
            f"{key}.modules: {word!r} does not exist in {model_type(model)} "
            f"(it has: {sorted(arch.modules)})"
        )
    return path


def matches(pattern: str, target: Target) -> bool:
    """A per-module override key matches a target by generic name, name suffix or full-match regex."""
    return (pattern == target.key or target.name.endswith("." + pattern)
            or re.fullmatch(pattern, target.name) is not None)


def pattern_value(patterns: dict[str, Any], target: Target, default: Any) -> Any:
    """The value of the first key of ``patterns`` matching ``target`` (``rank_pattern`` semantics), else ``default``."""
    for pattern, value in patterns.items():
        if matches(pattern, target):
            return value
    return default


def check_patterns(patterns: dict[str, Any], targets: list[Target], key: str) -> None:
    """Every override key must match at least one selected module, else it is a typo."""
    for pattern in patterns:
        if not any(matches(pattern, t) for t in targets):
            raise AdapterConfigError(
                f"{key}.{pattern}: matches none of the adapted modules {sorted({t.key for t in targets})}"
            )


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) of the language model, for per-layer key/value prefixes."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def series_site(model: nn.Module, sublayer: str) -> str:
    """The placement word a series adapter after ``sublayer`` (``attn``/``mlp``) attaches to."""
    arch = architecture(model)
    return arch.series_sites.get(sublayer, sublayer) if arch is not None else sublayer
