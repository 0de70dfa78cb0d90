"""The evaluation-set registry is the one source the loader, parsers and evaluator read."""

from __future__ import annotations

import pytest

from adapters_lab import evaluate, likelihood
from adapters_lab.answers import ANSWER_KIND, answer_kind
from adapters_lab.config import PathsConfig
from adapters_lab.data import sources
from adapters_lab.data.tasks import SUITES, TASKS, eval_task


def test_suites_hold_their_own_sets_in_the_papers_order():
    for suite, names in SUITES.items():
        assert [TASKS[n].suite for n in names] == [suite] * len(names)
        assert sorted(names) == sorted(n for n, t in TASKS.items() if t.suite == suite)
    assert sources.expand_eval_sets(["math"]) == SUITES["math"] == sources.MATH_SETS
    assert sources.COMMONSENSE_SETS == SUITES["commonsense"]


def test_everything_reads_the_registry(monkeypatch):
    assert ANSWER_KIND == {name: task.kind for name, task in TASKS.items()}
    paths = PathsConfig(root_dir=".", data_root=".", data_dir="/d", output_dir=".")
    for name, task in TASKS.items():
        assert answer_kind(name) == task.kind
        assert evaluate.default_max_new_tokens(name) == task.max_new_tokens
        assert likelihood.supports(name) == task.fixed_answers == (task.kind != "number")
        if task.file is not None:
            assert str(sources.eval_path(name, paths)) == f"/d/{task.file}"
    # The paper's budgets: math (numbers and option letters, mathqa too) 256, the rest 32.
    assert {n: t.max_new_tokens for n, t in TASKS.items() if t.max_new_tokens == 256} == {
        n: 256 for n in [*SUITES["math"], "mathqa"]}
    assert eval_task("arith").file is None and eval_task("arith").max_new_tokens == 32
    with pytest.raises(KeyError, match="no answer parser for dataset 'nope'"):
        eval_task("nope")
