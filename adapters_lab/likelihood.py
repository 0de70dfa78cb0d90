"""Likelihood scoring of fixed-answer sets (``eval.scoring=likelihood``), as lm-evaluation-harness's
multiple-choice ``acc`` and ``acc_norm``: no generation, no parsing.

Every candidate response is the set's own answer text for one of the record's options ("the
correct answer is answer3" for the commonsense sets, "The answer is (B)." for AQuA and mathqa, as
their reference outputs end). Its log-likelihood after the evaluation prompt is the sum of the
log-probabilities of its tokens; the prediction is the candidate with the highest sum (``acc``)
and the one with the highest sum per character of its text (``acc_norm``, the harness's
normalisation). The prompt and the response are tokenized apart and joined (the prompt's tokens
exactly as generation sees them); rows are right-padded, so positions need no rebuilding.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from accelerate.utils import find_executable_batch_size

from adapters_lab.answers import answer_kind
from adapters_lab.data.tasks import eval_task
from adapters_lab.eval_progress import Progress
from adapters_lab.strict import OPTION_LIST_RE

ANSWER_FORMAT_RE = re.compile(r"Answer format:\s*([A-Za-z0-9/]+)")
LETTERS = "ABCDE"


def supports(dataset: str) -> bool:
    """Whether the set's answer is one of a fixed list (not a free number)."""
    return eval_task(dataset).fixed_answers


def options(dataset: str, prompt: str) -> list[str]:
    """The record's answer options: its "Answer format: a/b/c" line, or the lettered options its
    prompt lists, else every answer of the set's kind."""
    kind = answer_kind(dataset)
    if kind == "letter":
        listed = sorted({letter for letter, _ in OPTION_LIST_RE.findall(prompt)})
        return listed if len(listed) > 1 else list(LETTERS)
    family = kind.split("|")
    formats = ANSWER_FORMAT_RE.findall(prompt)
    listed = [word for word in formats[-1].split("/") if word in family] if formats else []
    return listed if len(listed) > 1 else family


def response(dataset: str, option: str) -> str:
    """The set's own answer text for one option."""
    return f"The answer is ({option})." if answer_kind(dataset) == "letter" else f"the correct answer is {option}"


def response_logprobs(model: nn.Module, tokenizer, rows: list[tuple[list[int], list[int]]], batch_size: int,
                      device: torch.device) -> list[float]:
    """Summed log-probability of each row's response tokens after its prompt tokens, ``batch_size``
    rows per forward (halved on running out of GPU memory; finished batches are kept)."""
    order = sorted(range(len(rows)), key=lambda i: -sum(map(len, rows[i])))
    sums: dict[int, float] = {}
    progress = Progress("eval likelihood (prompt, option) rows", len(rows))

    @find_executable_batch_size(starting_batch_size=max(1, batch_size))
    def run(size: int) -> None:
        todo = [i for i in order if i not in sums]
        for start in range(0, len(todo), size):
            chunk = todo[start: start + size]
            sums.update(zip(chunk, _batch_logprobs(model, tokenizer, [rows[i] for i in chunk], device)))
            progress.advance(len(chunk))

    if rows:
        run()
    return [sums[i] for i in range(len(rows))]


@torch.no_grad()
def _batch_logprobs(model: nn.Module, tokenizer, rows: list[tuple[list[int], list[int]]],
                    device: torch.device) -> list[float]:
    width = max(len(p) + len(r) for p, r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.bool)  # positions whose token is a response token
    for row, (prompt, answer) in enumerate(rows):
        ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        mask[row, : len(prompt) + len(answer)] = 1
        targets[row, len(prompt): len(prompt) + len(answer)] = True
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
    return (logprobs * targets[:, 1:].to(device)).sum(dim=1).tolist()


def score_records(model: nn.Module, tokenizer, dataset: str, records: list[dict], prompts: list[str],
                  batch_size: int, device: torch.device) -> list[dict]:
    """Per record: each option's summed and per-character log-likelihood and both predictions."""
    was_training = model.training
    model.eval()
    choices = [options(dataset, prompt) for prompt in prompts]
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    answer_ids = {option: tokenizer(response(dataset, option), add_special_tokens=False)["input_ids"]
                  for option in {o for opts in choices for o in opts}}
    rows = [(prompt_ids[i], answer_ids[o]) for i, opts in enumerate(choices) for o in opts]
    sums = iter(response_logprobs(model, tokenizer, rows, batch_size, device))
    model.train(was_training)
    scored = []
    for record, opts in zip(records, choices):
        loglik = {o: next(sums) for o in opts}
        norm = {o: value / len(response(dataset, o)) for o, value in loglik.items()}
        best, best_norm = max(opts, key=loglik.get), max(opts, key=norm.get)
        scored.append({"loglik": loglik, "prediction": best, "correct": best == record["answer"].strip(),
                       "prediction_norm": best_norm, "correct_norm": best_norm == record["answer"].strip()})
    return scored
