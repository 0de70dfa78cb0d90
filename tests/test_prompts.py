"""Golden strings: the prompt builder reproduces LLM-Adapters' templates byte for byte.

Without input they are the spine issue's strings (upstream's ``finetune.py`` / ``evaluate.py``
without the ``# noqa: E501`` some upstream commits carry inside the string); with input,
upstream's ``evaluate.py`` / ``commonsense_evaluate.py`` (no space after "request.") and
``finetune.py`` at 91770ab (one space, blank lines of 16 spaces).
"""

from __future__ import annotations

from adapters_lab.data.prompts import RESPONSE_MARKER, eval_prompt, train_prompt

I = " " * 16  # upstream's indentation


def test_training_text_without_input():
    expected = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.  \n\n                ### Instruction:\n                Add 2 and 3.\n                \n"
                "                ### Response:\n                The answer is 5.")
    assert train_prompt("Add 2 and 3.", "", "The answer is 5.") == expected


def test_evaluation_prompt_without_input():
    expected = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request. \n\n                ### Instruction:\n                Add 2 and 3.\n\n"
                "                ### Response:\n                ")
    assert eval_prompt("Add 2 and 3.") == expected
    assert eval_prompt("Add 2 and 3.", "") == expected


def test_training_text_with_input():
    expected = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request. \n\n"
                f"{I}### Instruction:\n{I}Add them.\n{I}\n{I}### Input:\n{I}2 and 3\n{I}\n{I}### Response:\n{I}5")
    assert train_prompt("Add them.", "2 and 3", "5") == expected


def test_evaluation_prompt_with_input():
    expected = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"{I}### Instruction:\n{I}Add them.\n\n{I}### Input:\n{I}2 and 3\n\n{I}### Response:\n{I}")
    assert eval_prompt("Add them.", "2 and 3") == expected


def test_user_part_is_a_prefix_of_the_training_text():
    """``train_on_inputs=false`` masks the prompt built with an empty output: it must be a prefix."""
    for instruction, input in (("Q?", ""), ("Q?", "ctx")):
        full = train_prompt(instruction, input, "A.")
        assert full.startswith(train_prompt(instruction, input, ""))
        assert full.count(RESPONSE_MARKER) == 1
