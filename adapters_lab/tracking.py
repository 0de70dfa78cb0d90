"""Experiment tracking: W&B (online, offline or disabled) or nothing. Only the main process logs."""

from __future__ import annotations

import logging
import os
from typing import Any

from adapters_lab.config import LoggerConfig, WandbMode

log = logging.getLogger(__name__)


class NullTracker:
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, cfg: LoggerConfig, config: dict, run_dir: str, default_name: str):
        import wandb

        mode = WandbMode(cfg.mode)
        if mode == WandbMode.auto:
            has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
            mode = WandbMode.online if has_key else WandbMode.offline
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, job_type=cfg.job_type,
            name=cfg.name or default_name, tags=list(cfg.tags), config=config, dir=run_dir,
            mode=mode.value, reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


def make_tracker(cfg: LoggerConfig, config: dict, run_dir: str, default_name: str, is_main: bool = True):
    if not is_main or cfg.backend == "none":
        return NullTracker()
    if cfg.backend == "wandb":
        return WandbTracker(cfg, config, run_dir, default_name)
    raise ValueError(f"logger.backend={cfg.backend!r}: expected none or wandb")


def flatten(tree: dict, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """{"eval": {"gsm8k": {"accuracy": 1}}} -> {"eval/gsm8k/accuracy": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat
