"""The ``strict`` protocol: the answer the model states, read as a careful reader would.

The text is first normalised (NFKC: full-width letters and digits become ASCII, thin and
no-break spaces become spaces; the Unicode minus becomes "-"). Then, by answer kind:

- numbers: each statement ("The answer is", "answer:", "answer =", "####", ``\\boxed{``) gives
  the number that completes it ("The answer is 15, not 12." is 15; "The answer is 36 (12 * 3)."
  is 36), or the result of the equation that starts it ("The answer is 220 + 90 + 60 = 370." is
  370); the last statement that gives one wins, and a stated answer wins over every number of
  the reasoning. A negated statement ("The answer is not 12.") gives none. Without any
  statement, the last standalone number. Formats: thousands separators (comma, space, thin
  space), decimals and ".5", fractions "11/6", mixed fractions "3 1/2", "$5", "-$5", "5e3".
- letters (AQuA, mathqa): the last stated letter ("The answer is (B)", "Answer: D", "the answer
  is b.", "option C", full-width letters); a stated number maps to the option whose value it is
  when the prompt lists numeric options; otherwise the last "(X)" option marker.
- keywords (boolq, piqa, ...): the last "correct answer is <keyword>" (also "answer is", "answer:");
  a keyword may be written with a space or a capital ("answer 4", "Solution 1", "Answer3").
  Without a statement, the one distinct keyword of the text, unless a keyword is negated or
  contradicted ("This is not true.", "true is wrong"): then no answer.
"""

from __future__ import annotations

import math
import re
import unicodedata

TOLERANCE = 0.001
_SEP_NUMBER = r"\d{1,3}(?:[, ]\d{3})+(?![\d/])"  # 1,234,567 or 1 234 567 (not "3 1/2")
_UNSIGNED = (rf"(?:\d+ \d+/\d+(?![\d/])"  # mixed fraction 3 1/2
             rf"|(?:{_SEP_NUMBER}|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?: ?/ ?\d+(?:\.\d+)?)?"
             rf"|\.\d+)")
_NUM = rf"(?:-\$?|\$-?)?{_UNSIGNED}"
NUMBER_RE = re.compile(rf"(?<![A-Za-z0-9.]){_NUM}")
_OP = r"\s*[-+*/×x÷]\s*"
EQUATION_RE = re.compile(rf"\s*(?P<first>{_NUM})(?:{_OP}{_NUM})*(?:\s*=\s*{_NUM}(?:{_OP}{_NUM})*)+")
STATEMENT_RE = re.compile(r"(?:answer\s+(?:is|would\s+be|will\s+be)|answer\s*[:=]|####|\\boxed\{)"
                          r"(?P<clause>[ \t]*\n?[^\n]*?)(?=\.(?!\d)|\n|$)", re.IGNORECASE)
NEGATED_RE = re.compile(r"\s*(?:n't|not\b|never\b|no\b)", re.IGNORECASE)
# Negation before a keyword or option ("not true", "isn't really option B") and after it ("true is wrong").
NEGATION_BEFORE_RE = re.compile(r"(?:\bnot|n't|\bnever|\bno)\s+(?:\w+\s+)?$", re.IGNORECASE)
NEGATION_AFTER_RE = re.compile(r"\s*(?:(?:is|are|was)\s+(?:not|wrong|incorrect)\b|(?:isn't|wasn't)\b)", re.IGNORECASE)

_LETTER_AFTER = r"\s*:?\s*(?:option\s+)?"
# An upper-case letter stands alone before a word ("The answer is B because"); a lower-case one
# must end the phrase ("the answer is b.") or sit in parentheses, so "the answer is a lot" states nothing.
STATED_LETTER_RE = re.compile(
    rf"(?i:answer\s+is|answer\s*:|answer\s+would\s+be){_LETTER_AFTER}"
    r"(?:\((?P<paren>[A-Ea-e])\)|(?P<upper>[A-E])(?![A-Za-z0-9'’])|(?P<lower>[a-e])(?=\s*(?:[.,;:!)]|$)))",
)
OPTION_WORD_RE = re.compile(r"(?<![A-Za-z])(?i:option|choice)\s+\(?(?P<letter>[A-Ea-e])\)?(?![A-Za-z0-9])")
OPTION_MARKER_RE = re.compile(r"(?<![A-Za-z])(?:\(([A-Ea-e])\)|([A-E])\s?\))")
OPTION_LIST_RE = re.compile(r"(?<![A-Za-z])\(?([A-E])\s?\)\s*(.*?)\s*(?=,?\s*\(?[A-E]\s?\)|$)", re.MULTILINE)


def normalise(text: str) -> str:
    """NFKC (full-width forms, thin and no-break spaces), the Unicode minus as "-"."""
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-").replace("\u2012", "-")
    return re.sub(r"[ \t]+", " ", text)


