"""Golden strings: the prompt builder reproduces LLM-Adapters' templates byte for byte.

Without input they are upstream's ``finetune.py`` / ``evaluate.py`` strings,
without the ``# noqa: E501`` some upstream commits carry inside the string); with input,
upstream's ``evaluate.py`` / ``commonsense_evaluate.py`` (no space after "request.") and
``finetune.py`` at 91770ab (one space, blank lines of 16 spaces).
"""

from __future__ import annotations

from adapters_lab.data.prompts import RESPONSE_MARKER, eval_prompt, prompt_for, train_prompt

IND = " " * 16  # upstream's indentation


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
                f"{IND}### Instruction:\n{IND}Add them.\n{IND}\n{IND}### Input:\n{IND}2 and 3\n{IND}\n"
                f"{IND}### Response:\n{IND}5")
    assert train_prompt("Add them.", "2 and 3", "5") == expected


def test_evaluation_prompt_with_input():
    expected = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"{IND}### Instruction:\n{IND}Add them.\n\n{IND}### Input:\n{IND}2 and 3\n\n{IND}### Response:\n{IND}")
    assert eval_prompt("Add them.", "2 and 3") == expected


def test_user_part_is_a_prefix_of_the_training_text():
    """``train_on_inputs=false`` masks the prompt built with an empty output: it must be a prefix."""
    for instruction, input in (("Q?", ""), ("Q?", "ctx")):
        full = train_prompt(instruction, input, "A.")
        assert full.startswith(train_prompt(instruction, input, ""))
        assert full.count(RESPONSE_MARKER) == 1


def test_train_template_prompts_are_the_training_texts_user_part_token_for_token(tmp_path, monkeypatch):
    """eval.prompt_template=train: the prompt evaluation feeds the model is, token for token, the part
    of the training text whose labels are masked with train_on_inputs=false; paper's differs."""
    import json

    import pytest
    import torch

    from adapters_lab import evaluate
    from adapters_lab.config import EvalConfig, PromptTemplate
    from adapters_lab.data.tokenize import IGNORE_INDEX, tokenize_record
    from adapters_lab.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    records = [{"instruction": "Add 2 and 3.", "input": "", "output": "The answer is 5.", "answer": "5"},
               {"instruction": "Add them.", "input": "2 and 3", "output": "The answer is 5.", "answer": "5"}]
    monkeypatch.setattr(evaluate, "generate", lambda model, tok, prompts, *a: ["The answer is 5."] * len(prompts))
    for template in ("train", "paper"):
        cfg = EvalConfig(prompt_template=PromptTemplate(template), num_beams=1)
        evaluate.evaluate_sets(None, tokenizer, {"gsm8k": records}, cfg, torch.device("cpu"), tmp_path / template)
        lines = [json.loads(x) for x in (tmp_path / template / "gsm8k.jsonl").read_text().splitlines()]
        for record, line in zip(records, lines):
            example, _, _ = tokenize_record(record, tokenizer, 512, train_on_inputs=False, add_eos=True)
            masked = sum(label == IGNORE_INDEX for label in example["labels"])
            user = tokenizer(train_prompt(record["instruction"], record["input"], ""))["input_ids"]
            prompt_ids = tokenizer(line["prompt"])["input_ids"]
            # The user part as training measures it (its length is what the loss masks) ...
            assert (prompt_ids == user) == (template == "train") and len(user) == masked
            # ... and the training text's own tokens up to the last one, the indentation before the
            # response, which byte-level BPE splits around the response's first word (as upstream's does).
            same = next((i for i, (a, b) in enumerate(zip(prompt_ids, example["input_ids"])) if a != b), masked)
            assert same == len(prompt_ids) - 1 if template == "train" else same < len(prompt_ids) - 10
            assert line["prompt"] == prompt_for(template, record["instruction"], record["input"])
    with pytest.raises(ValueError, match="eval.prompt_template=chat"):
        prompt_for("chat", "q")
