"""The LLM-Adapters (Alpaca) prompt templates, byte for byte.

Upstream's training template (``finetune.py`` at 91770ab) has two spaces after "request."
without input, one with input, and blank lines of 16 spaces; its evaluation template
(``evaluate.py``, ``commonsense_evaluate.py``) has one space after "request." without input,
none with input, and empty lines. Both keep upstream's 16-space indentation. Some upstream
commits carry the ``# noqa: E501`` lint comment inside the template string itself; the project
follows the templates without it.
"""

from __future__ import annotations

RESPONSE_MARKER = "### Response:"
_INDENT = " " * 16

_TRAIN_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
)
_TRAIN_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
)
_EVAL_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
)
_EVAL_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)


def train_prompt(instruction: str, input: str = "", output: str = "") -> str:
    """Training text; with ``output=""`` it is the user part whose tokens are masked when
    ``train_on_inputs`` is false."""
    if input:
        return (
            f"{_TRAIN_HEAD_INPUT}{_INDENT}### Instruction:\n{_INDENT}{instruction}\n{_INDENT}\n"
            f"{_INDENT}### Input:\n{_INDENT}{input}\n{_INDENT}\n"
            f"{_INDENT}{RESPONSE_MARKER}\n{_INDENT}{output}"
        )
    return (
        f"{_TRAIN_HEAD}{_INDENT}### Instruction:\n{_INDENT}{instruction}\n{_INDENT}\n"
        f"{_INDENT}{RESPONSE_MARKER}\n{_INDENT}{output}"
    )


def prompt_for(template: str, instruction: str, input: str = "") -> str:
    """The evaluation prompt under ``eval.prompt_template``: ``paper`` (``eval_prompt``) or ``train``
    (``train_prompt``'s user part, the exact text the loss masks when ``train_on_inputs`` is false)."""
    if template == "train":
        return train_prompt(instruction, input, "")
    if template == "paper":
        return eval_prompt(instruction, input)
    raise ValueError(f"eval.prompt_template={template}: expected paper or train")


def eval_prompt(instruction: str, input: str = "") -> str:
    """The prompt the evaluators feed to generation."""
    if input:
        return (
            f"{_EVAL_HEAD_INPUT}{_INDENT}### Instruction:\n{_INDENT}{instruction}\n\n"
            f"{_INDENT}### Input:\n{_INDENT}{input}\n\n"
            f"{_INDENT}{RESPONSE_MARKER}\n{_INDENT}"
        )
    return f"{_EVAL_HEAD}{_INDENT}### Instruction:\n{_INDENT}{instruction}\n\n{_INDENT}{RESPONSE_MARKER}\n{_INDENT}"
