"""Sweeps that survive a failing job and never redo a finished one.

- :class:`SweepSummary` (a Hydra callback, on in ``conf/hydra/default.yaml``) writes
  ``job_status.json`` into every job's folder (completed / failed with its error / skipped because
  finished earlier) and rewrites ``sweep_summary.{json,md}`` in the sweep folder after each job,
  so the summary exists even when Hydra stops with the first failure's error at the end.
- A job is "skipped (finished earlier)" by the rule ``pipeline.run`` follows (:func:`adapters_lab.runs.reusable`):
  its folder holds ``metrics.json`` with this job's config fingerprint; one with another config's
  results fails naming the keys that differ (``overwrite=true`` redoes it).
- :func:`sweep_cells` / :func:`cell_adapter`: the cells of a ``conf/sweep`` file and the adapter
  each needs, so a caller can leave out cells whose adapter config does not exist yet.
"""

from __future__ import annotations

import json
import logging
import math
import re
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from adapters_lab.config import CONF_DIR
from adapters_lab.files import write_json_atomic, write_text_atomic
from adapters_lab.runs import RunFolderError, reusable

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"
SUMMARY_NAME = "sweep_summary"


def metric_value(metrics: dict, key: str) -> float | None:
    """``metrics`` flattened with "/" at ``key`` as a finite float (what a sweeper optimises), else None."""
    node: Any = metrics
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        return None
    return float(node)


def write_summary(sweep_dir: Path) -> list[dict]:
    """Collect every job's status under ``sweep_dir`` into ``sweep_summary.json`` and ``.md``."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    for path in sweep_dir.rglob(STATUS_FILE):
        try:
            jobs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):  # a job writing its status right now
            continue
    jobs.sort(key=lambda job: (job.get("num", 0), job.get("dir", "")))
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    write_json_atomic(sweep_dir / f"{SUMMARY_NAME}.json", {"counts": counts, "jobs": jobs})
    lines = ["| job | status | overrides | result |", "|---|---|---|---|"]
    for job in jobs:
        result = job.get("error") or ("" if job.get("value") is None else f"{job['value']:.4f}")
        result = result.splitlines()[0].replace("|", "\\|") if result else ""
        lines.append(f"| {job['dir']} | {job['status']} | {' '.join(job['overrides'])} | {result} |")
    write_text_atomic(sweep_dir / f"{SUMMARY_NAME}.md", "\n".join(lines) + "\n")
    return jobs


def _relative(path: Path, root: str) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class SweepSummary(Callback):
    """Records each job's outcome; a failed job does not stop the others (Hydra runs the whole
    batch, then re-raises the first failure), and the summary lists them all."""

    def __init__(self) -> None:
        self._finished_before: dict[str, bool] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        out_dir = config.hydra.runtime.output_dir
        try:
            self._finished_before[out_dir] = reusable(Path(out_dir), config)
        except RunFolderError:  # an unreadable metrics.json: the job itself reports it
            self._finished_before[out_dir] = False

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        out_dir = Path(config.hydra.runtime.output_dir)
        record: dict[str, Any] = {
            "num": int(config.hydra.job.get("num") or 0),
            "dir": _relative(out_dir, config.hydra.sweep.dir) if config.hydra.mode == RunMode.MULTIRUN else str(out_dir),
            "overrides": list(config.hydra.overrides.task),
        }
        if job_return.status == JobStatus.COMPLETED:
            record["status"] = "skipped (finished earlier)" if self._finished_before.get(str(out_dir)) else "completed"
            value = job_return.return_value
            record["value"] = float(value) if isinstance(value, (int, float)) else None
        else:
            err = job_return._return_value  # the exception; .return_value would re-raise it
            record["status"] = "failed"
            record["error"] = f"{type(err).__name__}: {err}"
            record["traceback"] = "".join(traceback.format_exception(type(err), err, err.__traceback__))
            if config.hydra.mode == RunMode.MULTIRUN:  # a single run's error is run.py's to print
                log.error("job %s failed: %s", out_dir.name, record["error"])
        write_json_atomic(out_dir / STATUS_FILE, record)
        if config.hydra.mode == RunMode.MULTIRUN:
            write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = write_summary(Path(config.hydra.sweep.dir))
        failed = [job["dir"] for job in jobs if job["status"] == "failed"]
        log.info("sweep summary: %d jobs, %d failed -> %s", len(jobs), len(failed),
                 Path(config.hydra.sweep.dir) / f"{SUMMARY_NAME}.md")


def sweep_cells(sweep: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The ``experiment`` values a ``conf/sweep/<sweep>.yaml`` runs, in order."""
    node = OmegaConf.load(conf_dir / "sweep" / f"{sweep}.yaml")
    value = OmegaConf.select(node, "hydra.sweeper.params.experiment")
    if value is None:
        raise ValueError(f"sweep={sweep}: conf/sweep/{sweep}.yaml has no hydra.sweeper.params.experiment")
    return [cell.strip() for cell in str(value).split(",") if cell.strip()]


_ADAPTER_OVERRIDE = re.compile(r"override\s+/adapter$")


def cell_adapter(experiment: str, conf_dir: Path = CONF_DIR) -> str | None:
    """The adapter an experiment file selects, following ``/experiment/...`` includes."""
    path = conf_dir / "experiment" / f"{experiment}.yaml"
    for entry in OmegaConf.load(path).get("defaults", []):
        if isinstance(entry, str) and entry.startswith("/experiment/"):
            found = cell_adapter(entry.removeprefix("/experiment/").split("@")[0], conf_dir)
            if found:
                return found
        elif isinstance(entry, (dict, DictConfig)):
            for key, value in entry.items():
                if _ADAPTER_OVERRIDE.match(str(key)):
                    return str(value)
    return None


def available_cells(sweep: str, conf_dir: Path = CONF_DIR) -> tuple[list[str], list[str]]:
    """(cells whose adapter config exists, cells left out because ``conf/adapter/<name>.yaml`` is missing)."""
    kept, missing = [], []
    for cell in sweep_cells(sweep, conf_dir):
        adapter = cell_adapter(cell, conf_dir)
        (kept if adapter is None or (conf_dir / "adapter" / f"{adapter}.yaml").is_file() else missing).append(cell)
    return kept, missing
