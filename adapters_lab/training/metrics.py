"""What the trainer reports: throughput (real and padded tokens/s, the steady rate after the
first steps), model FLOPs utilisation, peak memory, the logged figures and the run's result."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from adapters_lab.training.checkpoints import LoopState


@dataclass
class TrainResult:
    steps: int
    epochs_completed: float
    loss_final: float  # mean training loss over the last logging window
    val_loss: float | None
    tokens: int  # real (non-pad) tokens seen
    padded_tokens: int  # tokens the model processed, padding included
    seconds: float
    tokens_per_second: float  # real tokens over the whole run (resumed segments included)
    padded_tokens_per_second: float  # the same with padding counted: what the model processed
    steady_tokens_per_second: float  # real tokens over the steps after the first ones (compilation, warm-up)
    mfu: float | None  # model FLOPs utilisation of the steady part, against trainer.peak_tflops
    peak_memory_gib: float | None
    skipped_steps: int = 0
    resumed_from_step: int | None = None
    loss_history: list[float] = field(default_factory=list)  # one mean loss per optimiser step
    selected_step: int | None = None  # the step whose adapter weights training ended with (trainer.select)
    validation_seconds: list[float] = field(default_factory=list)  # wall time of each validation (this process)
    checkpoint_seconds: list[float] = field(default_factory=list)  # wall time of each checkpoint saved (this process)


def matmul_weights(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) element counts of the weights of every linear layer: the N in the
    ~2N forward FLOPs per token of a decoder (embeddings are lookups, not matmuls)."""
    frozen = trainable = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if module.weight.requires_grad:
                trainable += module.weight.numel()
            else:
                frozen += module.weight.numel()
        elif hasattr(module, "frozen_weight_numel"):  # the FP8 base (speed/fp8.py) keeps no weight parameter
            frozen += module.frozen_weight_numel
    return frozen, trainable


def flops_per_token(model: nn.Module) -> int:
    """Training FLOPs per token: forward 2N and input gradients 2N for every weight, plus
    weight gradients 2N for trainable ones (attention scores are left out, as in the usual 6N)."""
    frozen, trainable = matmul_weights(model)
    return 4 * frozen + 6 * trainable


# Dense bf16 tensor-core peak by device name (datasheets, without sparsity), TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)



