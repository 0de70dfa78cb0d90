"""Answer parsing for every evaluation set, under two protocols.

``paper`` reproduces LLM-Adapters' ``evaluate.py`` and ``commonsense_evaluate.py``, quirks
included: numeric sets take the last match of ``-?\\d+\\.?\\d*`` after removing every comma,
correct within 0.001 of the label, no number means wrong; AQuA takes the first capital A-E
anywhere in the text (the "A" of "A train" counts); commonsense sets take the first match of
their keyword family (case-sensitive, inside words too: "untrue" reads as "true"). Upstream
has no parser for mawps or mathqa (its ``evaluate.py`` raises for mawps and does not accept
mathqa); ``paper`` applies the numeric rule to mawps and AQuA's letter rule to mathqa.

``strict`` (``adapters_lab/strict.py``) reads the answer the model states: the number completing
the last "The answer is ...", the last stated option letter in any case or form, the last stated
keyword in any spelling, with negated statements giving none.
"""

from __future__ import annotations

import math
import re

from adapters_lab import strict
from adapters_lab.data.tasks import TASKS, eval_task
from adapters_lab.strict import option_values  # noqa: F401  (re-exported)

NUMBER_RE = re.compile(r"-?\d+\.?\d*")
TOLERANCE = 0.001

# Evaluation set -> answer kind (from the registry, data/tasks.py). Numeric sets compare numbers; the others strings.
ANSWER_KIND: dict[str, str] = {name: task.kind for name, task in TASKS.items()}
PROTOCOLS = ("paper", "strict")


def answer_kind(dataset: str) -> str:
    return eval_task(dataset).kind


# ---------------------------------------------------------------------------- paper (upstream)

def parse_number(text: str) -> float | None:
    """Upstream's number: commas removed, the last ``-?\\d+\\.?\\d*`` match (None: no number)."""
    matches = NUMBER_RE.findall(text.replace(",", ""))
    return float(matches[-1]) if matches else None


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


# ---------------------------------------------------------------------------- strict

def parse_strict(dataset: str, text: str, prompt: str = "") -> float | str | None:
    """The answer the model states (None when it states none that parses; see ``strict``).
    ``prompt`` lets a letter set map a stated number to the option carrying that value."""
    return strict.parse(answer_kind(dataset), text, prompt)


# ---------------------------------------------------------------------------- scoring

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


def score(dataset: str, output: str, answer: str, prompt: str = "") -> dict[str, dict]:
    """Both protocols' prediction and verdict for one generated answer text."""
    predictions = {"paper": parse_paper(dataset, output), "strict": parse_strict(dataset, output, prompt)}
    return {name: {"prediction": value, "correct": is_correct(dataset, value, answer)}
            for name, value in predictions.items()}
