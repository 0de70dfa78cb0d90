"""Validation loss: the token-weighted mean next-token loss over held-out examples."""

from __future__ import annotations

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import send_to_device

from adapters_lab.training.speed import SpeedPaths


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[dict], collate, micro_batch_size: int,
                    accelerator: Accelerator, speed: SpeedPaths) -> float:
    """Token-weighted mean loss over a set of examples; under several processes each takes every
    world-th micro-batch and the sums are added up over them. Every process runs as many forwards
    (a sharded model's are collective): one short of a micro-batch repeats its first, uncounted."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), dtype=torch.long, device=accelerator.device)
    # Not a prepared DataLoader: its even_batches repeats examples to fill the processes; here each counts once
    starts = range(0, len(examples), micro_batch_size)
    mine = list(starts[accelerator.process_index :: accelerator.num_processes])
    forwards = -(-len(starts) // accelerator.num_processes)
    for index, start in enumerate(mine + list(starts[:1]) * (forwards - len(mine))):
        batch = collate(examples[start : start + micro_batch_size])
        batch.update(speed.batch_extras(batch, batch["input_ids"].shape[1]))
        batch = send_to_device(batch, accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = speed.logits(model, batch)
        labels = batch["labels"][:, 1:]
        if index >= len(mine):
            continue
        total += nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        count += (labels != -100).sum()
    if accelerator.num_processes > 1:
        total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    return float(total) / max(int(count), 1)
