"""Checks on the composed config that need no weights, run before any weight loads.

:func:`check_on_skeleton`: the model built on the meta device from its config (``AutoConfig``; tiny
and random-init models from their own config) with the adapter injected, so placement, module names,
layer counts and the attention implementation fail before a 7B load; its tokenizer tokenises the data.

:func:`check_known_keys`: Hydra's ``+key=value`` appends a key even into a node typed by a dataclass
schema (``+adapter.rnak=4`` would train the default rank and exit 0); every key must be a field of its
node's schema, except inside free-form fields (dicts such as ``adapter.rank_pattern``). A key that moved to
another group (``config.MOVED_KEYS``) is named with its new place, by :func:`check_moved_overrides` too,
which ``run.py`` calls on the command line before Hydra composes.
"""

from __future__ import annotations

import dataclasses
import difflib
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from adapters_lab.adapters import count_parameters, freeze
from adapters_lab.config import MOVED_KEYS, BasePrecision, Config, ModelInit, ModelKind
from adapters_lab.files import OutputDirError
from adapters_lab.models import build_model, ensure_pad_token, torch_dtype
from adapters_lab.training.speed.fp8 import fp8_config_refusal, fp8_shape_refusal


class ConfigKeyError(KeyError):
    """A key that no schema declares; shown as one line."""

    def __str__(self) -> str:
        return str(self.args[0])


def unknown_keys(node: DictConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, the fields its schema has) for every key of ``node`` its dataclass does not declare."""
    found = []
    schema = OmegaConf.get_type(node)
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        if key == "hydra" and not prefix:
            continue
        path = f"{prefix}{key}"
        if fields is not None and key not in fields:
            found.append((path, fields))
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found.extend(unknown_keys(child, f"{path}."))
    return found


def moved_message(key: str, value: str | None = None) -> str:
    """One line for a key that moved to another group: its new name, and the override to write."""
    new = MOVED_KEYS[key]
    return f"{key}: moved to {new} (write {new}={value if value is not None else '...'})"


def check_moved_overrides(overrides: list[str]) -> None:
    """Raise :class:`ConfigKeyError` for a command-line override of a moved key (``trainer.val_set_size=0``,
    ``+``, ``++`` or ``~`` too), before Hydra's composition fails on it in several lines."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in MOVED_KEYS:
            raise ConfigKeyError(moved_message(key, value or None))


def check_known_keys(cfg: DictConfig) -> None:
    """Raise :class:`ConfigKeyError` naming the first key no schema declares, with the closest field
    (a moved key: with its new name)."""
    unknown = unknown_keys(cfg)
    if unknown:
        path, fields = unknown[0]
        if path in MOVED_KEYS:
            raise ConfigKeyError(moved_message(path, str(OmegaConf.select(cfg, path))))
        close = difflib.get_close_matches(path.rsplit(".", 1)[-1], fields, n=1)
        hint = f"; did you mean {path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{close[0]}?" if close else ""
        more = f" (and {len(unknown) - 1} more: {', '.join(p for p, _ in unknown[1:])})" if len(unknown) > 1 else ""
        raise ConfigKeyError(f"{path}: no such config key (appended with '+'?){hint}{more}")


class SettingError(ValueError):
    """A setting the model or data cannot take, found before any weight loads; shown as one line."""


def check_settings(cfg: Config) -> None:
    """Values no schema type can rule out."""
    if cfg.dataset.cutoff_len < 8:
        raise SettingError(f"dataset.cutoff_len={cfg.dataset.cutoff_len}: must be at least 8 tokens "
                           "(the prompt and answer are cut to it; the paper uses 256)")
    reason = fp8_config_refusal(cfg.model, cfg.trainer)
    if reason:
        raise SettingError(reason)


def meta_skeleton(model_cfg) -> tuple[nn.Module, object] | None:
    """(model on the meta device, tokenizer) from the model's config alone: no weights read or allocated;
    None for image-text models (their checks are their builder's)."""
    if model_cfg.kind == ModelKind.image_text:
        return None
    if model_cfg.local_path and not Path(model_cfg.local_path).is_dir():  # else taken for a hub id
        raise SettingError(f"model={model_cfg.name}: model.local_path={model_cfg.local_path} is not a folder")
    try:
        if model_cfg.tiny is not None or model_cfg.init == ModelInit.random:
            with torch.device("meta"):
                return build_model(model_cfg, "meta")
        return _pretrained_skeleton(model_cfg)
    except OSError as err:  # a hub id with no network and no cache, a missing or broken folder
        source = (f"model.local_path={model_cfg.local_path}" if model_cfg.local_path
                  else f"model.hub_id={model_cfg.hub_id}")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SettingError(f"model={model_cfg.name}: {source}: cannot read its config or tokenizer ({first}); "
                           "with no network, set model.local_path=/folder/with/config.json") from None
    except ValueError as err:  # e.g. an attention implementation the architecture does not have
        if isinstance(err, SettingError):
            raise
        first = str(err).strip().splitlines()[0].split(". ")[0]
        raise SettingError(f"model={model_cfg.name} (model.attn_implementation={model_cfg.attn_implementation}): "
                           f"{first}") from None


def _pretrained_skeleton(model_cfg) -> tuple[nn.Module, object]:
    source = model_cfg.local_path or model_cfg.hub_id
    if not source:
        raise SettingError(f"model={model_cfg.name}: set model.local_path or model.hub_id")
    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    config = AutoConfig.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    ensure_pad_token(tokenizer, model_cfg.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=model_cfg.attn_implementation,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    return model, tokenizer


def check_on_skeleton(cfg: Config, adapter) -> tuple[dict, object] | None:
    """The adapter placed on the meta skeleton (placement against the architecture's layers and module
    names, the attention implementation, the method on this architecture): (parameter counts, tokenizer)."""
    skeleton = meta_skeleton(cfg.model)
    if skeleton is None:
        return None
    model, tokenizer = skeleton
    freeze(model)
    adapter.inject(model, tokenizer)
    if cfg.model.base_precision == BasePrecision.fp8 and adapter.trains:
        reason = fp8_shape_refusal(model)  # the layers' shapes, from the skeleton: before any weight loads
        if reason:
            raise SettingError(f"model.base_precision=fp8: {reason}")
    return count_parameters(model), tokenizer


def space_needed(cfg: Config, params: dict, eval_examples: int) -> int:
    """Bytes the run will write, roughly: fp32 adapter weights, checkpoints (weights and AdamW's two moments,
    ``keep_checkpoints`` + 1 while the newest is written before the oldest goes), exports, the tiny model's
    base weights, predictions (4 KB an example covers prompt, output and parse)."""
    trainable, total = params["trainable"], params["total"]
    base_bytes = total * torch_dtype(cfg.model.dtype).itemsize
    needed = trainable * 4 + eval_examples * 4096
    if trainable:
        needed += trainable * 12 * (cfg.trainer.keep_checkpoints + 1)
        needed += trainable * 4 * cfg.export.peft + base_bytes * cfg.export.merged
        needed += base_bytes if cfg.model.tiny is not None else 0
    return needed


def check_space(folder, cfg: Config, params: dict, eval_examples: int) -> None:
    """Fail at start when the output folder's disk cannot take what the run will write."""
    needed = space_needed(cfg, params, eval_examples)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputDirError(f"paths.output_dir={folder}: the run will write about {needed / 2**20:,.1f} MiB "
                             f"(adapter, checkpoints, predictions), {free / 2**20:,.1f} MiB free")
