"""The composed config as typed objects, converted once.

``pipeline.run`` turns the composed DictConfig into the ``Config`` dataclass (every group its schema's
dataclass, every choice an enum member, ``adapter`` an instance of its class) at its top, and passes
those objects down: no code below it reads a choice as a string. :func:`typed` is the one converter at
the other boundary, for dataclasses built with strings (``TrainerConfig(batching="packed")``, as tests
and scripts do): it puts enum members in their enum fields, or names the key in one line.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from enum import Enum
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf, open_dict

from adapters_lab.config import Config

T = TypeVar("T")


class ConfigValueError(ValueError):
    """A choice that is not one of its enum's members; the message names the key."""


def enum_member(key: str, kind: type[Enum], value, error: type[Exception] = ConfigValueError) -> Enum:
    """``value`` as a member of ``kind`` (by value or by name), or a one-line ``error`` naming ``key``."""
    if isinstance(value, kind):
        return value
    for member in kind:
        if value in (member.value, member.name):
            return member
    raise error(f"{key}={value!r}: expected one of {', '.join(m.name for m in kind)}")


def typed(node: T | DictConfig, prefix: str, error: type[Exception] = ConfigValueError) -> T:
    """``node`` as its schema's dataclass with enum members in its enum fields and its nested dataclasses'
    (a DictConfig through ``OmegaConf.to_object``, which keeps them members); ``prefix``: its dotted key."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_object(node)
    hints = typing.get_type_hints(type(node))
    changes = {}
    for field in dataclasses.fields(node):
        value, hint = getattr(node, field.name), hints[field.name]
        if isinstance(hint, type) and issubclass(hint, Enum):
            changes[field.name] = enum_member(f"{prefix}.{field.name}", hint, value, error)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[field.name] = typed(value, f"{prefix}.{field.name}", error)
    return dataclasses.replace(node, **changes) if changes else node


def typed_config(cfg: DictConfig) -> Config:
    """The composed config (``conf/config.yaml`` on ``config_schema``) as a ``Config``, resolved: done once,
    at the top of ``pipeline.run``. Hydra's own node, where a caller composed it in, is left out."""
    if "hydra" in cfg:
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    config = OmegaConf.to_object(cfg)
    if not isinstance(config, Config):
        raise TypeError(f"typed_config: the composed config is a {type(config).__name__}, not a Config "
                        "(compose conf/config.yaml, whose defaults start with config_schema)")
    return config
