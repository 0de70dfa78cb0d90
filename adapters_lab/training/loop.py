"""The training recipe: AdamW over the adapter parameters only, warm-up then linear/cosine decay,
validation loss, checkpoints that resume exactly. It reads top to bottom (``Recipe.run``):
set up the optimiser, resume, then per optimiser step ``train_step``, ``log``, ``maybe_validate``
and ``maybe_checkpoint``.

The plain path is LLM-Adapters' ``finetune.py`` recipe (HF Trainer: warm-up 100 steps, AdamW,
gradient clipping at 1.0, loss averaged per micro-batch, padded batches). Speed paths are config
choices behind ``training.speed.SpeedPaths``, each tested equal to the plain path. One host
synchronisation per optimiser step, after its last forward, reads the step's loss: it feeds the
NaN policy, the log and the loss history.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from adapters_lab.config import BasePrecision, NanPolicy, Select, TrainerConfigError
from adapters_lab.data.batching import BatchPlan
from adapters_lab.data.tokenize import PaddedCollator
from adapters_lab.training import checkpoints, sharding
from adapters_lab.training.checkpoints import LoopState
from adapters_lab.training.metrics import Throughput, TrainResult, default_peak_tflops, flops_per_token, \
    log_line, progress_postfix, train_result, window_mean
from adapters_lab.training.schedule import make_scheduler
from adapters_lab.training.settings import TrainerSettings
from adapters_lab.training.signals import StopSignals
from adapters_lab.training.speed import SpeedPaths
from adapters_lab.training.step import CausalLMObjective, StepTotals, forward_backward, update
from adapters_lab.training.validation import validation_loss

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step and the likely causes."""


def total_updates(cfg, micro_per_epoch: int, accumulation: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(math.ceil(micro_per_epoch / accumulation) * cfg.epochs))


def nan_message(value: float, step: int, loop: LoopState, cfg, saved: Path | None) -> str:
    where = f"the last finite state is saved in {saved}" if saved else "no checkpoint folder was given"
    return (
        f"training loss is {value} at optimiser step {step} (epoch {loop.epoch}, micro-batch {loop.position}); "
        f"{where}. Likely causes: a learning rate too high (trainer.lr={cfg.lr}); fp16 overflow "
        f"(trainer.precision={cfg.precision.value}: try bf16 or fp32); left padding with SDPA attention "
        f"(train with right padding or trainer.batching=packed); a broken record. "
        f"trainer.nan_policy=skip drops such steps instead."
    )


def train(model: nn.Module, train_examples: list[dict], val_examples: list[dict], pad_token_id: int,
          settings: TrainerSettings, accelerator: Accelerator, tracker, seed: int,
          checkpoint_dir: Path | None = None, collate=None, param_groups: list[dict] | None = None,
          base_precision: BasePrecision = BasePrecision.bf16) -> TrainResult:
    """Train the trainable (adapter) parameters of ``model`` with the options ``check_trainer_config``
    returned; checkpoints go to ``checkpoint_dir`` and ``trainer.resume=auto`` continues from the last
    one there. A model kind may give its own padded ``collate`` (image-text: with the images) and the
    optimiser's ``param_groups`` with their own ``lr`` (image-text: the connector at trainer.connector_lr).
    ``base_precision``: the run's ``model.base_precision`` (fp8: the frozen base in FP8 while training only)."""
    speed = SpeedPaths(settings.cfg, accelerator.device, base_precision)
    plan = BatchPlan(train_examples, settings.cfg, pad_token_id, seed, extras=speed.batch_extras, collate=collate)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainerConfigError("the adapter added no trainable parameter")
    speed.apply(model)
    sharded = sharding.wants_sharding(settings.cfg.distributed, accelerator)
    if sharded:  # trainer.distributed=fsdp: the base split over the processes while training
        param_groups = sharding.shard(model, accelerator, param_groups)
    try:
        result = Recipe(model, plan, val_examples, settings, accelerator, tracker, speed, checkpoint_dir,
                        collate or PaddedCollator(pad_token_id), param_groups).run()
        if sharded:  # full weights on every process again, for evaluation and the results
            sharding.unshard(model)
    finally:
        speed.restore(model)
    return result