def number_value(token: str) -> float | None:
    """A number token as a float ("1,234", "3 1/2", "-$5", "5e3", "11/6"); None if not finite."""
    token = token.strip().replace("$", "")
    negative = token.startswith("-")
    token = token.lstrip("-")
    mixed = re.fullmatch(r"(\d+) (\d+)/(\d+)", token)
    try:
        if mixed:
            whole, numerator, denominator = (float(g) for g in mixed.groups())
            value = whole + numerator / denominator if denominator else math.nan
        else:
            token = token.replace(",", "").replace(" ", "")
            numerator, _, denominator = token.partition("/")
            value = float(numerator) / float(denominator) if denominator else float(numerator)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    value = -value if negative else value
    return value if math.isfinite(value) else None


def _clause_number(clause: str) -> float | None:
    """The number completing a statement: an equation's result, else the clause's first number."""
    if NEGATED_RE.match(clause):
        return None
    start = NUMBER_RE.search(clause)
    if start is None:
        return None
    equation = EQUATION_RE.match(clause, start.start())
    if equation:
        result = clause[: equation.end()].rsplit("=", 1)[1]
        found = NUMBER_RE.search(result)
        return number_value(found.group()) if found else None
    return number_value(start.group())


def stated_number(text: str) -> tuple[bool, float | None]:
    """(whether a statement was negated, the number of the last statement that gives one)."""
    value, negated = None, False
    for statement in STATEMENT_RE.finditer(text):
        negated = negated or NEGATED_RE.match(statement.group("clause")) is not None
        found = _clause_number(statement.group("clause"))
        value = found if found is not None else value
    return negated, value


def parse_number(text: str) -> float | None:
    text = normalise(text)
    negated, value = stated_number(text)
    if value is not None or negated:
        return value
    tokens = NUMBER_RE.findall(text)
    return number_value(tokens[-1]) if tokens else None


def option_values(prompt: str) -> dict[str, float]:
    """Letter -> numeric value for options written "(A) 23.65 (B) 1000" or "A ) 38 , B ) 27.675"."""
    values = {}
    for letter, body in OPTION_LIST_RE.findall(normalise(prompt)):
        body = body.strip().rstrip(",").strip()
        value = number_value(body) if re.fullmatch(_NUM, body) else None
        if value is not None:
            values.setdefault(letter, value)
    return values


def negated_before(text: str, start: int) -> bool:
    return NEGATION_BEFORE_RE.search(text[max(0, start - 32):start]) is not None


def parse_letter(text: str, prompt: str = "") -> str | None:
    text = normalise(text)
    stated = list(STATED_LETTER_RE.finditer(text))
    stated += [m for m in OPTION_WORD_RE.finditer(text) if not negated_before(text, m.start())]
    if stated:
        last = max(stated, key=lambda m: m.start())
        return next(g for g in last.groups() if g).upper()
    negated, value = stated_number(text)
    if value is not None and prompt:
        matches = [k for k, v in option_values(prompt).items() if abs(v - value) <= TOLERANCE]
        if len(matches) == 1:
            return matches[0]
    if negated:
        return None
    markers = [m for m in OPTION_MARKER_RE.finditer(text) if not negated_before(text, m.start())]
    return next(g for g in markers[-1].groups() if g).upper() if markers else None


def keyword_pattern(kind: str) -> re.Pattern:
    """A keyword of ``kind`` ("answer1|answer2") as written: any case, a space before its digit."""
    words = [re.sub(r"(\D+)(\d+)$", r"\1 ?\2", re.escape(word)) for word in kind.split("|")]
    return re.compile(rf"(?<![A-Za-z0-9])(?:{'|'.join(words)})(?![A-Za-z0-9])", re.IGNORECASE)


def keyword_negated(text: str, match: re.Match) -> bool:
    return negated_before(text, match.start()) or NEGATION_AFTER_RE.match(text, match.end()) is not None


def parse_keyword(kind: str, text: str) -> str | None:
    text = normalise(text)
    keyword = keyword_pattern(kind)
    stated = None
    for statement in re.finditer(r"answer\s+is\s*:?\s*|answer\s*:\s*", text, re.IGNORECASE):
        found = keyword.match(text, statement.end())
        if found and not keyword_negated(text, found):
            stated = found.group().lower().replace(" ", "")
    if stated is not None:
        return stated
    found = list(keyword.finditer(text))
    if any(keyword_negated(text, m) for m in found):
        return None
    distinct = {m.group().lower().replace(" ", "") for m in found}
    return distinct.pop() if len(distinct) == 1 else None


def parse(kind: str, text: str, prompt: str = "") -> float | str | None:
    """The stated answer of ``kind`` ("number", "letter" or a keyword family), None if none."""
    if kind == "number":
        return parse_number(text)
    if kind == "letter":
        return parse_letter(text, prompt)
    return parse_keyword(kind, text)
