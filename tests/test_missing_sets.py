"""eval.missing_sets=skip: a suite's sets that exist are evaluated, the missing ones are logged and
listed in metrics.json; the default (fail) stops before any weight loads, naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters_lab import pipeline
from adapters_lab.data.records import DataError
from adapters_lab.data.sources import COMMONSENSE_SETS, load_task_data


def write_sets(data_dir: Path, names: list[str]) -> None:
    for name in names:
        path = data_dir / "dataset" / name / "test.json"
        path.parent.mkdir(parents=True)
        records = [{"instruction": f"q{i}? Answer format: true/false", "input": "", "output": "",
                    "answer": "true" if name == "boolq" else "answer1"} for i in range(3)]
        path.write_text(json.dumps(records))


def load(cfg):
    return load_task_data(cfg.dataset, cfg.eval, cfg.paths, cfg.seed, needs_train=False)


def test_skip_evaluates_the_sets_that_exist_and_lists_the_rest(make_cfg, tmp_path, caplog):
    write_sets(tmp_path / "data", ["boolq", "ARC-Easy"])
    cfg = make_cfg("adapter=none", f"paths.data_dir={tmp_path}/data", "dataset.eval_sets=[commonsense]",
                   "eval.missing_sets=skip", "eval.max_new_tokens=2")
    data = load(cfg)
    assert list(data.eval_sets) == ["boolq", "ARC-Easy"]
    assert data.missing_sets == [n for n in COMMONSENSE_SETS if n not in ("boolq", "ARC-Easy")]
    assert "leaving out hellaswag" in caplog.text
    pipeline.run(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["data"]["missing_sets"] == data.missing_sets
    assert {"boolq", "ARC-Easy", "average"} <= set(metrics["eval"]) and "piqa" not in metrics["eval"]


def test_fail_is_the_default_and_names_the_file(make_cfg, tmp_path):
    write_sets(tmp_path / "data", ["boolq"])
    cfg = make_cfg("adapter=none", f"paths.data_dir={tmp_path}/data", "dataset.eval_sets=[commonsense]")
    with pytest.raises(DataError, match=r"dataset.eval_sets\[piqa\]: file not found: .*piqa/test.json"):
        load(cfg)


def test_skip_with_no_set_at_all_fails_in_one_line(make_cfg, tmp_path):
    (tmp_path / "data").mkdir()
    cfg = make_cfg("adapter=none", f"paths.data_dir={tmp_path}/data", "dataset.eval_sets=[boolq,piqa]",
                   "eval.missing_sets=skip")
    with pytest.raises(DataError, match=r"none of these files exists"):
        load(cfg)
    unknown = make_cfg("adapter=none", f"paths.data_dir={tmp_path}/data", "dataset.eval_sets=[nope]",
                       "eval.missing_sets=skip")
    with pytest.raises(DataError, match="unknown evaluation set 'nope'"):
        load(unknown)
