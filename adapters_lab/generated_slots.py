"""Where the decoder's generated tokens sit in its KV cache, which beams attend to each, and the
compaction that drops the tokens no running beam descends from.

Decoding runs in periods of ``period`` steps. During a period, the token chosen at step ``s`` by
beam row ``r`` goes to slot ``kept + (s - start) * beams + r`` of the generated region (after the
prefix and the prompt), ``start`` being the period's first step and ``kept`` the slots carried
over from the earlier periods. Two tables describe every slot a step reads: the step and the beam
row whose token it holds (``slot_step``, ``slot_row``). Beam ``k`` attends slot ``c`` iff its
ancestry's row at step ``slot_step[c]`` is ``slot_row[c]`` and that step is written.

At the end of a period, a slot that is no running beam's ancestor will never be attended again
(a beam's ancestry only ever changes to another running beam's). ``next_period`` moves the live
slots of each prompt to the front, in their order, and keeps as many slots as the prompt with the
most live ones needs, rounded up to ``bucket``. Under 4-beam search the running beams share most
of their history: with SmolLM2-135M on GSM8K, trained or random-init, about a third of the 4
tokens a step stays live; on the random-init LLaMA-7B shape the last step of a 128-prompt batch
read 384 generated slots instead of 1,024 (docs/benchmarks.md). Greedy decoding has no dead slots
and never compacts.

Attention sums over the same keys either way; only the order and number of masked slots differ,
which in bf16 can round differently (as a different attention window does).
"""

from __future__ import annotations

import math

import torch

from adapters_lab import slot_kernels

BUCKET = 64  # compacted slots are kept in multiples of this: fewer distinct shapes (CUDA graphs)
PROMPT_CHUNK = 32  # prompts per gather while compacting: bounds its temporary memory


