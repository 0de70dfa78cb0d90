"""Experiment tracking: W&B (online, offline or disabled) or nothing. Only the main process logs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from adapters_lab.config import LoggerBackend, LoggerConfig, WandbMode

log = logging.getLogger(__name__)


PREDICTION_COLUMNS = ("dataset", "prompt", "output", "label", "prediction", "correct")


class NullTracker:
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_predictions(self, predictions_dir: Path, per_set: int = 20) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, cfg: LoggerConfig, config: dict, run_dir: str, default_name: str):
        import wandb

        mode = cfg.mode
        if mode == WandbMode.auto:
            has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
            mode = WandbMode.online if has_key else WandbMode.offline
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group or default_group(), job_type=cfg.job_type,
            name=cfg.name or default_name, tags=list(cfg.tags), config=config, dir=run_dir,
            mode=mode.value, reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_predictions(self, predictions_dir: Path, per_set: int = 20) -> None:
        """The first ``per_set`` predictions of each evaluation set as one W&B Table."""
        import wandb

        table = wandb.Table(columns=list(PREDICTION_COLUMNS))
        for path in sorted(Path(predictions_dir).glob("*.jsonl")):
            with path.open(encoding="utf-8") as lines:
                for _, line in zip(range(per_set), lines):
                    row = json.loads(line)
                    table.add_data(*(str(row.get(column)) for column in PREDICTION_COLUMNS))
        self.run.log({"eval/predictions": table})

    def summary(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


def default_group() -> str | None:
    """W&B group when ``logger.group`` is unset: the sweep, search or experiment chosen, else a
    multirun's folder name, so the runs of one sweep sit together."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    for group in ("sweep", "hparams_search", "experiment"):
        if hydra.runtime.choices.get(group) not in (None, "null"):
            return str(hydra.runtime.choices[group])
    return Path(hydra.sweep.dir).name if hydra.mode == RunMode.MULTIRUN else None


def make_tracker(cfg: LoggerConfig, config: dict, run_dir: str, default_name: str, is_main: bool = True):
    if not is_main or cfg.backend == LoggerBackend.none:
        return NullTracker()
    if cfg.backend == LoggerBackend.wandb:
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
