"""Where each dataset name lives under ``paths.data_dir`` (the LLM-Adapters repository layout),
and loading a run's training, validation and evaluation records before any model is built.

Training sources (``dataset.train``): an upstream training-set name (``ft-training_set/<name>.json``),
an evaluation set's train split (``dataset/<NAME>/train.json``: boolq, ARC-Easy, ARC-Challenge,
openbookqa exist), ``gsm8k`` (OpenAI's ``gsm8k/train.jsonl`` under ``paths.data_root``, converted),
``hf:<id>[:<split>]`` (a hub dataset in the record format, through ``datasets.load_dataset``),
``arith`` (synthetic), or a path to a JSON/JSONL file in the record format.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from adapters_lab.answers import label_parses
from adapters_lab.config import DatasetConfig, EvalConfig, MissingSets, PathsConfig, Scoring
from adapters_lab.data.arith import arith_splits
from adapters_lab.data.records import DataError, RecordSet, check_records, read_json_records
from adapters_lab.data.tasks import SUITES, TASKS

TRAIN_FILES = {
    name: f"ft-training_set/{name}.json"
    for name in ("math_10k", "math_7k", "math_14k", "math_50k", "math_data", "commonsense_170k", "commonsense_15k")
}
MATH_SETS = SUITES["math"]
COMMONSENSE_SETS = SUITES["commonsense"]
SYNTHETIC = "arith"
GSM8K_TRAIN = "gsm8k"
HUB_PREFIX = "hf:"
CALCULATOR_NOTE_RE = re.compile(r"<<[^<>]*>>")
log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """A run's records: training, validation and each evaluation set by name."""

    train: list[dict]
    val: list[dict]
    eval_sets: dict[str, list[dict]]
    skipped: dict[str, int] = field(default_factory=dict)  # source -> malformed records skipped
    missing_sets: list[str] = field(default_factory=list)  # evaluation sets without a file (eval.missing_sets=skip)


def expand_eval_sets(names: list[str]) -> list[str]:
    """Suite names become their sets; order kept, duplicates dropped."""
    expanded: list[str] = []
    for name in names:
        for item in SUITES.get(name, [name]):
            if item not in expanded:
                expanded.append(item)
    return expanded


def train_path(spec: str, paths: PathsConfig) -> Path:
    """A training source name or path as a file path (not checked for existence)."""
    if spec in TRAIN_FILES:
        return Path(paths.data_dir) / TRAIN_FILES[spec]
    if spec == GSM8K_TRAIN:
        return Path(paths.data_root) / "gsm8k" / "train.jsonl"
    if spec in TASKS:
        return Path(paths.data_dir) / "dataset" / spec / "train.json"
    return Path(spec).expanduser()


def gsm8k_record(item):
    """OpenAI GSM8K ``{"question", "answer": "...<<a*b=c>>...\\n#### N"}`` as a record: calculator
    notes removed, the rationale ending "The answer is N.". An item without that shape stays
    as it is, or keeps an unparsable ``answer``, so the record check reports it."""
    if not (isinstance(item, dict) and isinstance(item.get("question"), str) and isinstance(item.get("answer"), str)):
        return item
    rationale, sep, final = item["answer"].rpartition("####")
    if not sep:
        rationale, final = final, ""
    rationale = CALCULATOR_NOTE_RE.sub("", rationale).strip()
    number = final.strip().replace(",", "")
    if label_parses(GSM8K_TRAIN, number):
        rationale = f"{rationale}\nThe answer is {number}."
    return {"instruction": item["question"], "input": "", "output": rationale, "answer": number}


def hub_items(spec: str, key: str) -> list:
    """``hf:<id>[:<split>]`` through ``datasets.load_dataset`` (needs the network or a local cache)."""
    dataset_id, _, split = spec[len(HUB_PREFIX):].partition(":")
    if not dataset_id:
        raise DataError(f"{key}: expected hf:<dataset id>[:<split>]")
    from datasets import load_dataset

    try:
        return list(load_dataset(dataset_id, split=split or "train"))
    except Exception as err:  # datasets raises many types (connection, missing split, ...)
        raise DataError(f"{key}: could not load hub dataset {dataset_id!r} split {split or 'train'!r}: {err}") from err


def train_items(spec: str, paths: PathsConfig, key: str) -> tuple[list, str]:
    """Raw training items and the source they came from (file path or hub id)."""
    if spec.startswith(HUB_PREFIX):
        return hub_items(spec, key), spec
    path = train_path(spec, paths)
    items = read_json_records(path, key)
    if spec == GSM8K_TRAIN:
        items = [gsm8k_record(item) for item in items]
    return items, str(path)


def eval_path(name: str, paths: PathsConfig) -> Path:
    return Path(paths.data_dir) / TASKS[name].file


