"""Fault injection (inputs and configs): bad data, bad answers, long prompts, tokenizers
without padding, conflicting options, unwritable or full disks, crashes mid-write, finished runs.
Every user error is raised before any model weight loads and names the file, record, key or value."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters_lab import pipeline
from adapters_lab.adapters.base import AdapterConfigError
from adapters_lab.answers import ANSWER_KIND, is_correct, label_parses, parse_paper, parse_strict, score
from adapters_lab.config import TrainerConfigError
from adapters_lab.data.records import RECORD_KEYS, DataError, check_records, read_json_records
from adapters_lab.data.tokenize import tokenize_records
from adapters_lab.files import OutputDirError, probe_writable, write_json_atomic, write_text_atomic
from adapters_lab.models import build_tiny_tokenizer, ensure_pad_token
from tests.conftest import CONF_DIR, REPO


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if the pipeline gets as far as building the model."""
    monkeypatch.setattr(pipeline, "build_model", lambda *_: pytest.fail("model weights loaded before the check"))


GOOD = {"instruction": "What is 1 + 1?", "input": "", "output": "1 + 1 = 2. The answer is 2.", "answer": "2"}


# ---------------------------------------------------------------- dataset files
@pytest.mark.parametrize("name,content,message", [
    ("missing.json", None, r"dataset.train=.*missing.json: file not found: .*missing.json"),
    ("empty.json", "  \n", r"file is empty: .*empty.json"),
    ("broken.json", '[{"instruction": "x",', r"broken.json: not valid JSON \(.* at line 1\)"),
    ("broken.jsonl", json.dumps(GOOD) + "\n{nope\n", r"broken.jsonl:2: not valid JSON"),
    ("object.json", '{"instruction": "x"}', r"object.json: expected a JSON array of records, got dict"),
    ("keys.json", json.dumps([{"instruction": "x", "answer": "2"}, {**GOOD, "output": 2}, GOOD]),
     r"keys.json: 2 of 3 records are malformed .*record 0: missing key 'output'; record 1: key 'output' is int"),
])
def test_bad_training_file_names_file_record_and_key(make_cfg, tmp_path, no_weights, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        pipeline.run(make_cfg(f"dataset.train={path}"))


def test_eval_answers_that_do_not_parse_are_named(make_cfg, tmp_path, no_weights):
    test_file = tmp_path / "data" / "dataset" / "gsm8k" / "test.json"
    test_file.parent.mkdir(parents=True)
    test_file.write_text(json.dumps([GOOD, {**GOOD, "answer": "twelve"}]))
    with pytest.raises(DataError, match=r"dataset.eval_sets\[gsm8k\].*record 1: answer 'twelve' does not parse"):
        pipeline.run(make_cfg(f"paths.data_dir={tmp_path / 'data'}", "dataset.eval_sets=[gsm8k]"))


def test_prompt_longer_than_cutoff_is_counted_or_fails():
    tokenizer = build_tiny_tokenizer()
    long_output = {**GOOD, "output": "The answer is 2. " * 40}
    long_prompt = {**GOOD, "instruction": "How many apples? " * 40}
    cutoff = len(tokenize_records([GOOD], tokenizer, 4096, True, True, 0.0, "k").examples[0]["input_ids"])
    features = tokenize_records([GOOD, long_output], tokenizer, cutoff, True, True, 0.0, "dataset.train=t")
    assert (features.truncated, features.prompt_overflow) == (1, 0)
    assert [len(example["input_ids"]) for example in features.examples] == [cutoff, cutoff]
    with pytest.raises(DataError, match=rf"dataset.train=t: 1 of 2 prompts reach dataset.cutoff_len={cutoff}"):
        tokenize_records([GOOD, long_prompt], tokenizer, cutoff, True, True, 0.0, "dataset.train=t")


def test_truncation_is_reported_in_metrics(make_cfg, tmp_path):
    records = [GOOD] * 10 + [{**GOOD, "output": "The answer is 2. " * 40}] * 2
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    pipeline.run(make_cfg(f"dataset.train={path}", "dataset.cutoff_len=64", "dataset.val_set_size=0",
                          "trainer.max_steps=1", "eval.limit=1"))
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]
    assert (data["truncated"], data["prompt_overflow"]) == (2, 0)


def test_tokenizer_without_pad_token_borrows_unk_then_eos_then_fails():
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    ensure_pad_token(tokenizer, "m")
    assert tokenizer.pad_token == tokenizer.unk_token and tokenizer.padding_side == "left"
    tokenizer.pad_token, tokenizer.unk_token = None, None
    ensure_pad_token(tokenizer, "m")
    assert tokenizer.pad_token == tokenizer.eos_token
    tokenizer.pad_token, tokenizer.eos_token = None, None
    with pytest.raises(ValueError, match="model=m: tokenizer has no pad, unk or eos token"):
        ensure_pad_token(tokenizer, "m")


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("override,error,message", [
    ("adapter.rank=0", AdapterConfigError, r"adapter.rank"),
    ("trainer.micro_batch_size=0", TrainerConfigError, r"trainer.micro_batch_size=0"),
    ("trainer.lr=-1", TrainerConfigError, r"trainer.lr=-1.0"),
    ("dataset.eval_sets=[nope]", DataError, r"dataset.eval_sets: unknown evaluation set 'nope'"),
    ("dataset.val_set_size=100000", DataError, r"dataset.val_set_size=100000 leaves no training data"),
])
def test_bad_options_fail_before_any_weights(make_cfg, no_weights, override, error, message):
    with pytest.raises(error, match=message):
        pipeline.run(make_cfg(override))