class Recipe:
    """One training run; its state between steps is ``self.loop`` (what a checkpoint saves)."""

    def __init__(self, model: nn.Module, plan: BatchPlan, val_examples: list[dict], settings: TrainerSettings,
                 accelerator: Accelerator, tracker, speed: SpeedPaths, checkpoint_dir: Path | None,
                 val_collate=None, param_groups: list[dict] | None = None):
        self.model, self.plan, self.val_examples, self.settings = model, plan, val_examples, settings
        self.val_collate = val_collate or PaddedCollator(plan.collate.pad_token_id)
        self.param_groups = param_groups
        self.cfg, self.accelerator, self.tracker, self.speed = settings.cfg, accelerator, tracker, speed
        self.checkpoint_dir = checkpoint_dir
        self.writer = checkpoints.CheckpointWriter() if self.cfg.async_checkpoint else None
        self.updates = total_updates(self.cfg, plan.micro_batches_per_epoch(), settings.accumulation)
        self.loop, self.resumed_from, self.consecutive_skips = LoopState(), None, 0
        self.best: dict[str, torch.Tensor] | None = None  # trainer.select=best_val: the best step's weights (CPU)
        self.fingerprint = {"examples": len(plan.examples), "updates": self.updates, "batch_size": self.cfg.batch_size,
                            "micro_batch_size": self.cfg.micro_batch_size, "batching": plan.batching.value,
                            "seed": plan.seed}

    def run(self) -> TrainResult:
        self.setup_optimizer()
        self.resume()
        self.throughput = Throughput(self.loop, self.updates, self.resumed_from, flops_per_token(self.model),
                                     self.cfg.peak_tflops or default_peak_tflops(self.accelerator.device),
                                     self.accelerator.num_processes, self.accelerator.device)
        self.bar = tqdm(total=self.updates, initial=self.loop.step, unit="step",
                        disable=not (self.cfg.progress_bar and self.accelerator.is_main_process))
        self.batches = self.plan.epoch(self.loop.epoch)
        try:
            with StopSignals() as signals, logging_redirect_tqdm():  # log lines above the progress bar
                while self.loop.step < self.updates:
                    totals = self.train_step(self.next_group(), signals.received)
                    if totals is None:  # a non-finite loss skipped (trainer.nan_policy=skip)
                        continue
                    self.log(totals)
                    self.maybe_validate()
                    stop = signals.received if self.accelerator.num_processes == 1 else totals.stop
                    self.maybe_checkpoint(stop, signals.signum or signal.SIGTERM)  # SIGTERM: another process's
            return self.finish()
        finally:  # a failed run still completes the checkpoint under way (its error is logged, not raised)
            self.checkpoint_written(raise_error=False)

    def setup_optimizer(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.param_groups or self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=accelerator.device.type == "cuda")
        self.scheduler = make_scheduler(cfg, optimizer, self.updates, self.plan.micro_batches_per_epoch(),
                                        self.settings.accumulation)
        world = accelerator.num_processes
        if self.settings.accumulation < world:
            raise TrainerConfigError(
                f"trainer.batch_size={cfg.batch_size}, trainer.micro_batch_size={cfg.micro_batch_size}: "
                f"{self.settings.accumulation} micro-batch(es) per optimiser step, fewer than the {world} processes "
                "(batch_size counts examples over all of them)")
        if sharding.is_sharded(self.model):  # sharded already: accelerate must not wrap it in DDP
            self.objective = sharding.ShardedObjective(self.model, self.speed.loss)
            self.optimizer = accelerator.prepare(optimizer)
        else:
            self.objective, self.optimizer = accelerator.prepare(CausalLMObjective(self.model, self.speed.loss),
                                                                 optimizer)
        self.objective.train()

    def resume(self) -> None:
        """Continue from the checkpoint ``trainer.resume`` names, or start fresh (clearing stale ones)."""
        source = checkpoints.resume_source(self.settings, self.checkpoint_dir)
        if source is not None:
            self.loop = checkpoints.load_checkpoint(source, self.model, self.optimizer, self.scheduler,
                                                    self.fingerprint)
            self.resumed_from = self.loop.step
            self.best = checkpoints.load_best(source)
            log.info("resumed from %s (step %d of %d)", source, self.loop.step, self.updates)
        elif self.checkpoint_dir is not None and self.accelerator.is_main_process:
            checkpoints.clear_checkpoints(self.checkpoint_dir)
        if self.accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def next_group(self) -> list:
        """The micro-batches of the next optimiser step (an epoch's last step may be short)."""
        if self.loop.position >= len(self.batches):
            self.loop.epoch, self.loop.position = self.loop.epoch + 1, 0
            self.batches = self.plan.epoch(self.loop.epoch)
        return self.batches[self.loop.position : self.loop.position + self.settings.accumulation]

    def train_step(self, group: list, terminated: bool) -> StepTotals | None:
        """Forward, backward and update on ``group``; None when a non-finite loss skipped the step."""
        totals = forward_backward(self.objective, self.plan, group, self.accelerator, terminated)
        if not math.isfinite(totals.loss):
            self.skip_step(totals.loss)  # raises under trainer.nan_policy=stop, at this step's position
            self.loop.position += len(group)
            return None
        self.loop.position += len(group)
        self.consecutive_skips = 0
        update(self.optimizer, self.scheduler, self.params, self.accelerator, self.cfg.max_grad_norm)
        loop = self.loop
        loop.step, loop.tokens, loop.padded_tokens = loop.step + 1, loop.tokens + totals.tokens, \
            loop.padded_tokens + totals.padded
        loop.loss_history.append(totals.loss)
        self.throughput.step(loop, totals.tokens)
        self.bar.update(1)
        return totals

    def skip_step(self, value: float) -> None:
        """``trainer.nan_policy``: stop with the last finite state saved, or drop the step."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.nan_policy == NanPolicy.stop or self.consecutive_skips + 1 >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteLossError(nan_message(value, self.loop.step + 1, self.loop, self.cfg, self.save(wait=True)))
        log.warning("loss is %s at step %d: step skipped (trainer.nan_policy=skip)", value, self.loop.step + 1)
        self.loop.skipped_steps += 1
        self.consecutive_skips += 1

    def epoch_progress(self) -> float:
        return self.loop.epoch + self.loop.position / len(self.batches)

    def log(self, totals: StepTotals) -> None:
        loop = self.loop
        if loop.step % self.cfg.log_every and loop.step != self.updates:
            return
        stats = self.throughput.stats(loop, window_mean(loop, self.cfg.log_every), self.scheduler.get_last_lr()[0],
                                      self.epoch_progress())
        self.tracker.log(stats, loop.step)
        self.bar.set_postfix(progress_postfix(stats))
        if self.accelerator.is_main_process:  # Hydra's run.log and the console, whatever the progress bar
            log.info("%s", log_line(loop.step, self.updates, stats, self.throughput.eta(loop, self.updates)))

    def validate(self) -> None:
        loop = self.loop
        with self.throughput.paused("validation"):
            loop.val_loss = validation_loss(self.model, self.val_examples, self.val_collate,
                                            self.cfg.micro_batch_size, self.accelerator, self.speed)
            better = loop.best_val_loss is None or loop.val_loss < loop.best_val_loss
            if self.cfg.select == Select.best_val and better:
                loop.best_val_loss, loop.best_step = loop.val_loss, loop.step
                self.best = sharding.full_adapter_state(self.model)
        self.tracker.log({"val/loss": loop.val_loss}, loop.step)

    def select_weights(self) -> None:
        """trainer.select=best_val: end with the weights of the lowest validation loss (upstream's
        load_best_model_at_end); the reported validation loss is theirs."""
        loop = self.loop
        if self.best is None or loop.best_step == loop.step:
            return
        checkpoints.copy_adapter(self.model, self.best)
        log.info("trainer.select=best_val: adapter weights of step %d (validation loss %.4f; last step %d: %.4f)",
                 loop.best_step, loop.best_val_loss, loop.step, loop.val_loss)
        loop.val_loss = loop.best_val_loss

    def maybe_validate(self) -> None:
        every, step = self.cfg.eval_every, self.loop.step
        if self.val_examples and every > 0 and step % every == 0 and step < self.updates:
            self.validate()

    def save(self, wait: bool = False) -> Path | None:
        """A checkpoint of this step (``wait``: written before returning, even on the writer's thread)."""
        if self.checkpoint_dir is None:
            return None
        saved = checkpoints.save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.scheduler, self.loop,
                                            self.fingerprint, self.cfg.keep_checkpoints, self.best,
                                            main=self.accelerator.is_main_process, writer=self.writer)
        if wait:
            self.checkpoint_written()
        return saved

    def checkpoint_written(self, raise_error: bool = True) -> None:
        """Until the checkpoint being written on the writer's thread (if any) is on disk."""
        if self.writer is not None:
            self.writer.wait(raise_error)

    def maybe_checkpoint(self, stop: bool, signum: int) -> None:
        """Save every ``trainer.checkpoint_every`` steps, at the end, and when asked to stop (then exit)."""
        every, step = self.cfg.checkpoint_every, self.loop.step
        if not (every > 0 and step % every == 0 or step == self.updates or stop):
            return
        self.throughput.bank(self.loop)
        with self.throughput.paused("checkpoint") if self.checkpoint_dir is not None else contextlib.nullcontext():
            saved = self.save(wait=stop)  # a stopping run exits with its checkpoint on disk
        if stop:
            self.bar.close()
            log.warning("%s: checkpoint saved in %s at step %d; exiting", signal.Signals(signum).name, saved, step)
            raise SystemExit(128 + signum)

    def finish(self) -> TrainResult:
        self.throughput.bank(self.loop)
        steady = self.throughput.steady_rate(self.loop)
        self.bar.close()
        if self.val_examples:
            self.validate()
        self.select_weights()
        self.checkpoint_written()  # the last checkpoint, written during the final validation
        loss_final = window_mean(self.loop, self.cfg.log_every) if self.loop.loss_history else float("nan")
        return train_result(self.loop, self.throughput, steady, loss_final, self.epoch_progress(), self.resumed_from)
