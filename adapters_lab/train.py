"""The training loop: accelerate for device, precision and (later) distribution; AdamW over
adapter parameters only; warm-up then linear/cosine decay; validation loss; a progress bar
with loss, tokens/s and ETA. Defaults follow LLM-Adapters' ``finetune.py`` (HF Trainer:
warm-up 100 steps, AdamW, gradient clipping at 1.0, loss averaged per micro-batch)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from adapters_lab.config import Precision, TrainerConfig
from adapters_lab.data.tokenize import PaddedCollator

log = logging.getLogger(__name__)


class TrainerConfigError(ValueError):
    """A bad trainer option; the message names the key."""


@dataclass
class TrainResult:
    steps: int
    epochs_completed: float
    loss_final: float  # mean training loss over the last logging window
    val_loss: float | None
    tokens: int  # real (non-pad) tokens seen
    padded_tokens: int
    seconds: float
    tokens_per_second: float
    peak_memory_gib: float | None


def check_trainer_config(cfg: TrainerConfig) -> int:
    """Validate before any model loads; returns gradient-accumulation steps."""
    if cfg.micro_batch_size <= 0:
        raise TrainerConfigError(f"trainer.micro_batch_size={cfg.micro_batch_size}: must be positive")
    if cfg.batch_size <= 0 or cfg.batch_size % cfg.micro_batch_size:
        raise TrainerConfigError(
            f"trainer.batch_size={cfg.batch_size}: must be a positive multiple of "
            f"trainer.micro_batch_size={cfg.micro_batch_size}"
        )
    if cfg.lr <= 0:
        raise TrainerConfigError(f"trainer.lr={cfg.lr}: must be positive")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise TrainerConfigError(f"trainer.epochs={cfg.epochs}: must be positive when trainer.max_steps <= 0")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise TrainerConfigError(f"trainer.device={cfg.device!r}: expected auto, cpu or cuda")
    return cfg.batch_size // cfg.micro_batch_size


def mixed_precision(cfg: TrainerConfig, use_cpu: bool) -> str:
    precision = Precision(cfg.precision)
    if precision == Precision.auto:
        on_gpu = not use_cpu and torch.cuda.is_available()
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision.value]


def make_accelerator(cfg: TrainerConfig) -> Accelerator:
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainerConfigError("trainer.device=cuda: no CUDA device is available")
    return Accelerator(cpu=use_cpu, mixed_precision=mixed_precision(cfg, use_cpu))


def epoch_batches(num_examples: int, micro_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A seeded shuffle per epoch, cut into micro-batches (the last may be short)."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [order[i : i + micro_batch_size] for i in range(0, num_examples, micro_batch_size)]


def total_updates(cfg: TrainerConfig, num_examples: int, accumulation: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    micro_per_epoch = math.ceil(num_examples / cfg.micro_batch_size)
    return max(1, math.ceil(math.ceil(micro_per_epoch / accumulation) * cfg.epochs))


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[dict], collate, micro_batch_size: int,
                    accelerator: Accelerator) -> float:
    """Token-weighted mean loss over a set of examples."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), 0
    for start in range(0, len(examples), micro_batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate(examples[start : start + micro_batch_size]).items()}
        with accelerator.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
        )
        total += losses
        count += int((labels != -100).sum())
    model.train(was_training)
    return float(total) / max(count, 1)


def train(model: nn.Module, train_examples: list[dict], val_examples: list[dict], pad_token_id: int,
          cfg: TrainerConfig, accelerator: Accelerator, tracker, seed: int) -> TrainResult:
    accumulation = check_trainer_config(cfg)
    collate = PaddedCollator(pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainerConfigError("the adapter added no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=accelerator.device.type == "cuda")
    updates = total_updates(cfg, len(train_examples), accumulation)
    scheduler = get_scheduler(cfg.schedule.value if hasattr(cfg.schedule, "value") else cfg.schedule,
                              optimizer, num_warmup_steps=min(cfg.warmup_steps, updates), num_training_steps=updates)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    step, epoch, micro_index = 0, 0, 0
    window_loss, window_micro = torch.zeros((), device=accelerator.device), 0
    loss_final, val_loss = float("nan"), None
    tokens = padded = 0
    bar = tqdm(total=updates, disable=not (cfg.progress_bar and accelerator.is_main_process), unit="step")
    start = time.perf_counter()
    while step < updates:
        batches = epoch_batches(len(train_examples), cfg.micro_batch_size, seed, epoch)
        for micro_index, indices in enumerate(batches):
            batch = collate([train_examples[i] for i in indices])
            tokens += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            with accelerator.autocast():
                loss = model(**batch).loss
            accelerator.backward(loss / accumulation)
            window_loss += loss.detach()
            window_micro += 1
            last_of_epoch = micro_index + 1 == len(batches)
            if (micro_index + 1) % accumulation and not last_of_epoch:
                continue
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == updates:
                loss_final = float(window_loss) / window_micro  # the only host sync, once per window
                elapsed = time.perf_counter() - start
                tracker.log({"train/loss": loss_final, "train/lr": scheduler.get_last_lr()[0],
                             "train/tokens_per_second": tokens / elapsed, "train/epoch": epoch + (micro_index + 1) / len(batches)}, step)
                bar.set_postfix(loss=f"{loss_final:.4f}", tok_s=f"{tokens / elapsed:,.0f}")
                window_loss.zero_()
                window_micro = 0
            if val_examples and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < updates:
                val_loss = validation_loss(model, val_examples, collate, cfg.micro_batch_size, accelerator)
                tracker.log({"val/loss": val_loss}, step)
            if step >= updates:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    bar.close()
    if val_examples:
        val_loss = validation_loss(model, val_examples, collate, cfg.micro_batch_size, accelerator)
        tracker.log({"val/loss": val_loss}, step)
    peak = torch.cuda.max_memory_allocated() / 2**30 if accelerator.device.type == "cuda" else None
    epochs_completed = epoch - 1 + (micro_index + 1) / len(batches)
    return TrainResult(step, round(epochs_completed, 4), loss_final, val_loss, tokens, padded, seconds,
                       tokens / seconds if seconds > 0 else 0.0, peak)
