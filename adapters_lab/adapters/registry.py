"""The adapter registry: every family's class, registered once (HF PEFT's ``register_peft_method``).

Hydra's schemas (``schema/adapter/<Class>``, with ``_target_`` filled in) and the class of a saved
adapter both come from here, so a ``conf/adapter/<name>.yaml`` names its class once, in its defaults
list. A new family: one file under ``adapters/`` and one line in the tuple below.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from adapters_lab.adapters.base import Adapter, AdapterConfigError, NoAdapter, build_adapter
from adapters_lab.adapters.bottleneck import Bottleneck
from adapters_lab.adapters.ia3 import IA3
from adapters_lab.adapters.lora import LoRA
from adapters_lab.adapters.prefix import PrefixTuning
from adapters_lab.adapters.prompt import PromptTuning

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Add an Adapter subclass under its class name (the name of its Hydra schema)."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"register_adapter: {cls!r} is not an Adapter subclass")
    if ADAPTERS.get(cls.__name__, cls) is not cls:
        raise ValueError(f"register_adapter: {cls.__name__} is already registered as {target(ADAPTERS[cls.__name__])}")
    ADAPTERS[cls.__name__] = cls
    return cls


for _family in (NoAdapter, LoRA, IA3, Bottleneck, PrefixTuning, PromptTuning):
    register_adapter(_family)


def target(cls: type[Adapter]) -> str:
    """The import path written as ``_target_`` in composed and saved configs."""
    return f"{cls.__module__}.{cls.__qualname__}"


def adapter_class(name: str) -> type[Adapter]:
    """A registered class by class name or by ``_target_`` path (a saved adapter's config)."""
    for cls_name, cls in ADAPTERS.items():
        if name in (cls_name, target(cls)):
            return cls
    raise AdapterConfigError(f"adapter._target_={name!r}: not a registered adapter class (known: {sorted(ADAPTERS)})")


def schema(cls: type[Adapter]) -> DictConfig:
    """The class as a structured config node with its ``_target_`` filled in."""
    node = OmegaConf.structured(cls)
    node._target_ = target(cls)
    return node


def capable(ability: str) -> list[str]:
    """Registered classes that can ``merge`` or ``export_peft``, for error messages."""
    return [name for name, cls in ADAPTERS.items() if getattr(cls, f"can_{ability}")()]


def adapter_from_file(name: str, overrides: dict[str, Any] | None = None) -> Adapter:
    """``conf/adapter/<name>.yaml`` as an instance outside a Hydra app (benchmark scripts), composed by
    Hydra as ``adapter=<name>`` would be, then ``overrides`` merged in."""
    from hydra import compose, initialize_config_dir

    from adapters_lab.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        node = compose("config", overrides=[f"adapter={name}"]).adapter
    return build_adapter(OmegaConf.merge(node, overrides or {}))
