"""The paper's recipe as packed rows (``trainer.batching=paper_packed``): the padded recipe's
optimiser steps, computed without padding.

The padded recipe takes ``batch_size / micro_batch_size`` micro-batches of a seeded shuffle per
optimiser step; each micro-batch's loss is the mean over its labelled tokens and the step's loss
is the mean over its micro-batches. Here a step's examples (the same micro-batches, in the same
steps) go into packed rows (whole examples, positions restarting per example, no attention across
examples: ``PackedCollator``) and run in one forward, and each labelled token carries the weight
``1 / (micro-batches in the step x labelled tokens of its micro-batch)``: the weighted sum of the
token losses is the padded step's loss, term for term.

Every step of a run has the same shape (``run_step_shape``: the most rows, or the longest single
row, that any step of the run's seeded epochs needs); a step that needs fewer gets filler rows or
tokens (pad ids, no labels, weight 0, a segment of their own), so compiled layers and flex
attention's block mask are built for one shape only.
"""

from __future__ import annotations

import torch

from adapters_lab.data.tokenize import IGNORE_INDEX, PackedCollator, pack_rows

LOSS_WEIGHTS = "loss_weights"  # the batch entry: one weight per label position (0 where none)


def step_groups(micro_batches: list[list[int]], accumulation: int) -> list[list[list[int]]]:
    """An epoch's micro-batches grouped as the loop groups them into optimiser steps (the last
    step of an epoch may hold fewer)."""
    return [micro_batches[i : i + accumulation] for i in range(0, len(micro_batches), accumulation)]


def predicted_tokens(example: dict) -> int:
    """Labelled tokens the causal loss predicts (position t predicts label t + 1: never the first)."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def example_weights(step: list[list[dict]]) -> list[float]:
    """Each example's token weight, in the step's order: 1 / (micro-batches x its micro-batch's tokens)."""
    weights = []
    for micro in step:
        tokens = sum(predicted_tokens(x) for x in micro)
        weights += [1.0 / (len(step) * max(tokens, 1))] * len(micro)
    return weights


def row_length_for(lengths: list[int], row_length: int) -> int:
    """``row_length``, or (0) the step's tokens rounded up to 8: one row, no filler beyond that."""
    return row_length or -(-sum(lengths) // 8) * 8


def step_shape(lengths: list[int], row_length: int) -> tuple[int, int]:
    """(rows, row length) one step of examples of ``lengths`` packs into (``row_length`` 0: one row)."""
    if not row_length:  # one row of the step's tokens
        return 1, row_length_for(lengths, row_length)
    return len(pack_rows(list(range(len(lengths))), lengths, row_length)), row_length


def run_step_shape(steps: list[list[int]], row_length: int) -> tuple[int, int]:
    """One (rows, row length) for every step of ``steps`` (each its examples' lengths): the most rows
    any step needs at ``row_length``, or (0) one row of the longest step's tokens."""
    shapes = [step_shape(lengths, row_length) for lengths in steps] or [(1, row_length or 8)]
    return max(rows for rows, _ in shapes), max(length for _, length in shapes)


class PaperPackedCollator:
    """One optimiser step (its micro-batches of examples) as packed rows of ``row_length`` tokens
    (0: a single row of the step's tokens), with ``loss_weights`` beside the labels; with ``rows``,
    filler rows (no labels, weight 0) up to that many, so that every step has one shape."""

    def __init__(self, pad_token_id: int, row_length: int = 0, rows: int = 0):
        self.pad_token_id, self.row_length, self.rows = pad_token_id, row_length, rows

    def __call__(self, step: list[list[dict]]) -> dict[str, torch.Tensor]:
        examples = [x for micro in step for x in micro]
        weights = example_weights(step)
        lengths = [len(x["input_ids"]) for x in examples]
        length = row_length_for(lengths, self.row_length)
        rows = pack_rows(list(range(len(examples))), lengths, length)
        if self.rows and len(rows) > self.rows:
            raise ValueError(f"a step packs into {len(rows)} rows of {length}, more than the run's {self.rows}")
        rows += [[] for _ in range(self.rows - len(rows))]  # filler rows: one segment of pad ids each
        batch = PackedCollator(self.pad_token_id, length)([[examples[i] for i in row] for row in rows])
        loss_weights = torch.zeros(batch["labels"].shape, dtype=torch.float32)
        for r, row in enumerate(rows):  # the examples' places, as PackedCollator lays them out
            at = 0
            for i in row:
                loss_weights[r, at + 1 : at + lengths[i]] = weights[i]
                at += lengths[i]
        batch[LOSS_WEIGHTS] = loss_weights * (batch["labels"] != IGNORE_INDEX)
        return batch
