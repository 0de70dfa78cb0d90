"""A run folder belongs to one config.

- :func:`fingerprint`: every config key that changes the result (model, adapter, data, trainer,
  evaluation, seed, exports), flattened; not where files go, logging, progress display, resume or
  checkpoint cadence (:data:`NOT_RESULT`). It is stored in ``fingerprint.json`` when a run starts
  (beside its checkpoints) and in ``metrics.json`` when it ends; a stored one is read under today's key
  names (``config.MOVED_KEYS``: ``trainer.val_set_size`` is ``dataset.val_set_size``), so a folder made
  before a key moved still belongs to its config.
- :class:`RunFolder`: an exclusive ``flock`` on ``<folder>/.lock`` for the run's life (the kernel
  drops it when the process dies, so a dead holder's lock file is simply taken over); a finished
  folder is reused only when its fingerprint matches, an unfinished one (checkpoints) only resumed when
  it matches; otherwise the run stops naming the keys that differ, unless ``overwrite=true``. An
  overwrite builds the new results in ``<folder>/.staging/`` and moves them in only once they are
  complete, ``metrics.json`` last, so a failure leaves the old results whole.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from adapters_lab.config import MOVED_KEYS
from adapters_lab.files import OutputDirError, write_json_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = ".lock"
STAGING = ".staging"
REPLACED = ".replaced"
# Not results: Hydra's record of the latest invocation, its log, the sweep's status of this job, the lock.
NOT_RESULTS = {".hydra", LOCK_FILE, STAGING, REPLACED, "job_status.json"}
# Written again by every run before it computes anything: a folder holding only these has no results yet.
SETUP = {"config.yaml", FINGERPRINT_FILE, "base_model", "wandb"}

# Keys that say where or how visibly a run works, not what it computes.
NOT_RESULT = ("hydra", "paths", "logger", "overwrite", "optimized_metric", "trainer.progress_bar", "trainer.log_every",
              "trainer.device", "trainer.distributed", "trainer.resume", "trainer.checkpoint_every", "trainer.keep_checkpoints",
              "trainer.async_checkpoint", "trainer.peak_tflops", "eval.batch_size", "eval.decoder")


class RunFolderError(OutputDirError):
    """The run folder holds another config's results, or another process is using it."""


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = node


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The result-changing keys of ``cfg`` (resolved), flattened with "." and sorted."""
    flat: dict[str, Any] = {}
    for key in cfg:
        if key not in NOT_RESULT:
            _flatten(OmegaConf.to_container(cfg[key], resolve=True, enum_to_str=True) if OmegaConf.is_config(cfg[key])
                     else cfg[key], str(key), flat)
    flat = {k: v for k, v in flat.items() if not any(k == x or k.startswith(x + ".") for x in NOT_RESULT)}
    return json.loads(json.dumps(dict(sorted(flat.items())), default=str))  # as it reads back from disk


def current_names(stored: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored fingerprint with each moved key under its new name (``config.MOVED_KEYS``)."""
    if stored is None:
        return None
    return dict(sorted((MOVED_KEYS.get(key, key), value) for key, value in stored.items()))


def differences(old: dict[str, Any], new: dict[str, Any], most: int = 8) -> str:
    """``"trainer.lr: 0.0003 -> 0.01, ..."`` for the keys whose values differ (absent: ``<none>``)."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k, "<none>") != new.get(k, "<none>")]
    text = ", ".join(f"{k}: {old.get(k, '<none>')} -> {new.get(k, '<none>')}" for k in keys[:most])
    return text + (f" (and {len(keys) - most} more)" if len(keys) > most else "")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{path}: unreadable ({err}); remove it or set overwrite=true") from err


def stored_fingerprint(folder: Path) -> tuple[str, dict | None] | None:
    """("finished" | "unfinished", its fingerprint or None) for a folder holding results, else None."""
    folder = Path(folder)
    metrics = _read_json(folder / METRICS_FILE)
    if metrics is not None:
        return "finished", current_names(metrics.get("fingerprint"))
    if folder.is_dir() and any(_is_result(p) for p in folder.iterdir() if p.name not in SETUP):
        return "unfinished", current_names(_read_json(folder / FINGERPRINT_FILE))
    return None


def _is_result(path: Path) -> bool:
    """A file or a folder holding a file (checkpoints, predictions, adapter), not Hydra's or the lock."""
    if path.name in NOT_RESULTS or path.suffix == ".log" or (path.name.startswith(".") and path.suffix == ".tmp"):
        return False  # (an atomic write's temporary file is not a result yet)
    return path.is_file() or any(p.is_file() for p in path.rglob("*"))


def reusable(folder: Path, cfg: DictConfig) -> bool:
    """True when a run of ``cfg`` into ``folder`` would return the finished results instead of running."""
    stored = stored_fingerprint(folder)
    return (not cfg.get("overwrite", False) and stored is not None and stored[0] == "finished"
            and stored[1] == fingerprint(cfg))


