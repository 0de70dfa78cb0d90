"""Evaluation progress: a log line per batch (examples done, examples/s, ETA), and each finished set's
result kept under ``predictions/partial/`` so that a killed evaluation resumes at the next
unfinished set.

A kept result is reused only when its key matches: a hash of the set's prompts and labels, the
evaluation settings that change a score, and the model's trainable weights (its config where none
train), so results of another adapter, another decoding or other data are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from enum import Enum
from pathlib import Path

import torch.nn as nn

from adapters_lab.files import write_json_atomic

log = logging.getLogger(__name__)
SCORE_KEYS = ("num_beams", "max_new_tokens", "protocol", "scoring", "prompt_template", "decoder")
PARTIAL = "partial"


class Progress:
    """``log`` a line after each batch: ``what``: done/total, per second, ETA."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done, self.start = what, total, 0, time.perf_counter()

    def advance(self, count: int) -> str:
        self.done += count
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = f"{self.what}: {self.done}/{self.total} examples, {rate:.1f}/s, ETA {eta:.0f}s"
        log.info("%s", line)
        return line


def model_digest(model: nn.Module | None) -> str:
    """A hash of the trainable weights (the adapter), or of the config when nothing trains."""
    digest = hashlib.sha256()
    if model is None:
        return "no model"
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for name, param in trainable:
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    if not trainable:
        config = getattr(model, "config", None)
        digest.update((config.to_json_string() if config is not None else type(model).__name__).encode())
    return digest.hexdigest()


def setting(value) -> str:
    """A score setting as text: an enum choice by its value (``paper``), a number as written."""
    return value.value if isinstance(value, Enum) else str(value)


def set_key(model_hash: str, cfg, name: str, prompts: list[str], records: list[dict]) -> str:
    settings = {key: setting(getattr(cfg, key)) for key in SCORE_KEYS}
    payload = json.dumps([model_hash, settings, name, prompts, [r["answer"] for r in records]])
    return hashlib.sha256(payload.encode()).hexdigest()


def load_finished(predictions_dir: Path | None, name: str, key: str) -> dict | None:
    """A kept ``{"result", "lines"}`` of set ``name`` whose key matches, or None."""
    path = predictions_dir / PARTIAL / f"{name}.json" if predictions_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if kept.get("key") != key:
        return None
    log.info("eval %s: reusing the result kept in %s (same model, settings and data)", name, path)
    return {"result": kept["result"], "lines": kept["lines"]}


def save_finished(predictions_dir: Path | None, name: str, key: str, result: dict, lines: list[dict]) -> None:
    if predictions_dir is not None:
        write_json_atomic(predictions_dir / PARTIAL / f"{name}.json", {"key": key, "result": result, "lines": lines})