def test_prefix_with_a_layer_subset_conflicts(make_cfg, no_weights):
    if not (CONF_DIR / "adapter" / "prefix.yaml").is_file():
        pytest.skip("prefix adapter not there yet")
    with pytest.raises(AdapterConfigError, match=r"adapter.placement.layers=\[0\].*prefix"):
        pipeline.run(make_cfg("adapter=prefix", "adapter.placement.layers=[0]"))


def test_prefix_with_packed_rows_conflicts_before_weights(make_cfg, no_weights):
    if not (CONF_DIR / "adapter" / "prefix.yaml").is_file():
        pytest.skip("prefix adapter not there yet")
    with pytest.raises((AdapterConfigError, TrainerConfigError), match="packed"):
        pipeline.run(make_cfg("adapter=prefix", "trainer.batching=packed"))


def test_unknown_dataset_on_the_command_line_is_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "run.py", "dataset=nope", f"hydra.run.dir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Could not find 'dataset/nope'" in result.stderr and "arith" in result.stderr  # lists the options
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- disk
def test_unwritable_output_dir_is_reported_at_start(make_cfg, tmp_path, no_weights):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = make_cfg()
    cfg.paths.output_dir = str(blocker / "run")
    with pytest.raises(OutputDirError, match=r"paths.output_dir=.*a-file/run: not writable"):
        pipeline.run(cfg)


def test_full_disk_is_reported_at_start(make_cfg, monkeypatch, no_weights):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputDirError, match=r"paths.output_dir=.*: not writable \(No space left on device\)"):
        pipeline.run(make_cfg())


def test_probe_leaves_nothing_behind(tmp_path):
    probe_writable(tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []


# ---------------------------------------------------------------- atomic results
def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"old": True})

    def crash(self, text, *args, **kwargs):  # half the bytes reach the disk, then the process dies
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"new": "x" * 1000})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left over


def test_sigkill_during_writes_leaves_a_complete_file(tmp_path):
    path = tmp_path / "metrics.json"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys; from adapters_lab.files import write_json_atomic\n"
        "i = 0\n"
        "while True:\n"
        "    write_json_atomic(sys.argv[1], {'i': i, 'pad': 'x' * 2_000_000}); i += 1\n"
    ), str(path)], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait(timeout=30)
    data = json.loads(path.read_text())  # never a half-written file
    assert data["i"] >= 0 and len(data["pad"]) == 2_000_000


def test_finished_run_is_not_overwritten_unless_asked(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("eval.limit=2")
    first = pipeline.run(cfg)
    metrics_file = tmp_path / "run" / "metrics.json"
    before = metrics_file.read_bytes()

    monkeypatch.setattr(pipeline, "build_model", lambda *_: pytest.fail("a finished run was recomputed"))
    assert pipeline.run(cfg) == first
    assert metrics_file.read_bytes() == before

    class Rebuilt(Exception):
        pass

    def rebuilt(*_):
        raise Rebuilt

    monkeypatch.setattr(pipeline, "build_model", rebuilt)
    cfg.overwrite = True
    with pytest.raises(Rebuilt):
        pipeline.run(cfg)


# ---------------------------------------------------------------- property-based
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
record_like = st.dictionaries(st.sampled_from(RECORD_KEYS + ("extra",)), json_values, max_size=5)
items = st.lists(st.one_of(record_like, json_values), max_size=12)


@settings(max_examples=150, deadline=None)
@given(items=items, need_output=st.booleans(), share=st.floats(0, 1))
def test_loader_never_crashes_on_malformed_records(items, need_output, share):
    try:
        result = check_records(items, "f.json", "dataset.train=f", share, need_output,
                               check_answer=lambda answer: label_parses("gsm8k", answer))
    except DataError as err:
        assert "dataset.train=f" in str(err)
        return
    assert len(result.records) + len(result.skipped) == len(items)
    assert all(set(r) == set(RECORD_KEYS) and all(isinstance(r[k], str) for k in RECORD_KEYS) for r in result.records)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200), suffix=st.sampled_from([".json", ".jsonl"]))
def test_reader_never_crashes_on_arbitrary_text(tmp_path, text, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        assert isinstance(read_json_records(path, "dataset.train=x"), list)
    except DataError as err:
        assert "dataset.train=x" in str(err) and str(path) in str(err)


def test_reader_names_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"instruction": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.json"):
        read_json_records(path, "dataset.train=x")


@settings(max_examples=200, deadline=None)
@given(dataset=st.sampled_from(sorted(ANSWER_KIND)), text=st.text(max_size=120), answer=st.text(max_size=12),
       prompt=st.text(max_size=80))
def test_parsers_never_crash(dataset, text, answer, prompt):
    for prediction in (parse_paper(dataset, text), parse_strict(dataset, text, prompt)):
        assert prediction is None or isinstance(prediction, (float, str))
    if label_parses(dataset, answer):
        verdicts = score(dataset, text, answer, prompt)
        assert {v["correct"] for v in verdicts.values()} <= {True, False}
        assert is_correct(dataset, None, answer) is False
