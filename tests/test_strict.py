"""The strict protocol, one test per class of text a careful reader scores differently from a
literal rule (several texts each), and properties: it never crashes, and a text that states an
answer is never credited with a different one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters_lab.answers import ANSWER_KIND, is_correct, parse_paper, parse_strict

AQUA_PROMPT = "A train ... ? Answer Choices: (A) 23.65 (B) 1000 (C) 35.62 (D) 2.65 (E) 1023.65"


def strict_number(text):
    return parse_strict("gsm8k", text)


@pytest.mark.parametrize("text, expected", [
    ("The answer is 15, not 12.", 15),
    ("The answer is 36 (12 * 3).", 36),
    ("The answer is 12 chairs in 2 rooms.", 12),
    ("So the answer is $40 for 5 hours of work.", 40),
    ("The answer is 6 pieces, or 15 ounces.", 6),
    ("The answer is 220 + 90 + 60 = 370.", 370),  # an equation that starts the statement: its result
    ("The answer is: 3 * 4 = 12 + 1 = 13", 13),
])
def test_the_number_completing_the_statement_wins(text, expected):
    assert strict_number(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("answer: 5. Wait, I forgot the tax. The answer is 10.", 10),
    ("The answer is 4. Let me check: 2 + 3 = 5. The answer is 5.", 5),
    ("#### 3\nThe answer is 8", 8),
    ("Tom has 3 apples and buys 4 more, 3 + 4 = 7, then eats 2. The answer is 5. 12 people agree.", 5),
    ("He paid 20 dollars for 4 books. The answer is 5. Next question: Ana has 12 pens", 5),
    ("3 + 4 = 7, and 7 * 2 = 14", 14),  # no statement: the last number of the reasoning
])
def test_the_last_statement_wins_over_earlier_ones_and_over_reasoning(text, expected):
    assert strict_number(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("The answer is 3 1/2.", 3.5),
    ("The answer is -2 3/4", -2.75),
    ("The answer is 11/6.", 11 / 6),
    ("The answer is 3/4 of the pie.", 0.75),
    ("The answer is \u22127.", -7),  # Unicode minus
    ("The temperature is \u22124 degrees", -4),
    ("The answer is -$5.", -5),
    ("The answer is $-5.", -5),
    ("The answer is $1,250.50.", 1250.5),
    ("The answer is 1.5e3.", 1500),
    ("The answer is 2E-2", 0.02),
    ("The answer is 1\u2009234\u2009567.", 1234567),  # thin-space thousands
    ("The answer is 12\u202f500", 12500),  # narrow no-break space
    ("The answer is 1 000 000.", 1000000),  # space thousands
    ("The answer is .5", 0.5),
    ("The answer is 0.5.", 0.5),
    ("The answer is \uff14\uff12.", 42),  # full-width digits
])
def test_number_formats(text, expected):
    assert strict_number(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("the answer is b.", "B"),
    ("The answer is d", "D"),
    ("The answer is \uff22.", "B"),  # full-width capital
    ("the answer is \uff43", "C"),  # full-width lower case
    ("I think (b) is right.", "B"),
    ("The answer is (c).", "C"),
    ("It must be option C.", "C"),
    ("Choice e fits best", "E"),
    ("Answer: D", "D"),
    ("Answer: C. Then again, the answer is (A).", "A"),  # the last statement
    ("The answer is B because the train is faster", "B"),
    ("the answer is a lot of work", None),  # "a lot" states no option
    ("The answer is D, not option C.", "D"),  # a negated option is no statement
])
def test_option_letters_in_every_form(text, expected):
    assert parse_strict("AQuA", text) == expected
    assert parse_strict("mathqa", text) == expected


@pytest.mark.parametrize("dataset, text, expected", [
    ("ARC-Easy", "the correct answer is answer 4", "answer4"),
    ("ARC-Challenge", "The correct answer is Answer3", "answer3"),
    ("openbookqa", "Answer3", "answer3"),
    ("social_i_qa", "answer 2 seems right", "answer2"),
    ("piqa", "Solution 1", "solution1"),
    ("piqa", "the correct answer is SOLUTION 2", "solution2"),
    ("winogrande", "option 2", "option2"),
    ("winogrande", "The correct answer is Option 1.", "option1"),
    ("hellaswag", "ending 3", "ending3"),
    ("hellaswag", "the answer is: Ending4", "ending4"),
    ("boolq", "The correct answer is True", "true"),
    ("ARC-Easy", "answer 10", None),  # not answer1
    ("piqa", "solution 3", None),  # not one of the set's keywords
])
def test_keywords_with_a_space_or_a_capital(dataset, text, expected):
    assert parse_strict(dataset, text) == expected


@pytest.mark.parametrize("dataset, text, expected", [
    ("boolq", "This is not true.", None),
    ("boolq", "false ... true is wrong", None),
    ("boolq", "It isn't really true.", None),
    ("boolq", "the correct answer is not true", None),
    ("boolq", "The statement is true? No, it is false. true is incorrect", None),
    ("boolq", "true is wrong, so the correct answer is false", "false"),  # a clear statement
    ("piqa", "solution1 is not right", None),
    ("ARC-Easy", "answer2 is wrong, the correct answer is answer3", "answer3"),
    ("gsm8k", "The answer is not 12.", None),
    ("gsm8k", "The answer isn't 12.", None),
    ("gsm8k", "The answer is not 12. The answer is 15.", 15.0),
    ("AQuA", "The answer is not (B).", None),
    ("AQuA", "It is not (B). The answer is (C).", "C"),
])
def test_negation_and_contradiction_give_no_answer_unless_clear(dataset, text, expected):
    assert parse_strict(dataset, text) == expected


@pytest.mark.parametrize("dataset, text, prompt, expected", [
    ("mawps", "The answer is 3 1/2.", "", 3.5),
    ("mawps", "so x = 12 / 5. The answer is 2.4", "", 2.4),
    ("mawps", "The answer is \u22123.", "", -3.0),
    ("mathqa", "the answer is c.", "", "C"),
    ("mathqa", "so the profit is 27.675 %. The answer is 27.675", "A ) 38 , B ) 27.675 , C ) 30", "B"),
    ("mathqa", "Answer: E", "", "E"),
    ("AQuA", "The answer is 1,000", AQUA_PROMPT, "B"),
])
def test_mawps_and_mathqa_are_read_like_their_kind(dataset, text, prompt, expected):
    got = parse_strict(dataset, text, prompt)
    assert got == (pytest.approx(expected) if isinstance(expected, float) else expected)


def test_paper_is_unchanged_on_the_strict_classes():
    """The classes above are strict's; paper keeps upstream's last-number and first-capital rules."""
    assert parse_paper("gsm8k", "The answer is 15, not 12.") == 12.0
    assert parse_paper("gsm8k", "The answer is 3 1/2.") == 2.0
    assert parse_paper("AQuA", "the answer is b.") is None
    assert parse_paper("boolq", "This is not true.") == "true"


# ---------------------------------------------------------------------------- properties

def render(value: float, style: str) -> str:
    if style == "commas":
        return f"{value:,.0f}" if value == int(value) else f"{value:,}"
    if style == "dollars":
        return f"-${-value:g}" if value < 0 else f"${value:g}"
    if style == "minus":
        return f"{value:g}".replace("-", "\u2212")
    return f"{value:g}"


NUMBERS = st.one_of(st.integers(-10_000, 10_000).map(float),
                    st.integers(-9999, 9999).map(lambda n: n / 4))
FILLER = st.lists(st.sampled_from(["Tom has {} apples.", "He buys {} more.", "{} + {} = {}.", "So {} remain.",
                                   "Each bag holds {} coins."]), max_size=4)


@settings(max_examples=300, deadline=None)
@given(stated=NUMBERS, others=st.lists(NUMBERS, min_size=6, max_size=6), filler=FILLER, after=FILLER,
       style=st.sampled_from(["plain", "commas", "dollars", "minus"]))
def test_a_stated_number_is_the_one_credited(stated, others, filler, after, style):
    """Reasoning numbers before the statement and after it never win over the stated number."""
    def fill(templates):
        return " ".join(t.format(*[f"{o:g}" for o in others][: t.count("{}")]) for t in templates)

    text = f"{fill(filler)} The answer is {render(stated, style)}. {fill(after).replace('answer', '')}"
    assert parse_strict("gsm8k", text) == pytest.approx(stated)
    for other in others:
        if abs(other - stated) > 0.001:
            assert not is_correct("gsm8k", parse_strict("gsm8k", text), f"{other:g}")


KEYWORD_SETS = [name for name, kind in ANSWER_KIND.items() if "|" in kind]


@settings(max_examples=300, deadline=None)
@given(dataset=st.sampled_from(KEYWORD_SETS), data=st.data(), noise=st.text(alphabet="abc xyz.,", max_size=30),
       spelling=st.sampled_from(["plain", "space", "capital"]))
def test_a_stated_keyword_is_the_one_credited(dataset, data, noise, spelling):
    words = ANSWER_KIND[dataset].split("|")
    stated, other = data.draw(st.permutations(words))[:2]
    written = {"plain": stated, "capital": stated.capitalize(),
               "space": stated[:-1] + " " + stated[-1] if stated[-1].isdigit() else stated}[spelling]
    text = f"{other} looks plausible{noise} but the correct answer is {written}"
    assert parse_strict(dataset, text) == stated
    assert not is_correct(dataset, parse_strict(dataset, text), other)


@settings(max_examples=200, deadline=None)
@given(letter=st.sampled_from("ABCDE"), other=st.sampled_from("ABCDE"), case=st.sampled_from(["upper", "lower"]),
       form=st.sampled_from(["The answer is {}.", "Answer: {}", "The answer is ({}).", "So option {}."]))
def test_a_stated_letter_is_the_one_credited(letter, other, case, form):
    written = letter if case == "upper" else letter.lower()
    text = f"Maybe ({other}) at first. {form.format(written)}"
    assert parse_strict("AQuA", text) == letter


@settings(max_examples=400, deadline=None)
@given(dataset=st.sampled_from(sorted(ANSWER_KIND)), text=st.text(max_size=160), prompt=st.text(max_size=80))
def test_strict_never_crashes(dataset, text, prompt):
    prediction = parse_strict(dataset, text, prompt)
    assert prediction is None or isinstance(prediction, (float, str))
