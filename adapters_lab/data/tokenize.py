"""Records to training features, upstream's way, and the padded and packed collators.

As in LLM-Adapters' ``finetune.py``: the full prompt is cut at ``cutoff_len``; EOS is
appended when it fits; with ``train_on_inputs=false`` the user part (the prompt with an
empty output) is masked out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters_lab.data.prompts import train_prompt
from adapters_lab.data.records import DataError

IGNORE_INDEX = -100


@dataclass
class Features:
    examples: list[dict]  # input_ids, labels
    truncated: int  # full texts cut at cutoff_len
    prompt_overflow: int  # user prompts that alone reach cutoff_len (nothing of the answer left)


def tokenize_record(record: dict, tokenizer, cutoff_len: int, train_on_inputs: bool, add_eos: bool) -> tuple[dict, bool, bool]:
    full = tokenizer(train_prompt(record["instruction"], record["input"], record["output"]))["input_ids"]
    truncated = len(full) > cutoff_len
    ids = full[:cutoff_len]
    if add_eos and ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
        ids = ids + [tokenizer.eos_token_id]
    labels = list(ids)
    user_len = len(tokenizer(train_prompt(record["instruction"], record["input"], ""))["input_ids"])
    if not train_on_inputs:
        user_len = min(user_len, cutoff_len)
        labels = [IGNORE_INDEX] * user_len + labels[user_len:]
    return {"input_ids": ids, "labels": labels}, truncated, user_len >= cutoff_len


def tokenize_records(records: list[dict], tokenizer, cutoff_len: int, train_on_inputs: bool,
                     add_eos: bool, max_overflow_share: float, key: str) -> Features:
    examples, truncated, overflow = [], 0, []
    for index, record in enumerate(records):
        example, was_cut, overflowed = tokenize_record(record, tokenizer, cutoff_len, train_on_inputs, add_eos)
        examples.append(example)
        truncated += was_cut
        overflow += [index] if overflowed else []
    if records and len(overflow) / len(records) > max_overflow_share:
        longest = max(overflow, key=lambda i: len(records[i]["instruction"]) + len(records[i]["input"]))
        chars = len(records[longest]["instruction"]) + len(records[longest]["input"])
        raise DataError(
            f"{key}: {len(overflow)} of {len(records)} prompts reach dataset.cutoff_len={cutoff_len} "
            f"before the response starts (record {', '.join(map(str, overflow[:5]))}{', ...' if len(overflow) > 5 else ''}"
            f" of the split, in file order; the longest, record {longest}, has {chars:,} characters); "
            "raise dataset.cutoff_len or remove them"
        )
    return Features(examples, truncated, len(overflow))


class PaddedCollator:
    """Right-pads a micro-batch to its longest sequence (rounded up to a multiple).

    The same tensors as transformers' ``DataCollatorForSeq2Seq`` with right padding
    (tests/test_packing.py checks it), kept because that one needs a tokenizer object where the
    trainer holds only a pad id, and took twice the time (1.0 vs 0.5 ms per micro-batch of 4, CPU).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(x["input_ids"]) for x in batch)
        length = -(-longest // self.multiple) * self.multiple
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_rows(order: list[int], lengths: list[int], row_length: int, window: int = 1024) -> list[list[int]]:
    """Bins of example indices whose lengths sum to at most ``row_length``.

    First-fit decreasing inside consecutive windows of ``order``, so a seeded shuffle still
    decides which examples train together while the rows come out nearly full.
    """
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        bins: list[list[int]] = []
        room: list[int] = []
        for index in sorted(order[start : start + window], key=lambda i: -lengths[i]):
            if lengths[index] > row_length:
                raise ValueError(f"example {index} has {lengths[index]} tokens, more than the packed row length {row_length}")
            slot = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
            if slot is None:
                bins.append([])
                room.append(row_length)
                slot = len(bins) - 1
            bins[slot].append(index)
            room[slot] -= lengths[index]
        rows.extend(bins)
    return rows


class PackedCollator:
    """Padding-free batches (not transformers' ``DataCollatorWithFlattening``, which gives one row
    of changing length: compiled layers need rows of one fixed length): each row concatenates whole examples, with position ids restarting
    at 0 for every example and no attention mask, so transformers builds a block-diagonal
    causal mask (no attention across examples). The first label of every example is masked:
    the token before it belongs to another example. Rows are right-padded to ``row_length``
    (fixed shapes, so compiled code is reused) with a final filler segment that has no labels.
    """

    def __init__(self, pad_token_id: int, row_length: int):
        self.pad_token_id = pad_token_id
        self.row_length = row_length

    def __call__(self, rows: list[list[dict]]) -> dict[str, torch.Tensor]:
        shape = (len(rows), self.row_length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        for row, examples in enumerate(rows):
            at = 0
            for example in examples:
                n = len(example["input_ids"])
                input_ids[row, at : at + n] = torch.tensor(example["input_ids"])
                labels[row, at + 1 : at + n] = torch.tensor(example["labels"][1:])
                position_ids[row, at : at + n] = torch.arange(n)
                at += n
            position_ids[row, at:] = torch.arange(self.row_length - at)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
