"""The training loop: accelerate for device and precision; AdamW over adapter parameters only;
warm-up then linear/cosine decay; validation loss; checkpoints that resume exactly.

The plain path is LLM-Adapters' ``finetune.py`` recipe (HF Trainer: warm-up 100 steps,
AdamW, gradient clipping at 1.0, loss averaged per micro-batch, padded batches). Speed paths
(``trainer.batching=packed``, ``trainer.compile``, ``trainer.fused_loss``, ``trainer.fused_lora``,
``trainer.attn_implementation=varlen``) are config choices, each tested equal to the plain path.
One host synchronisation per optimiser step, after its last forward, reads the step's loss: it
feeds the NaN policy, the log and the loss history. Under several processes (``accelerate launch``)
each takes its share of a step's micro-batches through ``CausalLMObjective`` (the module DDP wraps),
and the step's loss and token counts are summed over them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import get_scheduler

from adapters_lab.adapters.base import adapter_state_dict
from adapters_lab.adapters.lora import enable_fused_lora
from adapters_lab.config import Batching, NanPolicy, Precision, TrainerConfig
from adapters_lab.data.tokenize import PackedCollator, PaddedCollator, pack_rows
from adapters_lab.files import atomic_path, write_json_atomic
from adapters_lab.kernels import (COMPILE_MODES, VARLEN, VARLEN_ATTENTION, check_fused_loss_supported, check_varlen_supported,
                                  chunked_causal_lm_loss, compile_decoder_layers, decoder_layers,
                                  default_peak_tflops, flops_per_token,
                                  register_varlen_attention, uncompile_decoder_layers, varlen_batch_kwargs)

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "trainer_state.pt"
LATEST = "latest.json"
MAX_CONSECUTIVE_SKIPS = 10


class TrainerConfigError(ValueError):
    """A bad trainer option; the message names the key."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step and the likely causes."""


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
    steady_tokens_per_second: float  # real tokens after the first steps (compilation, warm-up)
    mfu: float | None  # model FLOPs utilisation of the steady part, against trainer.peak_tflops
    peak_memory_gib: float | None
    skipped_steps: int = 0
    resumed_from_step: int | None = None
    loss_history: list[float] = field(default_factory=list)  # one mean loss per optimiser step


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
    if cfg.pack_length < 0 or cfg.pack_length % 8:
        raise TrainerConfigError(f"trainer.pack_length={cfg.pack_length}: must be 0 (auto) or a positive multiple of 8")
    if cfg.checkpoint_layers is not None and cfg.checkpoint_layers < 0:
        raise TrainerConfigError(f"trainer.checkpoint_layers={cfg.checkpoint_layers}: must be >= 0 or null (all)")
    if cfg.checkpoint_every < 0 or cfg.keep_checkpoints < 1:
        raise TrainerConfigError(
            f"trainer.checkpoint_every={cfg.checkpoint_every}, trainer.keep_checkpoints={cfg.keep_checkpoints}: "
            "need checkpoint_every >= 0 and keep_checkpoints >= 1")
    if cfg.resume not in ("auto", "never") and not (Path(cfg.resume) / STATE_FILE).is_file():
        raise TrainerConfigError(f"trainer.resume={cfg.resume!r}: expected auto, never or a checkpoint folder "
                                 f"holding {STATE_FILE}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise TrainerConfigError(f"trainer.compile_mode={cfg.compile_mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if cfg.peak_tflops is not None and cfg.peak_tflops <= 0:
        raise TrainerConfigError(f"trainer.peak_tflops={cfg.peak_tflops}: must be positive")
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


# ---------------------------------------------------------------------------------------------
# Batches: a deterministic plan per epoch (seed + epoch), so a data position is (epoch, index).

def epoch_batches(num_examples: int, micro_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A seeded shuffle per epoch, cut into micro-batches (the last may be short)."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [order[i : i + micro_batch_size] for i in range(0, num_examples, micro_batch_size)]


def length_grouped_batches(lengths: list[int], micro_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled, then sorted by length inside windows of 64 micro-batches, cut, and the
    micro-batches shuffled again: little padding, still random (HF's length-grouped sampler idea)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = 64 * micro_batch_size
    grouped = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        grouped += [chunk[i : i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
    return [grouped[i] for i in torch.randperm(len(grouped), generator=generator).tolist()]


def packed_batches(lengths: list[int], rows: int, row_length: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Micro-batches of ``rows`` packed rows (lists of example indices) from a seeded shuffle."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    packed = pack_rows(order, lengths, row_length)
    return [packed[i : i + rows] for i in range(0, len(packed), rows)]


class BatchPlan:
    """The micro-batches of each epoch for ``trainer.batching`` and the collator that makes them."""

    def __init__(self, examples: list[dict], cfg: TrainerConfig, pad_token_id: int, seed: int):
        self.examples, self.seed, self.cfg = examples, seed, cfg
        self.lengths = [len(x["input_ids"]) for x in examples]
        self.batching = Batching(cfg.batching)
        self.varlen = cfg.attn_implementation == VARLEN
        # varlen: a fixed bound on segment lengths (the kernel's max_seqlen, static for compiled code);
        # longer filler segments of packed rows are cut at it (kernels.varlen_cu_seqlens).
        self.max_segment = -(-max(self.lengths) // 8) * 8 if self.lengths else 8
        if self.batching == Batching.packed:
            self.row_length = cfg.pack_length or self.max_segment
            if max(self.lengths) > self.row_length:
                raise TrainerConfigError(
                    f"trainer.pack_length={cfg.pack_length}: shorter than the longest training example "
                    f"({max(self.lengths)} tokens); raise it or set 0 (auto)")
            self.collate = PackedCollator(pad_token_id, self.row_length)
        else:
            self.collate = PaddedCollator(pad_token_id)

    def epoch(self, epoch: int) -> list:
        mbs = self.cfg.micro_batch_size
        if self.batching == Batching.packed:
            return packed_batches(self.lengths, mbs, self.row_length, self.seed, epoch)
        if self.batching == Batching.length_grouped:
            return length_grouped_batches(self.lengths, mbs, self.seed, epoch)
        return epoch_batches(len(self.examples), mbs, self.seed, epoch)

    def batch(self, micro: list) -> tuple[dict, int]:
        """The collated tensors (on the CPU) and their real token count (no device sync); with
        varlen attention also the segment boundaries (computed here, on the CPU)."""
        if self.batching == Batching.packed:
            rows = [[self.examples[i] for i in row] for row in micro]
            batch, real = self.collate(rows), sum(self.lengths[i] for row in micro for i in row)
        else:
            batch, real = self.collate([self.examples[i] for i in micro]), sum(self.lengths[i] for i in micro)
        if self.varlen:
            batch.update(varlen_batch_kwargs(batch, self.max_segment))
        return batch, real

    def micro_batches_per_epoch(self) -> int:
        return len(self.epoch(0))


def total_updates(cfg: TrainerConfig, micro_per_epoch: int, accumulation: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(math.ceil(micro_per_epoch / accumulation) * cfg.epochs))


# ---------------------------------------------------------------------------------------------
# Model preparation and the loss.

def enable_gradient_checkpointing(model: nn.Module, layers: int | None) -> int:
    """Recompute the first ``layers`` decoder layers (all when None) in backward instead of
    keeping their activations; returns how many. Uses transformers' per-layer switch."""
    blocks = decoder_layers(model)
    count = len(blocks) if layers is None else min(layers, len(blocks))
    for index, block in enumerate(blocks):
        if not hasattr(block, "gradient_checkpointing"):
            raise TrainerConfigError(f"trainer.gradient_checkpointing: {type(block).__name__} has no checkpointing switch")
        block.gradient_checkpointing = index < count
        block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    return count


def prepare_model(model: nn.Module, cfg: TrainerConfig) -> None:
    """Apply the configured memory/speed options to the (adapter-injected) model in place."""
    if cfg.gradient_checkpointing:
        log.info("gradient checkpointing on %d decoder layers", enable_gradient_checkpointing(model, cfg.checkpoint_layers))
    if cfg.fused_loss:
        reason = check_fused_loss_supported(model)
        if reason:
            raise TrainerConfigError(f"trainer.fused_loss=true: {reason}")
    if cfg.attn_implementation == VARLEN:
        device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
        reason = check_varlen_supported(torch.device(device))
        if reason:
            raise TrainerConfigError(f"trainer.attn_implementation=varlen: {reason}")
        model.set_attn_implementation(register_varlen_attention())
    elif cfg.attn_implementation:
        model.set_attn_implementation(cfg.attn_implementation)
    if cfg.fused_lora:
        log.info("fused LoRA op on %d layers", enable_fused_lora(model))
    if cfg.compile:
        log.info("compiled %d decoder layers (mode %s)", compile_decoder_layers(model, cfg.compile_mode), cfg.compile_mode)


def forward_loss(model: nn.Module, batch: dict, fused: bool) -> torch.Tensor:
    """Mean next-token loss of a batch (padded: attention_mask; packed: position_ids; varlen
    attention: also varlen_cu_seqlens and varlen_max_seqlen)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "varlen_cu_seqlens" in inputs:  # its length changes per batch: one compiled graph for all
        torch._dynamo.maybe_mark_dynamic(inputs["varlen_cu_seqlens"], 0)
    if not fused:
        return model(**inputs, labels=batch["labels"], use_cache=False).loss
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
    return chunked_causal_lm_loss(hidden, model.get_output_embeddings(), batch["labels"])


class CausalLMObjective(nn.Module):
    """The model and its training loss as one module: the unit the accelerator prepares and the
    loop calls, so that a distributed wrapper (DDP) sees every forward and synchronises the adapter
    gradients in backward."""

    def __init__(self, model: nn.Module, fused: bool):
        super().__init__()
        self.model, self.fused = model, fused

    def forward(self, batch: dict) -> torch.Tensor:
        return forward_loss(self.model, batch, self.fused)


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
    ``rank``; a group shorter than ``world`` (an epoch's end) is repeated so each process has one."""
    return [group[i % len(group)] for i in range(rank, max(len(group), world), world)]


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to ``device`` (asynchronously from the CPU); other entries (ints) unchanged."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[dict], collate, micro_batch_size: int,
                    accelerator: Accelerator) -> float:
    """Token-weighted mean loss over a set of examples; under several processes each takes every
    world-th micro-batch and the sums are added up over them."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), dtype=torch.long, device=accelerator.device)
    varlen = getattr(getattr(model, "config", None), "_attn_implementation", None) == VARLEN_ATTENTION
    starts = range(0, len(examples), micro_batch_size)
    for start in starts[accelerator.process_index :: accelerator.num_processes]:
        batch = collate(examples[start : start + micro_batch_size])
        extra = varlen_batch_kwargs(batch, batch["input_ids"].shape[1]) if varlen else {}
        batch = to_device({**batch, **extra}, accelerator.device)
        if varlen:
            torch._dynamo.maybe_mark_dynamic(batch["varlen_cu_seqlens"], 0)
        with accelerator.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                           **{k: batch[k] for k in extra}).logits
        labels = batch["labels"][:, 1:]
        total += nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
        )
        count += (labels != -100).sum()
    if accelerator.num_processes > 1:
        total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    return float(total) / max(int(count), 1)


# ---------------------------------------------------------------------------------------------
# Checkpoints: <dir>/step-NNNNNNN/{adapter_model.safetensors, trainer_state.pt}; latest.json is
# written last (atomically), so it only ever names a complete checkpoint.

@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # index of the next micro-batch in the epoch's plan
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    skipped_steps: int = 0
    loss_history: list[float] = field(default_factory=list)
    val_loss: float | None = None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, loop: LoopState,
                    fingerprint: dict, keep: int) -> Path:
    folder = Path(directory) / f"step-{loop.step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous().cpu() for name, t in adapter_state_dict(model).items()}
    with atomic_path(folder / ADAPTER_FILE) as tmp:
        save_file(tensors, str(tmp))
    state = {"loop": asdict(loop), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "fingerprint": fingerprint}
    with atomic_path(folder / STATE_FILE) as tmp:
        torch.save(state, tmp)
    write_json_atomic(Path(directory) / LATEST, {"step": loop.step, "folder": folder.name})
    for old in sorted(Path(directory).glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def clear_checkpoints(directory: Path) -> None:
    """A fresh start: drop another run's (or a half-written) checkpoints, so that pruning by step
    number can never delete this run's newest one."""
    stale = sorted(Path(directory).glob("step-*"))
    if stale:
        log.warning("trainer.resume: starting fresh; removing %d old checkpoint(s) in %s", len(stale), directory)
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    (Path(directory) / LATEST).unlink(missing_ok=True)


def latest_checkpoint(directory: Path | None) -> Path | None:
    if directory is None or not (Path(directory) / LATEST).is_file():
        return None
    folder = Path(directory) / json.loads((Path(directory) / LATEST).read_text())["folder"]
    return folder if (folder / STATE_FILE).is_file() else None


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, fingerprint: dict) -> LoopState:
    state = torch.load(folder / STATE_FILE, weights_only=False)
    changed = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items() if state["fingerprint"].get(k) != v}
    if changed:
        raise TrainerConfigError(
            f"trainer.resume: checkpoint {folder} was made with other settings "
            + ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            + "; use a new output folder or trainer.resume=never")
    tensors = load_file(str(folder / ADAPTER_FILE))
    params = dict(model.named_parameters())
    if set(tensors) != set(adapter_state_dict(model)):
        raise TrainerConfigError(f"trainer.resume: {folder / ADAPTER_FILE} does not match the injected adapter")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return LoopState(**state["loop"])


class TermSignal:
    """Turns SIGTERM (what SLURM sends before preemption) into a flag the loop checks after
    each optimiser step, so it can checkpoint before exiting."""

    def __init__(self):
        self.received = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def nan_message(value: float, step: int, loop: LoopState, cfg: TrainerConfig, saved: Path | None) -> str:
    where = f"the last finite state is saved in {saved}" if saved else "no checkpoint folder was given"
    return (
        f"training loss is {value} at optimiser step {step} (epoch {loop.epoch}, micro-batch {loop.position}); "
        f"{where}. Likely causes: a learning rate too high (trainer.lr={cfg.lr}); fp16 overflow "
        f"(trainer.precision={Precision(cfg.precision).value}: try bf16 or fp32); left padding with SDPA attention "
        f"(train with right padding or trainer.batching=packed); a broken record. "
        f"trainer.nan_policy=skip drops such steps instead."
    )


# ---------------------------------------------------------------------------------------------

def train(model: nn.Module, train_examples: list[dict], val_examples: list[dict], pad_token_id: int,
          cfg: TrainerConfig, accelerator: Accelerator, tracker, seed: int,
          checkpoint_dir: Path | None = None) -> TrainResult:
    """Train the trainable (adapter) parameters of ``model``; checkpoints go to ``checkpoint_dir``
    and ``trainer.resume=auto`` continues from the last one there."""
    accumulation = check_trainer_config(cfg)
    plan = BatchPlan(train_examples, cfg, pad_token_id, seed)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainerConfigError("the adapter added no trainable parameter")
    evaluation_attention = model.config._attn_implementation
    prepare_model(model, cfg)
    try:
        return _train_loop(model, plan, val_examples, cfg, accelerator, tracker, seed, checkpoint_dir, accumulation)
    finally:  # generation afterwards runs eager layers and the model's own attention
        if cfg.compile:
            uncompile_decoder_layers(model)
        if cfg.attn_implementation:
            model.set_attn_implementation(evaluation_attention)


def _train_loop(model: nn.Module, plan: BatchPlan, val_examples: list[dict], cfg: TrainerConfig,
                accelerator: Accelerator, tracker, seed: int, checkpoint_dir: Path | None,
                accumulation: int) -> TrainResult:
    val_collate = PaddedCollator(plan.collate.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    flops = flops_per_token(model)
    peak_tflops = cfg.peak_tflops or default_peak_tflops(accelerator.device)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=accelerator.device.type == "cuda")
    updates = total_updates(cfg, plan.micro_batches_per_epoch(), accumulation)
    scheduler = get_scheduler(getattr(cfg.schedule, "value", cfg.schedule), optimizer,
                              num_warmup_steps=min(cfg.warmup_steps, updates), num_training_steps=updates)
    world, rank = accelerator.num_processes, accelerator.process_index
    if accumulation < world:
        raise TrainerConfigError(
            f"trainer.batch_size={cfg.batch_size}, trainer.micro_batch_size={cfg.micro_batch_size}: {accumulation} "
            f"micro-batch(es) per optimiser step, fewer than the {world} processes (batch_size counts examples over "
            "all of them)")
    objective, optimizer = accelerator.prepare(CausalLMObjective(model, cfg.fused_loss), optimizer)
    objective.train()
    fingerprint = {"examples": len(plan.examples), "updates": updates, "batch_size": cfg.batch_size,
                   "micro_batch_size": cfg.micro_batch_size, "batching": plan.batching.value, "seed": seed}

    loop, resumed_from = LoopState(), None
    source = latest_checkpoint(checkpoint_dir) if cfg.resume == "auto" else (
        None if cfg.resume == "never" else Path(cfg.resume))
    if source is not None:
        loop = load_checkpoint(source, model, optimizer, scheduler, fingerprint)
        resumed_from = loop.step
        log.info("resumed from %s (step %d of %d)", source, loop.step, updates)
    elif checkpoint_dir is not None and accelerator.is_main_process:
        clear_checkpoints(checkpoint_dir)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def checkpoint_now() -> Path | None:
        if checkpoint_dir is None or not accelerator.is_main_process:
            return None
        return save_checkpoint(checkpoint_dir, model, optimizer, scheduler, loop, fingerprint, cfg.keep_checkpoints)

    loss_final = float("nan")
    consecutive_skips = 0
    steady_from = min(2, max(updates - 1, 0)) + (resumed_from or 0)  # steps excluded from the steady rate
    steady_start, steady_tokens = None, 0
    bar = tqdm(total=updates, initial=loop.step, disable=not (cfg.progress_bar and accelerator.is_main_process),
               unit="step")
    batches = plan.epoch(loop.epoch)
    segment_start = time.perf_counter()
    with TermSignal() as term:
        while loop.step < updates:
            if loop.position >= len(batches):
                loop.epoch, loop.position = loop.epoch + 1, 0
                batches = plan.epoch(loop.epoch)
            group = batches[loop.position : loop.position + accumulation]
            mine = shard(group, world, rank)  # all of it in one process
            count = max(len(group), world)  # micro-batches of the step over all processes
            step_loss = None  # the sum of the micro-batch losses, on the device
            step_tokens = step_padded = 0
            for index, micro in enumerate(mine):
                batch, real = plan.batch(micro)
                step_tokens += real
                step_padded += batch["input_ids"].numel()
                batch = to_device(batch, accelerator.device)
                last = index == len(mine) - 1
                # gradients are averaged over the processes once, at the last micro-batch of the step
                sync = contextlib.nullcontext() if last else accelerator.no_sync(objective)
                with sync:
                    with accelerator.autocast():
                        loss = objective(batch)
                    step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
                    if last:
                        value, step_tokens, step_padded, any_term = step_totals(
                            step_loss, step_tokens, step_padded, term.received, accelerator, world)
                    accelerator.backward(loss / (count / world))  # the mean over the step's micro-batches
            value /= count
            if not math.isfinite(value):
                optimizer.zero_grad(set_to_none=True)
                if NanPolicy(cfg.nan_policy) == NanPolicy.stop or consecutive_skips + 1 >= MAX_CONSECUTIVE_SKIPS:
                    raise NonFiniteLossError(nan_message(value, loop.step + 1, loop, cfg, checkpoint_now()))
                log.warning("loss is %s at step %d: step skipped (trainer.nan_policy=skip)", value, loop.step + 1)
                loop.position += len(group)
                loop.skipped_steps += 1
                consecutive_skips += 1
                continue
            consecutive_skips = 0
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loop.position += len(group)
            loop.step += 1
            loop.tokens += step_tokens
            loop.padded_tokens += step_padded
            loop.loss_history.append(value)
            now = time.perf_counter()
            if loop.step == steady_from:
                steady_start = now
            elif steady_start is not None:
                steady_tokens += step_tokens
            bar.update(1)
            if loop.step % cfg.log_every == 0 or loop.step == updates:
                window = loop.loss_history[(loop.step - 1) // cfg.log_every * cfg.log_every :]
                loss_final = sum(window) / len(window)
                elapsed = loop.seconds + now - segment_start
                stats = {"train/loss": loss_final, "train/lr": scheduler.get_last_lr()[0],
                         "train/tokens_per_second": loop.tokens / elapsed,
                         "train/padded_tokens_per_second": loop.padded_tokens / elapsed,
                         "train/epoch": loop.epoch + loop.position / len(batches)}
                if peak_tflops:
                    stats["train/mfu"] = loop.tokens * flops / elapsed / (peak_tflops * 1e12 * world)
                if accelerator.device.type == "cuda":
                    stats["train/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                tracker.log(stats, loop.step)
                bar.set_postfix(progress_postfix(stats))
            if val_examples and cfg.eval_every > 0 and loop.step % cfg.eval_every == 0 and loop.step < updates:
                loop.val_loss = validation_loss(model, val_examples, val_collate, cfg.micro_batch_size, accelerator)
                tracker.log({"val/loss": loop.val_loss}, loop.step)
            periodic = cfg.checkpoint_every > 0 and loop.step % cfg.checkpoint_every == 0
            stop = term.received if world == 1 else any_term
            if periodic or loop.step == updates or stop:
                loop.seconds += time.perf_counter() - segment_start
                segment_start = time.perf_counter()
                saved = checkpoint_now()
                if stop:
                    bar.close()
                    log.warning("SIGTERM: checkpoint saved in %s at step %d; exiting", saved, loop.step)
                    raise SystemExit(128 + signal.SIGTERM)
    loop.seconds += time.perf_counter() - segment_start
    steady_seconds = time.perf_counter() - steady_start if steady_start is not None else 0.0
    bar.close()
    if val_examples:
        loop.val_loss = validation_loss(model, val_examples, val_collate, cfg.micro_batch_size, accelerator)
        tracker.log({"val/loss": loop.val_loss}, loop.step)
    if loop.loss_history:  # the last logging window, from the history so a resumed run reports the same
        loss_final = float(np.mean(loop.loss_history[(loop.step - 1) // cfg.log_every * cfg.log_every :]))
    steady = steady_tokens / steady_seconds if steady_seconds > 0 else loop.tokens / max(loop.seconds, 1e-9)
    peak = torch.cuda.max_memory_allocated() / 2**30 if accelerator.device.type == "cuda" else None
    epochs_completed = loop.epoch + loop.position / len(batches)
    return TrainResult(
        steps=loop.step, epochs_completed=round(epochs_completed, 4), loss_final=loss_final, val_loss=loop.val_loss,
        tokens=loop.tokens, padded_tokens=loop.padded_tokens, seconds=loop.seconds,
        tokens_per_second=loop.tokens / loop.seconds if loop.seconds > 0 else 0.0,
        padded_tokens_per_second=loop.padded_tokens / loop.seconds if loop.seconds > 0 else 0.0,
        steady_tokens_per_second=steady, mfu=steady * flops / (peak_tflops * 1e12 * world) if peak_tflops else None,
        peak_memory_gib=peak, skipped_steps=loop.skipped_steps, resumed_from_step=resumed_from,
        loss_history=list(loop.loss_history))
