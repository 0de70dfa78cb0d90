"""Trainer options checked once, before any weight loads, and turned into objects: the typed
config (enums), gradient accumulation, the resume choice; the device and precision of the
accelerator, worked out once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from omegaconf import DictConfig

from adapters_lab.config import Batching, Device, Distributed, Precision, ResumeMode, Select, TrainerConfig, \
    TrainerConfigError
from adapters_lab.typed import enum_member, typed

ADAM_BETA1 = 0.9  # torch.optim.AdamW's default, which the trainer uses
STATE_FILE = "trainer_state.pt"  # a checkpoint folder holds it (training/checkpoints.py)


@dataclass(frozen=True)
class TrainerSettings:
    """What ``check_trainer_config`` returns: the config with its choices as enums, and what
    follows from it."""

    cfg: TrainerConfig
    accumulation: int  # forwards per optimiser step, over all processes (paper_packed: one, holding them all)
    resume: ResumeMode
    resume_from: Path | None  # the checkpoint folder of trainer.resume=<folder>


def enum_value(key: str, kind: type[Enum], value) -> Enum:
    """``value`` as a member of ``kind`` (by value or by name), or a one-line error naming ``trainer.<key>``."""
    return enum_member(f"trainer.{key}", kind, value, TrainerConfigError)


def typed_trainer_config(cfg: TrainerConfig | DictConfig) -> TrainerConfig:
    """The trainer config as a ``TrainerConfig`` whose enum fields hold enum members (a composed
    DictConfig, the typed run config's own, or a dataclass built with strings as tests and scripts do)."""
    return typed(cfg, "trainer", TrainerConfigError)


def resume_choice(value: str) -> tuple[ResumeMode, Path | None]:
    if value in (ResumeMode.auto.value, ResumeMode.never.value):
        return ResumeMode(value), None
    if not (Path(value) / STATE_FILE).is_file():
        raise TrainerConfigError(f"trainer.resume={value!r}: expected auto, never or a checkpoint folder "
                                 f"holding {STATE_FILE}")
    return ResumeMode.folder, Path(value)


def _check_batches(cfg: TrainerConfig) -> None:
    if cfg.micro_batch_size <= 0:
        raise TrainerConfigError(f"trainer.micro_batch_size={cfg.micro_batch_size}: must be positive")
    if cfg.batch_size <= 0 or cfg.batch_size % cfg.micro_batch_size:
        raise TrainerConfigError(
            f"trainer.batch_size={cfg.batch_size}: must be a positive multiple of "
            f"trainer.micro_batch_size={cfg.micro_batch_size}")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise TrainerConfigError(f"trainer.epochs={cfg.epochs}: must be positive when trainer.max_steps <= 0")
    if cfg.pack_length < 0 or cfg.pack_length % 8:
        raise TrainerConfigError(f"trainer.pack_length={cfg.pack_length}: must be 0 (auto) or a positive multiple of 8")


def _check_optimiser(cfg: TrainerConfig) -> None:
    if not cfg.lr > 0:
        raise TrainerConfigError(f"trainer.lr={cfg.lr}: must be positive")
    if not cfg.lr / (1 - ADAM_BETA1) <= torch.finfo(torch.float32).max:  # inf and nan fail too
        raise TrainerConfigError(
            f"trainer.lr={cfg.lr}: too large; AdamW's first update (lr / (1 - beta1) = {cfg.lr / (1 - ADAM_BETA1):.3g}) "
            f"overflows float32 (largest {torch.finfo(torch.float32).max:.3g})")
    if cfg.warmup_ratio is not None and not 0 <= cfg.warmup_ratio <= 1:
        raise TrainerConfigError(f"trainer.warmup_ratio={cfg.warmup_ratio}: must be in [0, 1] (or null: warmup_steps)")
    if cfg.warmup_steps < 0:
        raise TrainerConfigError(f"trainer.warmup_steps={cfg.warmup_steps}: must be >= 0")
    if cfg.peak_tflops is not None and cfg.peak_tflops <= 0:
        raise TrainerConfigError(f"trainer.peak_tflops={cfg.peak_tflops}: must be positive")


def _check_selection(cfg: TrainerConfig, val_set_size: int | None) -> None:
    if cfg.select != Select.best_val:
        return
    if cfg.eval_every <= 0 or (val_set_size is not None and val_set_size <= 0):
        held = f"dataset.val_set_size={val_set_size}, " if val_set_size is not None else ""
        raise TrainerConfigError(f"trainer.select=best_val: needs validation during training ({held}"
                                 f"trainer.eval_every={cfg.eval_every}: {'both' if held else 'it'} must be positive)")


def _check_checkpoints(cfg: TrainerConfig) -> None:
    if cfg.checkpoint_layers is not None and cfg.checkpoint_layers < 0:
        raise TrainerConfigError(f"trainer.checkpoint_layers={cfg.checkpoint_layers}: must be >= 0 or null (all)")
    if cfg.checkpoint_every < 0 or cfg.keep_checkpoints < 1:
        raise TrainerConfigError(
            f"trainer.checkpoint_every={cfg.checkpoint_every}, trainer.keep_checkpoints={cfg.keep_checkpoints}: "
            "need checkpoint_every >= 0 and keep_checkpoints >= 1")


def _check_sharding(cfg: TrainerConfig) -> None:
    """trainer.distributed=fsdp: refuse the options that do not run on a sharded model (training/sharding.py)."""
    if cfg.distributed != Distributed.fsdp:
        return
    refused = {"fused_loss": (cfg.fused_loss, "the chunked loss calls the decoder and head outside the sharded "
                              "model's forward, where their weights are not gathered"),
               "compile": (cfg.compile, "compiled layers are not tested with sharded ones"),
               "precision": (cfg.precision == Precision.fp16, "fp16 loss scaling is not set up for sharded "
                             "gradients; use bf16"),
               "batching": (cfg.batching == Batching.paper_packed, "paper_packed runs in one process")}
    for key, (bad, why) in refused.items():
        if bad:
            value = getattr(cfg, key)
            raise TrainerConfigError(f"trainer.{key}={str(getattr(value, 'value', value)).lower()}: not supported with "
                                     f"trainer.distributed=fsdp ({why})")


def _check_processes(cfg: TrainerConfig, processes: int) -> None:
    """paper_packed runs a step's micro-batches as one forward, which one process holds; under a launcher
    (``WORLD_SIZE``, set by accelerate/torchrun) it would otherwise fail later on the accumulation count."""
    if cfg.batching == Batching.paper_packed and processes > 1:
        raise TrainerConfigError(
            f"trainer.batching=paper_packed: runs in one process (a step's examples are one forward), not {processes}; "
            "for data parallel use trainer.batching=padded (the paper's recipe) or trainer=fast")


def check_trainer_config(cfg: TrainerConfig | DictConfig, val_set_size: int | None = None) -> TrainerSettings:
    """Validate the trainer options before any model loads (one-line errors naming the key);
    the result is what ``train`` takes. ``val_set_size``: the run's ``dataset.val_set_size`` (None where
    the caller hands ``train`` its validation examples itself)."""
    typed = typed_trainer_config(cfg)
    _check_batches(typed)
    _check_optimiser(typed)
    _check_checkpoints(typed)
    _check_selection(typed, val_set_size)
    _check_sharding(typed)
    _check_processes(typed, int(os.environ.get("WORLD_SIZE", "1")))
    resume, resume_from = resume_choice(typed.resume)
    forwards = 1 if typed.batching == Batching.paper_packed else typed.batch_size // typed.micro_batch_size
    return TrainerSettings(typed, forwards, resume, resume_from)


def resolve_device(device: Device | str) -> torch.device:
    """The training device of ``trainer.device``: the one place it is worked out."""
    device = enum_value("device", Device, device)
    if device == Device.cuda and not torch.cuda.is_available():
        raise TrainerConfigError("trainer.device=cuda: no CUDA device is available")
    return torch.device("cuda" if device != Device.cpu and torch.cuda.is_available() else "cpu")


def mixed_precision(precision: Precision | str, device: torch.device) -> str:
    precision = enum_value("precision", Precision, precision)
    if precision == Precision.auto:
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision.value]


def make_accelerator(cfg: TrainerConfig | DictConfig) -> Accelerator:
    device = resolve_device(cfg.device)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision(cfg.precision, device))


def close_process_group() -> None:
    """Tear down torchrun's process group, if any, once every process is there (accelerate's state, which
    set it up). Left to interpreter shutdown, gloo's threads can abort a process ("terminate called
    without an active exception") after its work is done, and torchrun then fails the whole job."""
    state = PartialState()
    state.wait_for_everyone()
    state.destroy_process_group()
