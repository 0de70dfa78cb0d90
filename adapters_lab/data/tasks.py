"""The evaluation sets, in one registry: name, test file, answer kind, budget of new tokens, suite.

The loader (``data/sources.py``), the parsers (``answers.py``, ``strict.py``, ``likelihood.py``) and the
evaluator (``evaluate.py``) read what they need from here; a new text evaluation set is one entry.
Kinds: ``number`` (compared within 0.001), ``letter`` (an option A-E), or a keyword family
("true|false", "answer1|...|answer5"). Budgets are the paper's: 256 new tokens for math (numbers
and option letters), 32 for commonsense and the synthetic set.
"""

from __future__ import annotations

from dataclasses import dataclass

MATH_BUDGET, COMMONSENSE_BUDGET = 256, 32
ANSWER_FAMILY = "answer1|answer2|answer3|answer4|answer5"


@dataclass(frozen=True)
class EvalTask:
    name: str
    kind: str
    max_new_tokens: int
    suite: str | None  # the suite name that includes it (``dataset.eval_sets=[math]``), or None
    file: str | None  # its test file under ``paths.data_dir``; None: generated in memory

    @property
    def fixed_answers(self) -> bool:
        """Whether the answer is one of a fixed list (likelihood scoring applies)."""
        return self.kind != "number"


def _task(name: str, kind: str, suite: str | None) -> EvalTask:
    budget = MATH_BUDGET if kind in ("number", "letter") else COMMONSENSE_BUDGET  # math sets, mathqa too
    return EvalTask(name, kind, budget, suite, f"dataset/{name}/test.json")


TASKS: dict[str, EvalTask] = {task.name: task for task in [
    *(_task(name, "number", "math") for name in ("gsm8k", "SVAMP", "MultiArith", "AddSub", "SingleEq", "mawps")),
    _task("AQuA", "letter", "math"),
    _task("mathqa", "letter", None),  # upstream ships it, outside the math suite
    _task("boolq", "true|false", "commonsense"),
    _task("piqa", "solution1|solution2", "commonsense"),
    _task("social_i_qa", ANSWER_FAMILY, "commonsense"),
    _task("hellaswag", "ending1|ending2|ending3|ending4", "commonsense"),
    _task("winogrande", "option1|option2", "commonsense"),
    _task("ARC-Easy", ANSWER_FAMILY, "commonsense"),
    _task("ARC-Challenge", ANSWER_FAMILY, "commonsense"),
    _task("openbookqa", ANSWER_FAMILY, "commonsense"),
    EvalTask("arith", "number", COMMONSENSE_BUDGET, None, None),  # synthetic, seeded (data/arith.py)
]}
# The suites in the order of the paper's tables.
SUITES: dict[str, list[str]] = {
    "math": ["gsm8k", "AQuA", "SVAMP", "MultiArith", "AddSub", "SingleEq", "mawps"],
    "commonsense": ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
                    "openbookqa"],
}


def eval_task(name: str) -> EvalTask:
    if name not in TASKS:
        raise KeyError(f"no answer parser for dataset {name!r} (known: {sorted(TASKS)})")
    return TASKS[name]
