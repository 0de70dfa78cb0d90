"""Answer parsing for every evaluation set, under two protocols.

``paper`` reproduces LLM-Adapters' ``evaluate.py`` and ``commonsense_evaluate.py``, quirks
included: numeric sets take the last match of ``-?\\d+\\.?\\d*`` after removing every comma,
correct within 0.001 of the label, no number means wrong; AQuA takes the first capital A-E
anywhere in the text (the "A" of "A train" counts); commonsense sets take the first match of
their keyword family (case-sensitive, inside words too: "untrue" reads as "true"). Upstream
has no parser for mawps or mathqa (its ``evaluate.py`` raises for mawps and does not accept
mathqa); ``paper`` applies the numeric rule to mawps and AQuA's letter rule to mathqa.

``strict`` reads the answer the model states: the last number of the sentence after "The answer
is" (also "answer:", "####", ``\\boxed{``), "(B)", or a keyword after "the correct answer is"; words must
stand alone, numbers keep their thousands commas and may be fractions (mawps), and a letter
set whose prompt lists numeric options (AQuA, mathqa) maps a stated number to its option.
Without a stated answer it falls back to the last standalone number, the last "(X)" option
marker, or the family keyword when exactly one distinct keyword occurs.
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
PROTOCOLS = ("paper", "strict")


def answer_kind(dataset: str) -> str:
    if dataset not in ANSWER_KIND:
        raise KeyError(f"no answer parser for dataset {dataset!r} (known: {sorted(ANSWER_KIND)})")
    return ANSWER_KIND[dataset]


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

# A standalone number: not glued to a letter, digit or dot before it; thousands commas kept
# only in their proper places ("1,234,567"); a fraction "a/b" is one number.
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
STANDALONE_NUMBER_RE = re.compile(rf"(?<![A-Za-z0-9.])(?:{_NUM})")
# The clause after a stated answer, up to the end of its sentence: its last number is the
# answer ("The answer is 220 + 90 + 60 = 370.", "The answer is 6 pieces, or 15 ounces.").
STATED_CLAUSE_RE = re.compile(r"(?:answer\s+is|answer\s*:|####|\\boxed\{)(?P<clause>[^\n]*?)(?=\.(?!\d)|\n|$)",
                              re.IGNORECASE)
# Case-sensitive letter after a case-insensitive phrase: "the answer is a lot" states nothing.
STATED_LETTER_RE = re.compile(r"(?i:answer\s+is|answer\s*:)\s*:?\s*(?i:option\s+)?\(?(?P<letter>[A-E])(?![A-Za-z0-9'’])")
OPTION_MARKER_RE = re.compile(r"(?<![A-Za-z])\(?([A-E])\s?\)")
OPTION_LIST_RE = re.compile(r"(?<![A-Za-z])\(?([A-E])\s?\)\s*(.*?)\s*(?=,?\s*\(?[A-E]\s?\)|$)", re.MULTILINE)


def number_value(token: str) -> float | None:
    """A standalone-number token as a float: commas dropped, "a/b" divided (None for "a/0")."""
    token = re.sub(r"\s+", "", token.replace(",", ""))
    if "/" in token:
        numerator, denominator = token.split("/")
        return float(numerator) / float(denominator) if float(denominator) != 0 else None
    return float(token)


def option_values(prompt: str) -> dict[str, float]:
    """Letter -> numeric value for options written "(A) 23.65 (B) 1000" or "A ) 38 , B ) 27.675"."""
    values = {}
    for letter, body in OPTION_LIST_RE.findall(prompt):
        body = body.strip().rstrip(",").strip().lstrip("$")
        if re.fullmatch(_NUM, body):
            values.setdefault(letter, number_value(body))
    return values


def stated_number(text: str) -> float | None:
    """The last number of the first stated-answer clause that has one."""
    for stated in STATED_CLAUSE_RE.finditer(text):
        tokens = STANDALONE_NUMBER_RE.findall(stated.group("clause"))
        if tokens:
            return number_value(tokens[-1])
    return None


def _strict_number(text: str) -> float | None:
    stated = stated_number(text)
    if stated is not None:
        return stated
    tokens = STANDALONE_NUMBER_RE.findall(text)
    return number_value(tokens[-1]) if tokens else None


def _strict_letter(text: str, prompt: str) -> str | None:
    stated = STATED_LETTER_RE.search(text)
    if stated:
        return stated.group("letter")
    value = stated_number(text) if prompt else None
    if value is not None:
        matches = [k for k, v in option_values(prompt).items() if abs(v - value) <= TOLERANCE]
        if len(matches) == 1:
            return matches[0]
    markers = OPTION_MARKER_RE.findall(text)
    return markers[-1] if markers else None


def _strict_keyword(kind: str, text: str) -> str | None:
    family = rf"\b({kind})\b"
    stated = re.search(rf"correct\s+answer\s+is\s*:?\s*{family}", text, re.IGNORECASE)
    if stated:
        return stated.group(1).lower()
    distinct = {m.lower() for m in re.findall(family, text, re.IGNORECASE)}
    return distinct.pop() if len(distinct) == 1 else None


def parse_strict(dataset: str, text: str, prompt: str = "") -> float | str | None:
    """The answer the model states (None when it states none that parses). ``prompt`` lets a
    letter set map a stated number to the option carrying that value."""
    kind = answer_kind(dataset)
    if kind == "number":
        return _strict_number(text)
    if kind == "letter":
        return _strict_letter(text, prompt)
    return _strict_keyword(kind, text)


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