class GeneratedSlots:
    """The generated region's layout for ``prompts`` prompts of ``beams`` beams over ``steps``
    steps, in periods of ``period`` steps, the region starting at cache slot ``first``; ``compact``
    false keeps every slot (the layout before compaction, for comparison); ``kernel``: compact with
    ``slot_kernels.compact`` (one launch) rather than torch's gathers."""

    def __init__(self, prompts: int, beams: int, steps: int, period: int, first: int, device: torch.device,
                 bucket: int | None = None, compact: bool = True, kernel: bool = False):
        self.beams, self.steps, self.period, self.first, self.compact = beams, steps, period, first, compact
        self.kernel = kernel
        self.bucket = BUCKET if bucket is None else bucket
        long = dict(dtype=torch.long, device=device)
        self.slot_step = torch.zeros(prompts, beams * steps, **long)
        self.slot_row = torch.zeros(prompts, beams * steps, **long)
        self.segment_start = torch.zeros((), **long)  # the period's first step, on the device
        # Slots no beam attends after a compaction: from a prompt's live count to ``kept`` (cache slot numbers).
        self.gap_from = torch.full((prompts,), first, dtype=torch.int32, device=device)
        self.gap_to = torch.full((), first, dtype=torch.int32, device=device)
        self.own_rows = torch.arange(beams, **long)
        self.kept, self.start = 0, 0
        self.reset()

    # -- host-side state: the shape of the current period ---------------------------------------

    @property
    def segment(self) -> int:
        """Slots of the current period's tokens."""
        return self.beams * min(self.period, self.steps - self.start)

    @property
    def key(self) -> tuple[int, int]:
        """What a step's shapes depend on: slots carried over and the current period's slots."""
        return self.kept, self.segment

    @property
    def visible(self) -> int:
        """Generated slots a step of this period attends (unwritten ones masked)."""
        return self.kept + self.segment

    def reset(self) -> None:
        """Before a batch: nothing generated, the first period starts at step 0."""
        self.kept, self.start = 0, 0
        self.segment_start.zero_()
        self._set_gap(None)
        self._lay_segment()

    def period_over(self, previous: int) -> bool:
        """Whether the token of step ``previous`` falls after the current period."""
        return previous >= self.start + self.period

    # -- device-side: a step's writes and mask (captured in CUDA graphs) -------------------------

    def write_slots(self, previous: torch.Tensor) -> torch.Tensor:
        """Cache slots of the ``beams`` tokens of step ``previous`` (a device scalar)."""
        offset = self.first + self.kept + (previous - self.segment_start) * self.beams
        return offset + self.own_rows

    def mask(self, ancestry: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """``(prompts, beams, visible)``: beam ``k`` attends a generated slot iff the slot holds its
        ancestor's token of a step up to ``previous``. ``ancestry`` is ``(prompts, beams, steps)``."""
        return self._descended(ancestry, self.visible) & (self.slot_step[:, None, : self.visible] <= previous)

    def _descended(self, ancestry: torch.Tensor, slots: int) -> torch.Tensor:
        """``(prompts, beams, slots)``: whether the first ``slots`` slots hold the beams' ancestors' tokens."""
        steps = self.slot_step[:, None, :slots].expand(-1, self.beams, -1)
        return torch.gather(ancestry, 2, steps) == self.slot_row[:, None, :slots]

    # -- between periods ----------------------------------------------------------------------------

    def next_period(self, keys: torch.Tensor, values: torch.Tensor, ancestry: torch.Tensor) -> None:
        """Start the next period; under beam search first move every prompt's live slots to the
        front of its generated region (``keys``, ``values``: ``(layers, prompts, heads, slots, d)``)."""
        written = self.visible
        kept, dead_after = written, None  # dead_after: each prompt's live count, where a compaction ran
        if self.beams > 1 and self.compact:
            live = self._descended(ancestry, written).any(dim=1)  # every slot so far is written
            count = live.sum(dim=1)
            kept = min(written, self.bucket * math.ceil(int(count.max()) / self.bucket))  # one host read a period
            if kept < written:
                self._compact(keys, values, live, kept)
                dead_after = count
        self._set_gap(dead_after, kept)
        self.start += self.period
        self.kept = kept
        self.segment_start.fill_(self.start)
        self._lay_segment()

    def _set_gap(self, live_count: torch.Tensor | None, kept: int = 0) -> None:
        """After a compaction, prompt ``p``'s slots from its live count to ``kept`` are dead; else no gap."""
        self.gap_to.fill_(self.first + kept)
        if live_count is None:
            self.gap_from.fill_(self.first + kept)
        else:
            self.gap_from.copy_(live_count + self.first)

    def _compact(self, keys: torch.Tensor, values: torch.Tensor, live: torch.Tensor, kept: int) -> None:
        written = live.shape[1]
        order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)[:, :kept]  # live first, in order
        if self.kernel:
            slot_kernels.compact(keys, values, order, self.first)
        else:
            self._gather(keys, values, order, written)
        # A prompt with fewer live slots than ``kept`` carries some dead ones: no beam descends from them, now or later.
        for table in (self.slot_step, self.slot_row):
            table[:, :kept] = torch.gather(table[:, :written], 1, order)

    def _gather(self, keys: torch.Tensor, values: torch.Tensor, order: torch.Tensor, written: int) -> None:
        """``_compact``'s moves as torch gathers, a layer and a chunk of prompts at a time."""
        first, kept = self.first, order.shape[1]
        for cache in (keys, values):
            for layer in range(cache.shape[0]):
                for p in range(0, order.shape[0], PROMPT_CHUNK):
                    region = cache[layer, p : p + PROMPT_CHUNK, :, first : first + written]
                    index = order[p : p + PROMPT_CHUNK, None, :, None].expand(-1, region.shape[1], -1, region.shape[3])
                    region[:, :, :kept] = torch.gather(region, 2, index)

    def _lay_segment(self) -> None:
        """The current period's slots: step ``start + i // beams``, row ``i % beams``."""
        index = torch.arange(self.segment, device=self.slot_step.device)
        self.slot_step[:, self.kept : self.kept + self.segment] = self.start + index // self.beams
        self.slot_row[:, self.kept : self.kept + self.segment] = index % self.beams