def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def window_mean(loop: LoopState, log_every: int) -> float:
    """Mean loss of the last logging window, from the history (a resumed run reports the same)."""
    return float(np.mean(loop.loss_history[(loop.step - 1) // log_every * log_every :]))


def progress_postfix(stats: dict) -> dict[str, str]:
    """The progress bar's figures from a logged ``stats`` dict: loss, real and padded tokens/s,
    and MFU and peak memory where they are known (a GPU)."""
    postfix = {"loss": f"{stats['train/loss']:.4f}", "tok_s": f"{stats['train/tokens_per_second']:,.0f}",
               "padded_tok_s": f"{stats['train/padded_tokens_per_second']:,.0f}"}
    if "train/mfu" in stats:
        postfix["mfu"] = f"{stats['train/mfu']:.0%}"
    if "train/peak_memory_gib" in stats:
        postfix["mem"] = f"{stats['train/peak_memory_gib']:.1f}G"
    return postfix


def log_line(step: int, updates: int, stats: dict, eta_seconds: float) -> str:
    """The line logged every ``trainer.log_every`` steps: step, loss, learning rate, tokens/s, ETA."""
    eta = "?" if eta_seconds != eta_seconds else time.strftime("%H:%M:%S", time.gmtime(eta_seconds))
    if eta_seconds >= 86400:
        eta = f"{int(eta_seconds // 86400)}d {eta}"
    return (f"step {step}/{updates}: loss {stats['train/loss']:.4f}, lr {stats['train/lr']:.3g}, "
            f"{stats['train/tokens_per_second']:,.0f} tok/s, ETA {eta}")


class Throughput:
    """Wall time of the run (``loop.seconds`` banks it at each checkpoint, so a resumed run adds
    its segments) and the steady rate: real tokens over the optimiser steps after the first ones
    (compilation, warm-up), the time of validations and checkpoints (``paused``) left out."""

    def __init__(self, loop: LoopState, updates: int, resumed_from: int | None, flops: int,
                 peak_tflops: float | None, world: int, device: torch.device):
        self.steady_from = min(2, max(updates - 1, 0)) + (resumed_from or 0)  # steps excluded from the steady rate
        self.mark: float | None = None  # the end of the last counted step, moved on by each pause after it
        self.steady_seconds, self.steady_tokens = 0.0, 0
        self.pauses: dict[str, list[float]] = {"validation": [], "checkpoint": []}
        self.flops, self.peak_tflops, self.world, self.device = flops, peak_tflops, world, device
        self.segment_start = self.started = time.perf_counter()
        self.start_step = loop.step

    def step(self, loop: LoopState, tokens: int) -> None:
        """After an optimiser step that saw ``tokens`` real tokens."""
        now = time.perf_counter()
        if loop.step == self.steady_from:
            self.mark = now
        elif self.mark is not None:
            self.steady_seconds += now - self.mark
            self.steady_tokens += tokens
            self.mark = now

    @contextmanager
    def paused(self, kind: str):
        """Time a validation or a checkpoint (``kind``) and leave it out of the steady rate; the step
        before it finishes on the device first (its time stays the step's)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.pauses[kind].append(seconds)
            if self.mark is not None:
                self.mark += seconds

    def bank(self, loop: LoopState) -> None:
        """Add the time since the last bank to ``loop.seconds`` (before a checkpoint saves it)."""
        now = time.perf_counter()
        loop.seconds += now - self.segment_start
        self.segment_start = now

    def mfu(self, tokens_per_second: float) -> float | None:
        return tokens_per_second * self.flops / (self.peak_tflops * 1e12 * self.world) if self.peak_tflops else None

    def stats(self, loop: LoopState, loss: float, lr: float, epoch: float) -> dict:
        """The figures logged every ``trainer.log_every`` steps."""
        elapsed = loop.seconds + time.perf_counter() - self.segment_start
        stats = {"train/loss": loss, "train/lr": lr, "train/tokens_per_second": loop.tokens / elapsed,
                 "train/padded_tokens_per_second": loop.padded_tokens / elapsed, "train/epoch": epoch}
        if self.peak_tflops:
            stats["train/mfu"] = self.mfu(loop.tokens / elapsed)
        if self.device.type == "cuda":
            stats["train/peak_memory_gib"] = peak_memory_gib(self.device)
        return stats

    def eta(self, loop: LoopState, updates: int) -> float:
        """Seconds left at this run's rate so far (this process's segment, a resume's included)."""
        done = loop.step - self.start_step
        return (time.perf_counter() - self.started) / done * (updates - loop.step) if done > 0 else float("nan")

    def steady_rate(self, loop: LoopState) -> float:
        if self.steady_seconds > 0:
            return self.steady_tokens / self.steady_seconds
        return loop.tokens / max(loop.seconds, 1e-9)


def train_result(loop: LoopState, throughput: Throughput, steady: float, loss_final: float, epochs_completed: float,
                 resumed_from: int | None) -> TrainResult:
    rate = lambda count: count / loop.seconds if loop.seconds > 0 else 0.0  # noqa: E731
    return TrainResult(
        steps=loop.step, epochs_completed=round(epochs_completed, 4), loss_final=loss_final, val_loss=loop.val_loss,
        tokens=loop.tokens, padded_tokens=loop.padded_tokens, seconds=loop.seconds,
        tokens_per_second=rate(loop.tokens), padded_tokens_per_second=rate(loop.padded_tokens),
        steady_tokens_per_second=steady, mfu=throughput.mfu(steady), peak_memory_gib=peak_memory_gib(throughput.device),
        skipped_steps=loop.skipped_steps, resumed_from_step=resumed_from, loss_history=list(loop.loss_history),
        selected_step=loop.best_step if loop.best_step is not None else loop.step,
        validation_seconds=list(throughput.pauses["validation"]),
        checkpoint_seconds=list(throughput.pauses["checkpoint"]))
