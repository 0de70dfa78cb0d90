"""Reading and checking LLM-Adapters records: ``{"instruction", "input", "output", "answer"}``.

Every problem is reported with its file and record index. A file that cannot be read at
all fails at once; malformed records are skipped and counted, unless they exceed
``dataset.max_bad_record_share``, which fails the run before training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class DataError(ValueError):
    """A dataset problem, raised before any weight loads; the message names file, record or key."""


RECORD_KEYS = ("instruction", "input", "output", "answer")

log = logging.getLogger(__name__)


@dataclass
class RecordSet:
    """Valid records from one source, and what was skipped (index, reason)."""

    source: str
    records: list[dict] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)


def read_json_records(path: Path, key: str) -> list:
    """A JSON array or JSON Lines file as a list of raw items; DataError names ``key`` and the path."""
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{key}: {path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    if not text.strip():
        raise DataError(f"{key}: file is empty: {path}")
    if path.suffix == ".jsonl":
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{key}: {path}:{lineno}: not valid JSON ({err.msg})") from None
        return items
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{key}: {path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(items, list):
        raise DataError(f"{key}: {path}: expected a JSON array of records, got {type(items).__name__}")
    return items


def record_problem(item, need_output: bool, check_answer: Callable[[str], bool] | None) -> str | None:
    """Why a raw item is not a usable record, or None.

    Training records need ``instruction`` and ``output``; evaluation records need
    ``instruction`` and ``answer`` (and an answer that parses for the set). ``input`` may be
    absent (upstream files always carry it, user files may not); present keys must be strings.
    """
    if not isinstance(item, dict):
        return f"not an object ({type(item).__name__})"
    required = ("instruction", "output") if need_output else ("instruction", "answer")
    for key in RECORD_KEYS:
        if key not in item:
            if key in required:
                return f"missing key {key!r}"
            continue
        if not isinstance(item[key], str):
            return f"key {key!r} is {type(item[key]).__name__}, expected str"
    if not item["instruction"].strip():
        return "empty instruction"
    if need_output and not item["output"].strip():
        return "empty output"
    if check_answer is not None and not check_answer(item["answer"]):
        return f"answer {item['answer']!r} does not parse for this dataset"
    return None


def check_records(
    items: list,
    source: str,
    key: str,
    max_bad_share: float,
    need_output: bool = False,
    check_answer: Callable[[str], bool] | None = None,
) -> RecordSet:
    """Valid records (``input``/``output``/``answer`` default to "") and the skipped ones, each
    logged with ``source`` and index; DataError above ``max_bad_share``."""
    result = RecordSet(source=source)
    for index, item in enumerate(items):
        problem = record_problem(item, need_output, check_answer)
        if problem is None:
            result.records.append({"input": "", "output": "", "answer": "",
                                   **{k: item[k] for k in item if k in RECORD_KEYS}})
        else:
            result.skipped.append((index, problem))
    if not items:
        raise DataError(f"{key}: {source}: contains no records")
    share = len(result.skipped) / len(items)
    examples = "; ".join(f"record {i}: {why}" for i, why in result.skipped[:3])
    if share > max_bad_share:
        raise DataError(
            f"{key}: {source}: {len(result.skipped)} of {len(items)} records are malformed "
            f"({share:.1%} > dataset.max_bad_record_share={max_bad_share}); {examples}"
        )
    if result.skipped:
        log.warning("%s: %s: skipping %d of %d malformed records (%.1f%% <= dataset.max_bad_record_share=%s): %s%s",
                    key, source, len(result.skipped), len(items), 100 * share, max_bad_share, examples,
                    "; ..." if len(result.skipped) > 3 else "")
    return result
