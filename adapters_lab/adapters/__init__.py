"""Adapter families, one file each, registered in ``registry.py``; ``base.py`` is the interface."""

from adapters_lab.adapters.base import (
    Adapter,
    AdapterConfigError,
    InjectionReport,
    NoAdapter,
    Placement,
    adapter_state_dict,
    build_adapter,
    count_parameters,
    freeze,
)

__all__ = [
    "Adapter",
    "AdapterConfigError",
    "InjectionReport",
    "NoAdapter",
    "Placement",
    "adapter_state_dict",
    "build_adapter",
    "count_parameters",
    "freeze",
]
