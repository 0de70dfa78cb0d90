"""Dataset sources and record checks: every dataset config, GSM8K's conversion, user and hub
sources, malformed records (skipped and counted, or fatal above the share), missing files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters_lab import pipeline
from adapters_lab.data.records import DataError
from adapters_lab.data.sources import (
    COMMONSENSE_SETS,
    MATH_SETS,
    expand_eval_sets,
    gsm8k_record,
    load_task_data,
    train_path,
)
from tests.conftest import CONF_DIR

# image-text datasets (LLaVA conversation records) are checked by tests/test_mllm_data.py with their own loader
IMAGE_TEXT_DATASETS = ("scienceqa", "mllm_file", "shapes", "iconqa", "vizwiz", "okvqa", "ocrvqa", "vqav2", "flickr30k")
DATASET_CONFIGS = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")
                         if p.stem not in ("file", "hub", *IMAGE_TEXT_DATASETS))


def load(cfg, needs_train: bool = True):
    return load_task_data(cfg.dataset, cfg.eval, cfg.paths, cfg.seed, needs_train=needs_train)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_suites_are_the_papers():
    assert MATH_SETS == ["gsm8k", "AQuA", "SVAMP", "MultiArith", "AddSub", "SingleEq", "mawps"]
    assert len(COMMONSENSE_SETS) == 8 and "hellaswag" in COMMONSENSE_SETS
    assert expand_eval_sets(["gsm8k", "math", "mathqa"]) == [*MATH_SETS, "mathqa"]


@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_every_dataset_config_loads_or_names_the_missing_file(name, make_cfg, shared_data):
    cfg = make_cfg(f"dataset={name}", "eval.limit=2", "dataset.limit_train=16")
    path = train_path(cfg.dataset.train, cfg.paths) if name != "arith" else None
    missing = [p for p in [path] + [Path(cfg.paths.data_dir) / "dataset" / s / "test.json"
                                    for s in expand_eval_sets(list(cfg.dataset.eval_sets)) if s != "arith"]
               if p is not None and not p.is_file()]
    if missing:  # math_10k, commonsense_170k, hellaswag, ... are not shipped here
        with pytest.raises(DataError, match=r"dataset\.(train|eval_sets)") as err:
            load(cfg)
        assert str(missing[0]) in str(err.value)
        return
    data = load(cfg)
    assert len(data.train) == 16 - cfg.dataset.val_set_size and len(data.val) == cfg.dataset.val_set_size
    assert data.eval_sets and all(len(records) == 2 for records in data.eval_sets.values())


def test_missing_training_set_fails_before_the_model_loads(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "build_model", lambda *_: pytest.fail("model built before data check"))
    with pytest.raises(DataError, match=r"dataset\.train=math_10k: file not found: .*nowhere/ft-training_set/math_10k\.json"):
        pipeline.run(make_cfg("dataset=math_10k", f"paths.data_dir={tmp_path}/nowhere"))


def test_hellaswag_is_missing_here_and_says_where(make_cfg, shared_data):
    path = shared_data / "llm_adapters" / "dataset" / "hellaswag" / "test.json"
    if path.is_file():
        pytest.skip("hellaswag is present")
    with pytest.raises(DataError, match=r"dataset\.eval_sets\[hellaswag\]: file not found: .*hellaswag/test\.json"):
        load(make_cfg("dataset=boolq", "dataset.eval_sets=[hellaswag]"), needs_train=False)


def test_gsm8k_conversion_drops_calculator_notes_and_states_the_answer():
    item = {"question": "Q?", "answer": "He pays 2*500 = <<2*500=1000>>1000 dollars.\nThen $<<1000/2=500>>500.\n#### 1,000"}
    assert gsm8k_record(item) == {"instruction": "Q?", "input": "",
                                  "output": "He pays 2*500 = 1000 dollars.\nThen $500.\nThe answer is 1000.",
                                  "answer": "1000"}
    assert gsm8k_record({"question": "Q?", "answer": "no final line"})["answer"] == ""


def test_gsm8k_train_split_from_the_openai_file(make_cfg, shared_data):
    cfg = make_cfg("dataset=gsm8k", "dataset.val_set_size=0")
    data = load(cfg)
    assert len(data.train) == 7473 and not data.skipped
    assert not any("<<" in r["output"] or "####" in r["output"] for r in data.train)
    assert all(r["output"].endswith(f"\nThe answer is {r['answer']}.") for r in data.train)


def test_user_jsonl_file_without_optional_keys(make_cfg, tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)])
    data = load(make_cfg("dataset=file", f"dataset.train={path}", "dataset.eval_sets=[]", "dataset.val_set_size=2"))
    assert len(data.train) == 4 and len(data.val) == 2
    assert data.train[0].keys() == {"instruction", "input", "output", "answer"}


def test_hub_source_goes_through_load_dataset(make_cfg, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "answer": str(i)} for i in range(5)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load(make_cfg("dataset=hub", "dataset.train=hf:someone/set:validation", "dataset.eval_sets=[]",
                         "dataset.val_set_size=1"))
    assert calls == [("someone/set", "validation")] and len(data.train) == 4

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"dataset\.train=hf:someone/set: could not load hub dataset 'someone/set'"):
        load(make_cfg("dataset=hub", "dataset.train=hf:someone/set", "dataset.eval_sets=[]"))


def eval_records(n: int, bad: dict[int, object]) -> list:
    rows = [{"instruction": f"What is {i} + 1?", "input": "", "output": "", "answer": str(i + 1)} for i in range(n)]
    for index, row in bad.items():
        rows[index] = row
    return rows


def test_malformed_records_above_the_share_fail_with_file_and_index(make_cfg, tmp_path):
    path = tmp_path / "data" / "dataset" / "gsm8k" / "test.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(eval_records(10, {3: {"instruction": "no answer"}, 7: {"instruction": "x", "answer": "ten"}})))
    cfg = make_cfg(f"paths.data_dir={tmp_path}/data", "dataset.eval_sets=[gsm8k]", "dataset.max_bad_record_share=0.1")
    with pytest.raises(DataError) as err:
        load(cfg, needs_train=False)
    message = str(err.value)
    assert "dataset.eval_sets[gsm8k]" in message and str(path) in message and "2 of 10" in message
    assert "record 3: missing key 'answer'" in message and "record 7: answer 'ten' does not parse" in message


def write_svamp(tmp_path: Path, bad: object) -> Path:
    path = tmp_path / "data" / "dataset" / "SVAMP" / "test.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(eval_records(20, {4: bad})))
    return path


@pytest.mark.parametrize("bad, problem", [
    ({"instruction": "", "answer": "1"}, "empty instruction"),
    ({"instruction": "q", "answer": 5}, "key 'answer' is int, expected str"),
    (["not", "a", "record"], "not an object (list)"),
])
def test_few_malformed_records_are_skipped_and_reported(make_cfg, tmp_path, caplog, bad, problem):
    path = write_svamp(tmp_path, bad)
    cfg = make_cfg(f"paths.data_dir={tmp_path}/data", "dataset.eval_sets=[SVAMP]", "dataset.max_bad_record_share=0.05")
    with caplog.at_level("WARNING"):
        data = load(cfg, needs_train=False)
    assert f"record 4: {problem}" in caplog.text and str(path) in caplog.text
    assert data.skipped == {str(path): 1} and len(data.eval_sets["SVAMP"]) == 19


def test_skipped_records_are_counted_in_metrics(make_cfg, tmp_path):
    path = write_svamp(tmp_path, {"instruction": "q"})
    cfg = make_cfg("adapter=none", f"paths.data_dir={tmp_path}/data", "dataset.eval_sets=[SVAMP]",
                   "dataset.max_bad_record_share=0.05", "eval.limit=2", "eval.max_new_tokens=2")
    pipeline.run(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["data"]["skipped_malformed"] == {str(path): 1}
    assert metrics["eval"]["SVAMP"]["n"] == 2
    assert {"accuracy", "accuracy_paper", "accuracy_strict"} <= set(metrics["eval"]["SVAMP"])


def test_bad_eval_settings_fail_naming_the_key(make_cfg):
    with pytest.raises(DataError, match=r"eval\.batch_size=0: must be at least 1"):
        load(make_cfg("eval.batch_size=0"))
    with pytest.raises(DataError, match=r"eval\.limit=-3"):
        load(make_cfg("eval.limit=-3"))
