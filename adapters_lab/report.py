"""A run's report in ``metrics.json`` (``report``), in the spirit of HF PEFT's method comparison:
wall seconds of training and evaluation, peak and 99th-percentile reserved GPU memory, the adapter's
size on disk, parameter counts, package versions, the model's revision and a hash of each data file.

Reserved memory (the caching allocator's ``memory_reserved``, what the process holds on the GPU)
is sampled by ``MemorySampler``, a daemon thread, every ``interval`` seconds while the run goes;
off a GPU both figures are None.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import platform
import threading
from pathlib import Path

import torch

from adapters_lab.config import ModelInit

PACKAGES = ("torch", "transformers", "accelerate", "peft")
GIB = 2**30


class MemorySampler:
    """Reserved GPU memory every ``interval`` seconds on a daemon thread (nothing off a GPU)."""

    def __init__(self, device: torch.device, interval: float = 0.1):
        self.device, self.samples = device, []
        self._stop = threading.Event()
        self._thread = None
        if device.type == "cuda":
            self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
            self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.samples.append(torch.cuda.memory_reserved(self.device))

    def stop(self) -> dict:
        """Peak (the allocator's own high-water mark) and p99 of the samples, GiB; None off a GPU."""
        self._stop.set()
        if self._thread is None:
            return {"peak_reserved_gib": None, "p99_reserved_gib": None, "samples": 0}
        self._thread.join()
        p99 = percentile(self.samples or [torch.cuda.memory_reserved(self.device)], 0.99)
        return {"peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB, "p99_reserved_gib": p99 / GIB,
                "samples": len(self.samples)}


def percentile(samples: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1): the smallest sample with at least ``q`` of them at or below it."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    """Python and the packages that decide the numbers (None: not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def model_revision(model_cfg) -> str:
    """Where the weights came from: ``tiny`` or ``model.init=random`` (random init), ``sha256:...`` of a
    local folder's files (names and contents), or the hub commit of the cached snapshot (``model.revision``
    otherwise)."""
    if model_cfg.tiny is not None:
        return "tiny (random init)"
    if model_cfg.init == ModelInit.random:
        return f"{model_cfg.name} shape (random init)"
    if model_cfg.local_path:
        folder = Path(model_cfg.local_path).expanduser()
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + sha256(path).encode())
        return f"sha256:{digest.hexdigest()}"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_cfg.hub_id, "config.json", revision=model_cfg.revision)
    except Exception:  # an id the hub library rejects: report what was asked for
        cached = None
    if isinstance(cached, str) and "/snapshots/" in cached:
        return f"{model_cfg.hub_id}@{cached.split('/snapshots/')[1].split('/')[0]}"
    return f"{model_cfg.hub_id}@{model_cfg.revision or 'main'}"


def eval_seconds(eval_metrics: dict) -> float:
    """Evaluation wall time: the sets' generation shares and scoring, plus likelihood scoring."""
    sets = [r for r in eval_metrics.values() if isinstance(r, dict)]
    return sum(r.get("seconds", 0.0) + r.get("likelihood_seconds", 0.0) for r in sets)


def folder_bytes(folder: Path) -> int | None:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else None


def run_report(metrics: dict, model_cfg, data_files: list[Path], adapter_dir: Path, sampler: MemorySampler) -> dict:
    """The report of a finished run from its ``metrics`` (train, eval, params), the data files it
    read, its adapter folder and the memory sampler that ran beside it."""
    train = metrics.get("train") or {}
    return {
        "train_seconds": train.get("seconds"),
        "eval_seconds": eval_seconds(metrics.get("eval", {})),
        **sampler.stop(),
        "adapter_bytes": folder_bytes(adapter_dir),
        "params": dict(metrics.get("params", {})),
        "versions": versions(),
        "model_revision": model_revision(model_cfg),
        "data_sha256": {str(path): sha256(path) for path in data_files if path.is_file()},
    }
