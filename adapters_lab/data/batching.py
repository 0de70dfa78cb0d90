"""Micro-batches of training examples: a deterministic plan per epoch (seed + epoch), so a data
position is (epoch, index) and a resumed run sees the same batches in the same order.

``trainer.batching`` picks the sampler: ``padded`` (a seeded shuffle, as HF Trainer's sampler),
``length_grouped`` (similar lengths together, HF's length-grouped sampler idea), ``packed``
(padding-free rows of whole examples) or ``paper_packed`` (padded's steps as packed rows,
``data/paper_packing.py``).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from adapters_lab.config import Batching, TrainerConfig, TrainerConfigError
from adapters_lab.data.paper_packing import PaperPackedCollator, run_step_shape, step_groups
from adapters_lab.data.tokenize import PackedCollator, PaddedCollator, pack_rows

log = logging.getLogger(__name__)


# Not accelerate's prepared DataLoader + skip_first_batches: a (seed, epoch) plan resumes at its position, no state
def epoch_batches(num_examples: int, micro_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A seeded shuffle per epoch, cut into micro-batches (the last may be short)."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [order[i : i + micro_batch_size] for i in range(0, num_examples, micro_batch_size)]


def length_grouped_batches(lengths: list[int], micro_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled, then sorted by length inside windows of 64 micro-batches, cut, and the
    micro-batches shuffled again: little padding, still random (HF's length-grouped sampler idea)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = 64 * micro_batch_size
    grouped = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        grouped += [chunk[i : i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
    return [grouped[i] for i in torch.randperm(len(grouped), generator=generator).tolist()]


def packed_batches(lengths: list[int], rows: int, row_length: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Micro-batches of ``rows`` packed rows (lists of example indices) from a seeded shuffle."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    packed = pack_rows(order, lengths, row_length)
    return [packed[i : i + rows] for i in range(0, len(packed), rows)]


Extras = Callable[[dict, int], dict]  # (collated CPU batch, max segment length) -> extra batch entries


class BatchPlan:
    """The micro-batches of each epoch for ``trainer.batching`` and the collator that makes them.
    ``extras`` adds entries a speed path needs to each collated batch, on the CPU (varlen
    attention's segment boundaries)."""

    def __init__(self, examples: list[dict], cfg: TrainerConfig, pad_token_id: int, seed: int,
                 extras: Extras | None = None, collate=None):
        self.examples, self.seed, self.cfg, self.extras = examples, seed, cfg, extras
        self.lengths = [len(x["input_ids"]) for x in examples]
        self.batching = cfg.batching  # typed: a Batching member
        # a fixed bound on segment lengths (varlen's max_seqlen, static for compiled code; the
        # packed row length when trainer.pack_length=0): the longest example rounded up to 8
        self.max_segment = -(-max(self.lengths) // 8) * 8 if self.lengths else 8
        if self.batching in (Batching.packed, Batching.paper_packed):  # paper_packed's 0: one row a step
            self.row_length = cfg.pack_length or (self.max_segment if self.batching == Batching.packed else 0)
            if self.row_length and max(self.lengths) > self.row_length:
                raise TrainerConfigError(
                    f"trainer.pack_length={cfg.pack_length}: shorter than the longest training example "
                    f"({max(self.lengths)} tokens); raise it or set 0 (auto)")
            if self.batching == Batching.packed:
                self.collate = PackedCollator(pad_token_id, self.row_length)
            else:  # one shape for every step of the run (compiled layers and the block mask: built once)
                rows, length = self.paper_step_shape()
                log.info("trainer.batching=paper_packed: every step is %d row(s) of %d tokens", rows, length)
                self.collate = PaperPackedCollator(pad_token_id, length, rows)
        else:  # a model kind's own padded collator (image-text: with the images) or the text one
            self.collate = collate or PaddedCollator(pad_token_id)

    def epoch(self, epoch: int) -> list:
        mbs = self.cfg.micro_batch_size
        if self.batching == Batching.packed:
            return packed_batches(self.lengths, mbs, self.row_length, self.seed, epoch)
        if self.batching == Batching.length_grouped:
            return length_grouped_batches(self.lengths, mbs, self.seed, epoch)
        if self.batching == Batching.paper_packed:  # one entry per optimiser step: its micro-batches
            return step_groups(epoch_batches(len(self.examples), mbs, self.seed, epoch), self.cfg.batch_size // mbs)
        return epoch_batches(len(self.examples), mbs, self.seed, epoch)

    def batch(self, micro: list) -> tuple[dict, int]:
        """The collated tensors (on the CPU) and their real token count (no device sync)."""
        if self.batching in (Batching.packed, Batching.paper_packed):  # rows, or a step's micro-batches
            groups = [[self.examples[i] for i in group] for group in micro]
            batch, real = self.collate(groups), sum(self.lengths[i] for group in micro for i in group)
        else:
            batch, real = self.collate([self.examples[i] for i in micro]), sum(self.lengths[i] for i in micro)
        if self.extras is not None:
            batch.update(self.extras(batch, self.max_segment))
        return batch, real

    def micro_batches_per_epoch(self) -> int:
        return len(self.epoch(0))

    def run_epochs(self) -> int:
        """The epochs a run visits (``trainer.max_steps`` or ``trainer.epochs`` of the plan's entries)."""
        per_epoch = max(self.micro_batches_per_epoch(), 1)
        entries = self.cfg.max_steps if self.cfg.max_steps > 0 else math.ceil(per_epoch * self.cfg.epochs)
        return max(1, math.ceil(entries / per_epoch))

    def paper_step_shape(self) -> tuple[int, int]:
        """paper_packed: (rows, row length) that every optimiser step of the run is padded to, the
        largest any step of its seeded epochs needs (known before the first step; a resumed run
        computes the same)."""
        steps = [[self.lengths[i] for micro in step for i in micro]
                 for epoch in range(self.run_epochs()) for step in self.epoch(epoch)]
        return run_step_shape(steps, self.row_length)
