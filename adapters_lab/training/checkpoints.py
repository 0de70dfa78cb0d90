"""Checkpoints that resume exactly: ``<dir>/step-NNNNNNN/{adapter_model.safetensors,
trainer_state.pt}`` hold the adapter weights, the optimiser and scheduler, the RNG states and the
loop state (step, data position, counters); ``latest.json`` is written last (atomically), so it
only ever names a complete checkpoint. Older ones are rotated out (``trainer.keep_checkpoints``).
With ``trainer.async_checkpoint`` the state is copied to the CPU at the step it describes and the
files are written on a background thread (``CheckpointWriter``) while training goes on.
A sharded run (``trainer.distributed=fsdp``) gathers the whole adapter and its optimiser state (keyed by
parameter name) from every process and process 0 writes them: any number of processes resumes it."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from adapters_lab.adapters.base import adapter_state_dict
from adapters_lab.config import ResumeMode, TrainerConfigError
from adapters_lab.files import atomic_path, write_json_atomic
from adapters_lab.training import sharding
from adapters_lab.training.settings import STATE_FILE, TrainerSettings

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
BEST_FILE = "best_adapter_model.safetensors"  # trainer.select=best_val: the best validation step's weights
LATEST = "latest.json"


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
    best_val_loss: float | None = None  # trainer.select=best_val: the lowest validation loss so far
    best_step: int | None = None  # and its step


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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, as a rule); the message is one line."""


@contextlib.contextmanager
def written(folder: Path):
    """A failed write under ``folder`` as one line naming the folder, the free space and the cause
    (torch.save reports a full disk as "[enforce fail at inline_container.cc:...] unexpected pos")."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        cause = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        raise CheckpointWriteError(
            f"trainer checkpoint: could not write {folder} ({free / 2**20:,.1f} MiB free): {cause}; free space "
            "there or raise trainer.checkpoint_every") from err


class CheckpointWriter:
    """Writes one checkpoint at a time on a background thread: the next ``snapshot`` and ``wait`` wait
    for the write before, and raise its error (a ``CheckpointWriteError``) there. The state is copied
    into CPU buffers kept from one checkpoint to the next (pinned beside a GPU): a copy into memory
    already mapped, not page faults over gigabytes. The thread is not a daemon: an interpreter that
    exits mid-write finishes it first."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}

    def snapshot(self, state):
        """``state`` with every tensor copied into this writer's buffers: what the next optimiser
        step cannot change. Waits for the write under way first (it reads the buffers)."""
        self.wait()
        copied = self._copy(state, ())
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the device-to-host copies are asynchronous
        return copied

    def _copy(self, value, key: tuple):
        if isinstance(value, torch.Tensor):
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=value.is_cuda)
                self._buffers[key] = buffer
            return buffer.copy_(value.detach(), non_blocking=value.is_cuda)
        if isinstance(value, dict):
            return {name: self._copy(item, key + (name,)) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(item, key + (index,)) for index, item in enumerate(value))
        return copy.deepcopy(value)

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="checkpoint-writer")
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as error:  # raised in the training thread by the next snapshot or wait
            self._error = error

    def wait(self, raise_error: bool = True) -> None:
        """Until the pending write is done; then its error, if any (logged instead: ``raise_error=False``)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error
        if error is not None:
            log.error("trainer checkpoint: %s", error)


def trained_state(model: nn.Module, optimizer, on_cpu: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter weights and the optimiser state to save, whole (gathered from every process when sharded:
    all of them call it); a sharded run's optimiser state is keyed by parameter name. ``on_cpu=False``:
    an unsharded model's weights where they are (a ``CheckpointWriter`` copies them)."""
    if sharding.is_sharded(model):
        return sharding.full_adapter_state(model), {"optimizer": sharding.optimizer_state_by_name(model, optimizer),
                                                    "optimizer_keys": "names"}
    tensors = {name: t.contiguous().cpu() if on_cpu else t for name, t in adapter_state_dict(model).items()}
    return tensors, {"optimizer": optimizer.state_dict()}


def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, loop: LoopState,
                    fingerprint: dict, keep: int, best: dict[str, torch.Tensor] | None = None,
                    main: bool = True, writer: CheckpointWriter | None = None) -> Path | None:
    """Write a checkpoint (process 0: ``main``; the others only take part in gathering a sharded model's),
    on ``writer``'s thread if one is given (the state is copied first), else before returning."""
    if not (main or sharding.is_sharded(model)):
        return None
    tensors, optimizer_state = trained_state(model, optimizer, on_cpu=writer is None)
    if not main:
        return None
    folder = Path(directory) / f"step-{loop.step:07d}"
    state = {"loop": asdict(loop), **optimizer_state, "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "fingerprint": fingerprint}
    if writer is None:
        write_checkpoint(folder, tensors, state, best, keep)
    else:
        snapshot = writer.snapshot((tensors, state, best))
        writer.submit(lambda: write_checkpoint(folder, *snapshot, keep))
    return folder


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict,
                     best: dict[str, torch.Tensor] | None, keep: int) -> None:
    """The files of one checkpoint, then ``latest.json`` naming it, then the rotation of old ones."""
    folder.mkdir(parents=True, exist_ok=True)
    with written(folder):
        with atomic_path(folder / ADAPTER_FILE) as tmp:
            save_file(tensors, str(tmp))
        with atomic_path(folder / STATE_FILE) as tmp:
            torch.save(state, tmp)
        if best is not None:
            with atomic_path(folder / BEST_FILE) as tmp:
                save_file(best, str(tmp))
    write_json_atomic(folder.parent / LATEST, {"step": state["loop"]["step"], "folder": folder.name})
    for old in sorted(folder.parent.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


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


def resume_source(settings: TrainerSettings, directory: Path | None) -> Path | None:
    """The checkpoint ``trainer.resume`` continues from, or None for a fresh start."""
    if settings.resume == ResumeMode.auto:
        return latest_checkpoint(directory)
    return settings.resume_from  # None for never


def load_best(folder: Path) -> dict[str, torch.Tensor] | None:
    """The best validation step's adapter weights a checkpoint holds (trainer.select=best_val), or None."""
    return load_file(str(folder / BEST_FILE)) if (folder / BEST_FILE).is_file() else None


def copy_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    sharding.load_full_state(model, tensors)


def load_optimizer(model: nn.Module, optimizer, state: dict) -> None:
    """The optimiser state of a checkpoint made with any number of processes, sharded or not."""
    by_name = state.get("optimizer_keys") == "names"
    if not (by_name or sharding.is_sharded(model)):
        optimizer.load_state_dict(state["optimizer"])
        return
    saved = state["optimizer"] if by_name else sharding.by_name(model, optimizer, state["optimizer"])
    sharding.load_optimizer_state_by_name(model, optimizer, saved)


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, fingerprint: dict) -> LoopState:
    state = torch.load(folder / STATE_FILE, weights_only=False)
    changed = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items() if state["fingerprint"].get(k) != v}
    if changed:
        raise TrainerConfigError(
            f"trainer.resume: checkpoint {folder} was made with other settings "
            + ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            + "; use a new output folder or trainer.resume=never")
    tensors = load_file(str(folder / ADAPTER_FILE))
    if set(tensors) != set(adapter_state_dict(model)):
        raise TrainerConfigError(f"trainer.resume: {folder / ADAPTER_FILE} does not match the injected adapter")
    copy_adapter(model, tensors)
    load_optimizer(model, optimizer, state)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return LoopState(**state["loop"])
