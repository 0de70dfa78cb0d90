"""One optimiser step: the step's micro-batches forward and backward (this process's share of
them), its one host synchronisation, then clipping and the update. Under several processes
(``accelerate launch``) each process takes every world-th micro-batch of the step through
``CausalLMObjective`` (the module DDP wraps), and the step's loss and token counts are summed
over them."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import send_to_device

from adapters_lab.data.batching import BatchPlan


class CausalLMObjective(nn.Module):
    """The model and its training loss as one module: the unit the accelerator prepares and the
    loop calls, so that a distributed wrapper (DDP) sees every forward and synchronises the adapter
    gradients in backward."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, dict], torch.Tensor]):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss(self.model, batch)


@dataclass
class StepTotals:
    loss: float  # mean of the step's micro-batch losses, over all processes
    tokens: int  # real tokens of the step, over all processes
    padded: int  # tokens processed, padding included
    stop: bool  # some process was asked to stop (SIGTERM)


def step_totals(loss_sum: torch.Tensor, tokens: int, padded: int, terminated: bool, accelerator: Accelerator,
                world: int) -> tuple[float, int, int, bool]:
    """The step's loss sum, real and padded tokens, and whether any process got SIGTERM, over all
    processes: the step's one host sync. The loop calls it after the step's last forward, so the
    host then queues the last backward, the optimiser step and the next batch while the GPU runs
    (an H200 A/B against reading it after backward measured no difference: docs/benchmarks.md)."""
    if world == 1:
        return float(loss_sum), tokens, padded, terminated
    local = torch.tensor([tokens, padded, int(terminated)], dtype=torch.float64, device=loss_sum.device)
    totals = accelerator.reduce(torch.cat([loss_sum.double().reshape(1), local]), "sum").tolist()
    return totals[0], int(totals[1]), int(totals[2]), totals[3] > 0


def shard(group: list, world: int, rank: int) -> list:
    """This process's micro-batches of an optimiser step's ``group``: every ``world``-th from
    ``rank``; a group shorter than ``world`` (an epoch's end) is repeated so each process has one.
    Not accelerate's BatchSamplerShard: it shards a whole epoch and fills an uneven end from the
    epoch's start (a different mean than one process takes), and needs the step's micro-batches to
    divide evenly among the processes."""
    return [group[i % len(group)] for i in range(rank, max(len(group), world), world)]


def forward_backward(objective: nn.Module, plan: BatchPlan, group: list, accelerator: Accelerator,
                     terminated: bool) -> StepTotals:
    """Forward and backward of this process's share of ``group``; gradients are averaged over the
    processes once, at the step's last micro-batch, and the loss is read just before that backward."""
    world = accelerator.num_processes
    mine = shard(group, world, accelerator.process_index)  # all of it in one process
    count = max(len(group), world)  # micro-batches of the step over all processes
    step_loss, tokens, padded = None, 0, 0  # step_loss: the sum of the micro-batch losses, on the device
    for index, micro in enumerate(mine):
        batch, real = plan.batch(micro)
        tokens, padded = tokens + real, padded + batch["input_ids"].numel()
        batch = send_to_device(batch, accelerator.device, non_blocking=True)
        last = index == len(mine) - 1
        # Not accelerator.accumulate: it divides by a fixed step count; a step here is its group (short at an epoch end)
        with contextlib.nullcontext() if last else accelerator.no_sync(objective):
            with accelerator.autocast():
                loss = objective(batch)
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            if last:
                totals = step_totals(step_loss, tokens, padded, terminated, accelerator, world)
            accelerator.backward(loss / (count / world))  # the mean over the step's micro-batches
    return StepTotals(totals[0] / count, totals[1], totals[2], totals[3])


def update(optimizer, scheduler, params: list[nn.Parameter], accelerator: Accelerator,
           max_grad_norm: float | None) -> None:
    """Clip by total norm, step the optimiser and the schedule, clear the gradients."""
    if max_grad_norm:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
