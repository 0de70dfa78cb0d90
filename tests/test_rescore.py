"""Re-scoring a predictions file from the command line reproduces the run's accuracies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adapters_lab import evaluate
from adapters_lab.config import EvalConfig
from adapters_lab.rescore import main, rescore
from tests.conftest import REPO


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_prints_accuracy_per_protocol(tmp_path):
    path = write_lines(tmp_path / "gsm8k.jsonl", [
        {"dataset": "gsm8k", "output": "3 + 4 = 7. The answer is 7. Then 9 more", "label": "7"},  # strict only
        {"dataset": "gsm8k", "output": "The answer is 1,000.", "label": "1000.0"},  # both
        {"dataset": "gsm8k", "output": "no idea", "label": "2"},  # neither
        {"dataset": "gsm8k", "output": "x = 12", "label": "12"},  # both
    ])
    for protocol, accuracy in (("paper", 0.5), ("strict", 0.75)):
        done = subprocess.run([sys.executable, "-m", "adapters_lab.rescore", str(path), "--protocol", protocol],
                              cwd=REPO, capture_output=True, text=True, check=True)
        assert json.loads(done.stdout) == {"dataset": "gsm8k", "accuracy": accuracy, "n": 4}


def test_rescoring_a_run_matches_its_metrics(tmp_path, monkeypatch):
    records = [{"instruction": f"Q{i} Answer Choices: (A) 1 (B) 2 (C) 3", "input": "", "answer": a}
               for i, a in enumerate("ABCAB")]
    texts = ["A cat. The answer is (B).", "(B)", "The answer is 3", "Answer: C", "nothing"]
    monkeypatch.setattr(evaluate, "generate", lambda model, tok, prompts, *a: texts[: len(prompts)])
    metrics = evaluate.evaluate_sets(None, None, {"AQuA": records}, EvalConfig(), None, tmp_path)
    for protocol in ("paper", "strict"):
        [result] = rescore(tmp_path / "AQuA.jsonl", protocol)
        assert result == {"dataset": "AQuA", "accuracy": metrics["AQuA"][f"accuracy_{protocol}"], "n": 5}
    # strict: B (label A) no, B yes, 3 is option C yes, C (label A) no, nothing no.
    assert metrics["AQuA"]["accuracy_strict"] == 0.4
    # paper: the first capital A-E: A yes, B yes, none, the "A" of "Answer" yes, none.
    assert metrics["AQuA"]["accuracy_paper"] == 0.6


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"dataset": "gsm8k", "label": "1"}', "missing or not text: ['output']"),
    ('{"dataset": "nope", "output": "", "label": "1"}', "unknown dataset 'nope'"),
    ('{"dataset": "gsm8k", "output": "", "label": "one"}', "label 'one' does not parse"),
])
def test_bad_lines_are_named(tmp_path, capsys, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"dataset": "gsm8k", "output": "1", "label": "1"}\n' + line + "\n")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and message in err