def check_checkpoint(checkpoint: Path, new: dict) -> None:
    """``trainer.resume=<folder>``: that checkpoint's run must have had this config's fingerprint."""
    for run_dir in (Path(checkpoint).parent.parent, Path(checkpoint).parent):
        old = current_names(_read_json(run_dir / FINGERPRINT_FILE))
        if old is not None:
            if old != new:
                raise RunFolderError(f"trainer.resume={checkpoint}: made with other settings ({differences(old, new)})")
            return
    log.warning("trainer.resume=%s: no %s beside it; its settings cannot be checked", checkpoint, FINGERPRINT_FILE)


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.lock`` that names its holder."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise OutputDirError(f"paths.output_dir={self.path.parent}: not writable ({err.strerror or err})") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(f"paths.output_dir={self.path.parent}: in use by {self.holder()}; wait for it to "
                                 "end or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self.fd = fd

    def holder(self) -> str:
        for _ in range(20):  # the holder writes its PID just after it takes the lock
            try:
                info = json.loads(self.path.read_text())
                return f"process {info['pid']} on {info['host']}"
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        return f"another process (lock {self.path})"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunFolder:
    """The run folder of one config: lock, skip/resume/refuse rule, and the overwrite staging area.

    Only the main process (``main``) locks and changes files; every process computes the same decisions
    from the same files, so data-parallel processes sharing process 0's folder agree; ``share`` (process
    0's value on every process) tells them whether process 0 got the lock."""

    def __init__(self, folder: Path, cfg: DictConfig, main: bool = True, share: Callable[[Any], Any] | None = None):
        self.folder, self.main, self.share = Path(folder), main, share
        self.fingerprint, self.overwrite = fingerprint(cfg), bool(cfg.get("overwrite", False))
        self.lock = FolderLock(self.folder)
        self.work: Path = self.folder

    def __enter__(self) -> RunFolder:
        error = None
        if self.main:
            try:
                self.lock.acquire()
            except RunFolderError as err:
                error = str(err)
        if self.share is not None:
            error = self.share(error)
        if error is not None:
            raise RunFolderError(error)
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def finished(self) -> dict | None:
        """The metrics of a finished run of this config (to return instead of running), else None;
        raises when the folder holds another config's results and ``overwrite`` is off. Decided by the
        main process (the others would race its writes) and shared."""
        outcome: tuple[str, Any] = ("none", None)
        if self.main:
            try:
                outcome = ("metrics", self._finished())
            except RunFolderError as err:
                outcome = ("error", str(err))
        if self.share is not None:
            outcome = self.share(outcome)
        if outcome[0] == "error":
            raise RunFolderError(outcome[1])
        return outcome[1]

    def _finished(self) -> dict | None:
        stored = stored_fingerprint(self.folder)
        if stored is None:
            return None
        state, old = stored
        if old == self.fingerprint and not self.overwrite:
            return _read_json(self.folder / METRICS_FILE) if state == "finished" else None
        if self.overwrite:
            return None
        what = "a finished run" if state == "finished" else "an unfinished run (checkpoints, partial results)"
        diff = differences(old, self.fingerprint) if old is not None else f"it has no {FINGERPRINT_FILE}"
        raise RunFolderError(f"paths.output_dir={self.folder} holds {what} with other settings ({diff}); "
                             "overwrite=true replaces it once the new run has finished, or choose another folder")

    def prepare(self) -> Path:
        """The folder this run writes into: the run folder, or under ``overwrite`` with results already
        there, ``.staging/`` in it (kept when it holds a run of this config, to resume; else emptied)."""
        if self.main:
            if self.overwrite and stored_fingerprint(self.folder) is not None:
                self.work = self.folder / STAGING
                if self.work.exists() and current_names(_read_json(self.work / FINGERPRINT_FILE)) != self.fingerprint:
                    shutil.rmtree(self.work)
            write_json_atomic(self.work / FINGERPRINT_FILE, self.fingerprint)
        if self.share is not None:
            self.work = Path(self.share(str(self.work)))
        return self.work

    def commit(self) -> None:
        """Move a finished staging area's results in place of the old ones, ``metrics.json`` out first
        and in last: whatever happens between, the folder never counts as finished with mixed results."""
        if not self.main or self.work == self.folder:
            return
        trash = self.folder / REPLACED
        shutil.rmtree(trash, ignore_errors=True)
        trash.mkdir()
        old = [p for p in self.folder.iterdir() if p.name not in NOT_RESULTS and p.suffix != ".log"]
        for path in sorted(old, key=lambda p: p.name != METRICS_FILE):
            os.replace(path, trash / path.name)
        new = [p for p in self.work.iterdir()]
        for path in sorted(new, key=lambda p: p.name == METRICS_FILE):
            os.replace(path, self.folder / path.name)
        self.work.rmdir()
        shutil.rmtree(trash, ignore_errors=True)
        log.info("overwrite: the new results replace the old ones in %s", self.folder)
        self.work = self.folder
