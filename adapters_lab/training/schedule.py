"""The learning-rate schedule: linear warm-up (``trainer.warmup_steps``, or ``trainer.warmup_ratio``
of the run's optimiser steps as HF's ``warmup_ratio``), then linear/cosine decay or constant
(transformers' ``get_scheduler``); and warnings, with the numbers, for a recipe whose warm-up
does not fit the run."""

from __future__ import annotations

import logging
import math

from transformers import get_scheduler

from adapters_lab.config import TrainerConfig

log = logging.getLogger(__name__)


def warmup_steps(cfg: TrainerConfig, updates: int) -> int:
    """Warm-up steps as configured (not yet capped at the run's length)."""
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * updates)
    return cfg.warmup_steps


def warmup_warnings(cfg: TrainerConfig, updates: int, micro_per_epoch: int, accumulation: int) -> list[str]:
    """What is wrong with the warm-up of a run of ``updates`` optimiser steps, with the numbers:
    longer than the run, so the learning rate never reaches ``trainer.lr``; from epochs, too few
    steps for it."""
    warmup = warmup_steps(cfg, updates)
    if warmup < updates or warmup == 0:
        return []
    source = (f"trainer.warmup_ratio={cfg.warmup_ratio} ({warmup} steps)" if cfg.warmup_ratio is not None
              else f"trainer.warmup_steps={warmup}")
    peak = cfg.lr * (updates - 1) / updates  # the warm-up is cut to the run's length; the last step's rate
    messages = [f"{source}: warm-up not shorter than the run's {updates} optimiser steps; the learning rate "
                f"peaks at {peak:.3g} on the last step and never reaches trainer.lr={cfg.lr:g}"]
    if cfg.max_steps <= 0:
        messages.append(
            f"trainer.epochs={cfg.epochs:g} gives {updates} optimiser steps ({micro_per_epoch} micro-batches per "
            f"epoch, {accumulation} per step), fewer than the {warmup} warm-up steps; lower trainer.warmup_steps "
            "or set trainer.warmup_ratio")
    return messages


def make_scheduler(cfg: TrainerConfig, optimizer, updates: int, micro_per_epoch: int, accumulation: int):
    """The run's scheduler, after warning about a warm-up that does not fit it."""
    for message in warmup_warnings(cfg, updates, micro_per_epoch, accumulation):
        log.warning("%s", message)
    return get_scheduler(cfg.schedule.value, optimizer, num_training_steps=updates,
                         num_warmup_steps=min(warmup_steps(cfg, updates), updates))