def data_files(dataset: DatasetConfig, paths: PathsConfig, needs_train: bool = True) -> list[Path]:
    """The files a run reads: its training file (not the synthetic or a hub set) and each evaluation set's."""
    files = []
    if needs_train and dataset.train != SYNTHETIC and not dataset.train.startswith(HUB_PREFIX):
        files.append(train_path(dataset.train, paths))
    return files + [eval_path(name, paths) for name in expand_eval_sets(list(dataset.eval_sets)) if name != SYNTHETIC]


def missing_eval_sets(dataset: DatasetConfig, eval_cfg: EvalConfig, paths: PathsConfig) -> list[str]:
    """Under ``eval.missing_sets=skip``, the known evaluation sets whose test file does not exist
    (logged); DataError when none of the asked-for sets exists. Empty under ``fail``."""
    if eval_cfg.missing_sets != MissingSets.skip:
        return []
    names = expand_eval_sets(list(dataset.eval_sets))
    missing = [n for n in names if n in TASKS and n != SYNTHETIC and not eval_path(n, paths).is_file()]
    if names and len(missing) == len(names):
        raise DataError(f"dataset.eval_sets={names}: none of these files exists under {paths.data_dir}/dataset/ "
                        "(eval.missing_sets=skip needs at least one)")
    for name in missing:
        log.warning("eval.missing_sets=skip: leaving out %s (no file %s)", name, eval_path(name, paths))
    return missing


def check_scoring(eval_cfg: EvalConfig, names: list[str]) -> None:
    """``eval.scoring=likelihood`` needs sets whose answer is one of a fixed list."""
    if eval_cfg.scoring != Scoring.likelihood:
        return
    free = [name for name in names if not TASKS[name].fixed_answers]
    if free:
        raise DataError(f"eval.scoring=likelihood: {free} have free-number answers, not a fixed list of options; "
                        "use eval.scoring=both (likelihood where it applies) or drop them from dataset.eval_sets")


def split_validation(train: list[dict], size: int, seed: int, source: str) -> tuple[list[dict], list[dict]]:
    """``size`` records drawn by a seeded shuffle as the validation split, the rest in file order."""
    if size <= 0:
        return train, []
    if size >= len(train):
        raise DataError(f"dataset.val_set_size={size} leaves no training data "
                        f"({len(train)} records in dataset.train={source})")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:size])
    return ([r for i, r in enumerate(train) if i not in val_ids], [r for i, r in enumerate(train) if i in val_ids])


def load_task_data(dataset: DatasetConfig, eval_cfg: EvalConfig, paths: PathsConfig, seed: int,
                   needs_train: bool = True) -> TaskData:
    """Read and check every file the run needs; raises DataError naming the key and path."""
    for key in ("batch_size", "num_beams", "max_new_tokens", "limit"):
        value = getattr(eval_cfg, key)
        if value is not None and value < 1:
            raise DataError(f"eval.{key}={value}: must be at least 1")
    skipped: dict[str, int] = {}
    synthetic_train, synthetic_test = arith_splits(
        dataset.arith.num_train, dataset.arith.num_test, dataset.arith.max_operand, dataset.arith.seed
    ) if SYNTHETIC in (dataset.train, *dataset.eval_sets) else ([], [])

    def keep(result: RecordSet) -> list[dict]:
        if result.skipped:
            skipped[result.source] = len(result.skipped)
        return result.records

    train: list[dict] = []
    if needs_train:
        if dataset.train == SYNTHETIC:
            train = list(synthetic_train)
        else:
            key = f"dataset.train={dataset.train}"
            items, source = train_items(dataset.train, paths, key)
            check_answer = (lambda answer: label_parses(GSM8K_TRAIN, answer)) if dataset.train == GSM8K_TRAIN else None
            train = keep(check_records(items, source, key, dataset.max_bad_record_share, need_output=True,
                                       check_answer=check_answer))
        if dataset.limit_train is not None:
            train = train[: dataset.limit_train]

    eval_sets: dict[str, list[dict]] = {}
    missing = missing_eval_sets(dataset, eval_cfg, paths)
    for name in (n for n in expand_eval_sets(list(dataset.eval_sets)) if n not in missing):
        if name not in TASKS:
            raise DataError(
                f"dataset.eval_sets: unknown evaluation set {name!r} "
                f"(known: {sorted(TASKS)} and suites {sorted(SUITES)})"
            )
        if name == SYNTHETIC:
            records = list(synthetic_test)
        else:
            path = eval_path(name, paths)
            items = read_json_records(path, f"dataset.eval_sets[{name}]")
            records = keep(check_records(
                items, str(path), f"dataset.eval_sets[{name}]", dataset.max_bad_record_share,
                check_answer=lambda answer, n=name: label_parses(n, answer),
            ))
        eval_sets[name] = records[: eval_cfg.limit] if eval_cfg.limit else records
    check_scoring(eval_cfg, list(eval_sets))

    train, val = split_validation(train, dataset.val_set_size if needs_train else 0, seed, dataset.train)
    if needs_train and not train:
        raise DataError(f"dataset.train={dataset.train}: no training records")
    return TaskData(train=train, val=val, eval_sets=eval_sets, skipped=skipped, missing_sets=missing)
