"""Answer parsing for every evaluation set (LLM-Adapters' ``evaluate.py`` and
``commonsense_evaluate.py``).

``paper`` reproduces upstream, quirks included: numbers are the last match of
``-?\\d+\\.?\\d*`` after removing commas, correct within 0.001; AQuA takes the first capital
A-E anywhere; commonsense sets take the first keyword of their family.
"""

from __future__ import annotations

import math
import re

NUMBER_RE = re.compile(r"-?\d+\.?\d*")
TOLERANCE = 0.001

# Evaluation set -> answer kind. Numeric sets compare numbers; the others compare strings.
ANSWER_KIND: dict[str, str] = {
    **{name: "number" for name in ("gsm8k", "SVAMP", "mawps", "MultiArith", "AddSub", "SingleEq", "arith")},
    "AQuA": "letter",
    "mathqa": "letter",
    "boolq": "true|false",
    "piqa": "solution1|solution2",
    "social_i_qa": "answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": "answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": "answer1|answer2|answer3|answer4|answer5",
    "openbookqa": "answer1|answer2|answer3|answer4|answer5",
    "hellaswag": "ending1|ending2|ending3|ending4",
    "winogrande": "option1|option2",
}


def answer_kind(dataset: str) -> str:
    if dataset not in ANSWER_KIND:
        raise KeyError(f"no answer parser for dataset {dataset!r} (known: {sorted(ANSWER_KIND)})")
    return ANSWER_KIND[dataset]


def parse_number(text: str) -> float | None:
    matches = NUMBER_RE.findall(text.replace(",", ""))
    if not matches:
        return None
    try:
        return float(matches[-1])
    except ValueError:
        return None


def parse_paper(dataset: str, text: str) -> float | str | None:
    """Upstream's prediction from generated text (None when nothing parses)."""
    kind = answer_kind(dataset)
    if kind == "number":
        return parse_number(text)
    if kind == "letter":
        found = re.findall(r"A|B|C|D|E", text.strip())
        return found[0] if found else None
    found = re.findall(kind, text.strip())
    return found[0] if found else None


def label_value(dataset: str, answer: str) -> float | str:
    """The gold label as compared: a float for numeric sets, the string otherwise."""
    return float(answer.replace(",", "")) if answer_kind(dataset) == "number" else answer.strip()


def label_parses(dataset: str, answer: str) -> bool:
    try:
        value = label_value(dataset, answer)
    except ValueError:
        return False
    return not (isinstance(value, float) and not math.isfinite(value))


def is_correct(dataset: str, prediction: float | str | None, answer: str) -> bool:
    if prediction is None:
        return False
    label = label_value(dataset, answer)
    if isinstance(label, float):
        return isinstance(prediction, float) and abs(prediction - label) <= TOLERANCE
    return prediction == label
