"""The decoder's generated-slot layout (adapters_lab/generated_slots.py): compaction between periods
keeps exactly what every running beam attends, drops the rest, and leaves generate's tokens unchanged."""

from __future__ import annotations

import pytest
import torch

from adapters_lab import decoding, generated_slots
from adapters_lab.generated_slots import GeneratedSlots
from tests.adapter_helpers import tiny_model
from tests.test_decoding import EOS, LENGTHS, frequent_token, left_padded, ours, reference
from tests.test_decoding_prefix import N, prefixed


def attended(slots: GeneratedSlots, keys: torch.Tensor, ancestry: torch.Tensor, previous: int) -> list[list[list]]:
    """Per prompt and beam, the sorted key vectors (first layer, first head) the beam attends."""
    mask = slots.mask(ancestry, torch.tensor(previous))
    region = keys[0, :, 0, slots.first : slots.first + slots.visible]
    return [[sorted(region[p][mask[p, k]].tolist()) for k in range(mask.shape[1])] for p in range(mask.shape[0])]


def test_compaction_keeps_what_each_beam_attends_and_drops_the_rest():
    prompts, beams, steps, period, first = 3, 4, 12, 4, 2
    slots = GeneratedSlots(prompts, beams, steps, period, first, torch.device("cpu"), bucket=1)
    g = torch.Generator().manual_seed(0)
    keys = torch.zeros(2, prompts, 3, first + beams * steps, 2)
    ancestry = torch.zeros(prompts, beams, steps, dtype=torch.long)
    for step in range(2 * period):
        if slots.period_over(step):
            before = attended(slots, keys, ancestry, step - 1)
            written = slots.visible
            slots.next_period(keys, keys.clone(), ancestry)
            assert attended(slots, keys, ancestry, step - 1) == before  # the same keys, per beam
            live = {(p, s, int(ancestry[p, k, s])) for p in range(prompts) for k in range(beams) for s in range(step)}
            most = max(sum(1 for q, _, _ in live if q == p) for p in range(prompts))
            assert slots.kept == most < written  # the prompt with the most live slots sets the size
        written_at = slots.write_slots(torch.tensor(step))
        assert written_at.tolist() == [first + slots.kept + (step - slots.start) * beams + k for k in range(beams)]
        keys[:, :, :, written_at] = (step * beams + torch.arange(beams, dtype=torch.float)).view(1, 1, 1, -1, 1)
        ancestry[:, :, step] = torch.arange(beams)
        parents = torch.randint(0, 2, (prompts, beams), generator=g)  # beams 0 and 1 survive: 2 and 3 die out
        ancestry.copy_(torch.gather(ancestry, 1, parents[:, :, None].expand(-1, -1, steps)))


def test_greedy_never_compacts():
    slots = GeneratedSlots(2, 1, 10, 4, 0, torch.device("cpu"), bucket=1)
    keys = torch.randn(1, 2, 1, 10, 2)
    slots.next_period(keys, keys, torch.zeros(2, 1, 10, dtype=torch.long))
    assert (slots.kept, slots.start, slots.segment) == (4, 4, 4)
    slots.next_period(keys, keys, torch.zeros(2, 1, 10, dtype=torch.long))
    assert (slots.kept, slots.start, slots.segment) == (8, 8, 2)  # the last period holds the steps left


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("early_eos", [False, True])
def test_compacted_decoding_equals_generate(monkeypatch, model_type, early_eos):
    model = tiny_model(model_type)
    if early_eos:
        with torch.no_grad():
            model.lm_head.weight.mul_(100)
    ids, mask = left_padded(LENGTHS)
    steps = 20
    eos = frequent_token(model, ids, mask, steps, 4) if early_eos else EOS
    sizes = []
    real_next = GeneratedSlots.next_period

    def recording(self, keys, values, ancestry):
        written = self.visible
        real_next(self, keys, values, ancestry)
        sizes.append((written, self.kept))

    monkeypatch.setattr(generated_slots, "BUCKET", 4)
    monkeypatch.setattr(GeneratedSlots, "next_period", recording)
    assert torch.equal(ours(model, ids, mask, 4, steps, eos, window=3, check_every=2), reference(model, ids, mask, 4, steps, eos))
    assert any(kept < written for written, kept in sizes)  # the cache was compacted, more than once
    assert sum(kept < written for written, kept in sizes) >= 2


def test_compaction_keeps_prefix_tuning_tokens(monkeypatch):
    model = prefixed(projection=True)
    ids, mask = left_padded(LENGTHS)
    expected = reference(model, ids, mask, 4, 12, EOS)
    monkeypatch.setattr(generated_slots, "BUCKET", 1)
    decoder = decoding.Decoder(model, len(LENGTHS), ids.shape[1] + 2, 4, 12, EOS, 0, window=2)
    assert decoder.slots.first == N + ids.shape[1] + 2
    assert torch.equal(decoder(ids, mask), expected)
