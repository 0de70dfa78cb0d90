"""Both answer protocols on tricky texts. ``paper`` expectations follow upstream's rules by hand
(LLM-Adapters ``evaluate.py`` / ``commonsense_evaluate.py``); ``strict`` ones the stated answer."""

from __future__ import annotations

import pytest

from adapters_lab.answers import (
    ANSWER_KIND,
    answer_kind,
    is_correct,
    label_parses,
    option_values,
    parse_paper,
    parse_strict,
    score,
)

AQUA_PROMPT = "A train ... ? Answer Choices: (A) 23.65 (B) 1000 (C) 35.62 (D) 2.65 (E) 1023.65"
MATHQA_PROMPT = "what would ... ? The options: A ) 38 , B ) 27.675 , C ) 30 , D ) DAtA inADEquAtE , E ) nonE oF thEsE"


@pytest.mark.parametrize("text, paper, strict", [
    ("He pays 1,234 dollars. The answer is 1,234.", 1234.0, 1234.0),  # commas in numbers
    ("It drops 7 degrees, so the answer is -7.", -7.0, -7.0),  # negative
    ("Each costs $2.50. The answer is 2.5", 2.5, 2.5),  # decimal
    ("3 + 4 = 7. The answer is 7. Next question: Tom has 12 apples", 12.0, 7.0),  # several numbers
    ("I do not know.", None, None),  # no number
    ("The answer is 5.", 5.0, 5.0),  # trailing period: upstream's "5." is 5.0
    ("word2vec gives 10", 10.0, 10.0),
    ("so it costs 3-4 dollars", -4.0, 4.0),  # upstream reads "-4" from a range
    ("He has 1,2,3 and 4", 4.0, 4.0),
    ("#### 72", 72.0, 72.0),
    ("The answer is 11/6.", 6.0, 11 / 6),  # a fraction (mawps answers are often fractions)
    ("The answer is 1.83. Then 9", 9.0, 1.83),
])
def test_numeric_parsers(text, paper, strict):
    assert parse_paper("gsm8k", text) == paper
    got = parse_strict("gsm8k", text)
    assert (got is None) if strict is None else got == pytest.approx(strict)


def test_numeric_correctness_uses_upstream_tolerance():
    assert is_correct("SVAMP", 8.0005, "8.0")  # within 0.001
    assert not is_correct("SVAMP", 8.002, "8.0")
    assert is_correct("gsm8k", 1234.0, "1,234")
    assert not is_correct("gsm8k", None, "0")  # no number is wrong, even for a zero label
    assert is_correct("mawps", parse_strict("mawps", "The answer is 11/6"), "1.8333333333333335")
    assert not is_correct("mawps", parse_paper("mawps", "The answer is 11/6"), "1.8333333333333335")


@pytest.mark.parametrize("text, paper, strict", [
    ("A train travels 60 km. The answer is (D).", "A", "D"),  # upstream's quirk: the "A" of "A train"
    ("The answer is (B)", "B", "B"),
    ("the answer is b", None, "B"),  # upstream needs a capital; strict reads a stated lower-case letter
    ("Let x = 5. So (C) is right.", "C", "C"),
    ("the answer is a lot of work, (E)", "E", "E"),  # "a lot" is not option A
    ("Answer: C", "A", "C"),  # upstream: the "A" of "Answer"
    ("no option here", None, None),
    ("BECAUSE it is (A)", "B", "A"),  # letters inside words
])
def test_letter_parsers(text, paper, strict):
    assert parse_paper("AQuA", text) == paper
    assert parse_strict("AQuA", text) == strict


def test_strict_maps_a_stated_number_to_its_option():
    assert option_values(AQUA_PROMPT) == {"A": 23.65, "B": 1000.0, "C": 35.62, "D": 2.65, "E": 1023.65}
    assert option_values(MATHQA_PROMPT) == {"A": 38.0, "B": 27.675, "C": 30.0}
    assert parse_strict("mathqa", "so the profit is 27.675 %. The answer is 27.675", MATHQA_PROMPT) == "B"
    assert parse_strict("AQuA", "The answer is 1000", AQUA_PROMPT) == "B"
    assert parse_strict("AQuA", "The answer is 7", AQUA_PROMPT) is None  # no such option
    assert parse_paper("mathqa", "the answer is 27.675") is None


@pytest.mark.parametrize("dataset, text, paper, strict", [
    ("boolq", "the correct answer is true", "true", "true"),
    ("boolq", "This is untrue, so the correct answer is false", "true", "false"),  # letters inside words
    ("boolq", "The correct answer is False", None, "false"),  # upstream is case-sensitive
    ("boolq", "true or false? false", "true", None),  # keywords repeated, none stated
    ("piqa", "solution2 is better than solution1", "solution2", None),
    ("piqa", "the correct answer is solution1 solution1", "solution1", "solution1"),
    ("social_i_qa", "the correct answer is answer3", "answer3", "answer3"),
    ("ARC-Easy", "answer10", "answer1", None),  # upstream reads answer1 inside answer10
    ("openbookqa", "answer2 answer4 the correct answer is answer4", "answer2", "answer4"),
    ("hellaswag", "ending4", "ending4", "ending4"),
    ("winogrande", "the correct answer is option1", "option1", "option1"),
    ("winogrande", "", None, None),
])
def test_keyword_parsers(dataset, text, paper, strict):
    assert parse_paper(dataset, text) == paper
    assert parse_strict(dataset, text) == strict


def test_score_reports_both_protocols():
    verdicts = score("AQuA", "A train leaves. The answer is (D).", "D", AQUA_PROMPT)
    assert verdicts == {"paper": {"prediction": "A", "correct": False},
                        "strict": {"prediction": "D", "correct": True}}


def test_every_set_has_a_kind_and_labels_are_checked():
    assert answer_kind("ARC-Challenge") == ANSWER_KIND["ARC-Easy"]
    with pytest.raises(KeyError, match="no answer parser for dataset 'nope'"):
        answer_kind("nope")
    assert label_parses("gsm8k", "1,000") and not label_parses("gsm8k", "ten") and not label_parses("gsm8k", "inf")
    assert label_parses("boolq", "true")


@pytest.mark.parametrize("dataset", ["gsm8k", "SVAMP", "MultiArith", "AddSub", "SingleEq", "AQuA", "boolq", "piqa"])
def test_protocols_on_the_shipped_reference_outputs(dataset, shared_data):
    """The upstream test files carry reference outputs ending in a stated answer ("The answer is
    N.", "The answer is (B).", "the correct answer is true"): strict reads that statement, so it
    agrees with paper wherever paper's last-number rule lands on it, and beats paper on AQuA,
    whose first-capital rule is fooled by the words before the statement."""
    import json

    from adapters_lab.data.prompts import eval_prompt

    records = json.loads((shared_data / "llm_adapters" / "dataset" / dataset / "test.json").read_text())
    verdicts = [score(dataset, r["output"], r["answer"], eval_prompt(r["instruction"]))
                for r in records if r["output"].strip()]
    paper = sum(v["paper"]["correct"] for v in verdicts) / len(verdicts)
    strict = sum(v["strict"]["correct"] for v in verdicts) / len(verdicts)
    if dataset == "AQuA":
        assert strict > paper + 0.03
    elif answer_kind(dataset) == "number":
        assert strict == pytest.approx(paper, abs=0.005)
    else:
        assert paper == strict == 1.0
