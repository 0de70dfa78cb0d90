"""The decoder's cache-moving kernels (adapters_lab/slot_kernels.py) under Triton's CPU interpreter:
a step's write equals ``index_copy_``'s, the compaction equals the gathers on every live slot and
leaves the rest of the cache alone, and a decoder using both chooses ``generate``'s tokens."""

from __future__ import annotations

import pytest
import torch

from adapters_lab import slot_kernels
from adapters_lab.decoding import Decoder
from tests.adapter_helpers import tiny_model
from tests.triton_interpreter import needs_triton, run_interpreted

CHECK = """
import torch
from adapters_lab import slot_kernels
from adapters_lab.generated_slots import GeneratedSlots
from tests.test_decoding import compacting_case

torch.manual_seed(0)
# A step's write: beams 4 and 1, into a strided view of one layer (the decoder's), float32 keys into a float16 cache.
# Heads past one program's block (11 heads at 4 beams: two programs a prompt, the second partly empty).
for beams, prompts, heads in ((4, 3, 2), (1, 5, 3), (3, 2, 2), (4, 2, 11), (1, 1, 37)):
    cache_k = torch.zeros(2, prompts, heads, 40, 16, dtype=torch.float16)
    cache_v = torch.zeros(2, prompts, heads, 40, 16, dtype=torch.float16)
    key, value = torch.randn(prompts * beams, heads, 1, 16), torch.randn(prompts * beams, heads, 1, 16)
    slots = torch.tensor([7, 11, 12, 30][:beams])
    expected_k, expected_v = cache_k[1].clone(), cache_v[1].clone()
    for source, target in ((key, expected_k), (value, expected_v)):
        states = source.view(prompts, beams, heads, 16).transpose(1, 2).to(torch.float16)
        target.index_copy_(2, slots, states)
    slot_kernels.write_step(key, value, cache_k[1], cache_v[1], slots)
    assert torch.equal(cache_k[1], expected_k) and torch.equal(cache_v[1], expected_v), beams
    assert cache_k[0].abs().max() == 0 and cache_v[0].abs().max() == 0  # the other layer untouched
# The compaction: 3 layers, 4 prompts, live slots at random, kept above the fewest prompts' live counts.
for first, written in ((5, 70), (0, 33)):
    keys, values = torch.randn(3, 4, 2, first + written + 9, 16), torch.randn(3, 4, 2, first + written + 9, 16)
    live = torch.rand(4, written) < 0.4
    live[0, :] = False
    live[0, [3, 60 % written]] = True  # a prompt with few live slots carries dead ones up to kept
    kept = int(live.sum(1).max())
    order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)[:, :kept]
    layout = GeneratedSlots(4, 2, written, 4, first, torch.device("cpu"))
    gathered_k, gathered_v = keys.clone(), values.clone()
    layout._gather(gathered_k, gathered_v, order, written)
    ours_k, ours_v = keys.clone(), values.clone()
    slot_kernels.compact(ours_k, ours_v, order, first)
    for p, count in enumerate(live.sum(1).tolist()):
        live_slots = slice(first, first + count)
        assert torch.equal(ours_k[:, p, :, live_slots], gathered_k[:, p, :, live_slots]), (p, count)
        assert torch.equal(ours_v[:, p, :, live_slots], gathered_v[:, p, :, live_slots]), (p, count)
        assert torch.isfinite(ours_k[:, p]).all()
    for ours, before in ((ours_k, keys), (ours_v, values)):  # the prompt's slots and those past kept: as they were
        assert torch.equal(ours[..., :first, :], before[..., :first, :])
        assert torch.equal(ours[..., first + kept :, :], before[..., first + kept :, :])
# A decoder whose step writes and compactions run on the kernels chooses generate's tokens.
for model_type, beams in (("llama", 4), ("qwen2", 4), ("llama", 1)):
    decoder, ids, mask, expected = compacting_case(model_type, beams)
    decoder.cache.write_kernel = decoder.slots.kernel = True  # on a GPU by default; forced here
    calls, originals = [], {name: getattr(slot_kernels, name) for name in ("write_step", "compact")}
    for name, kernel in originals.items():
        setattr(slot_kernels, name, lambda *a, name=name, kernel=kernel: calls.append(name) or kernel(*a))
    assert torch.equal(decoder(ids, mask), expected), (model_type, beams)
    assert calls.count("write_step") >= decoder.model.config.num_hidden_layers, calls.count("write_step")
    assert beams == 1 or "compact" in calls, "no compaction ran"
    for name, kernel in originals.items():
        setattr(slot_kernels, name, kernel)
print("slot kernels ok")
"""


@needs_triton
def test_slot_kernels_under_the_triton_interpreter():
    run_interpreted(CHECK, "slot kernels ok")


@needs_triton
def test_bad_inputs_are_refused_before_a_launch():
    cache = torch.zeros(2, 2, 8, 12)  # head dim 12: not a power of two
    with pytest.raises(ValueError, match="power-of-two"):
        slot_kernels.write_step(torch.zeros(2, 2, 1, 12), torch.zeros(2, 2, 1, 12), cache, cache, torch.tensor([0]))
    keys = torch.zeros(1, 2, 2, 8, 16)
    with pytest.raises(ValueError, match="one layout"):
        slot_kernels.compact(keys, keys.transpose(1, 2), torch.zeros(2, 3, dtype=torch.long), 0)


def test_a_cpu_decoder_moves_slots_with_torch():
    decoder = Decoder(tiny_model("llama"), 2, 5, 4, 8, 2, 0, window=4)
    assert decoder.cache.write_kernel is False and decoder.slots.kernel is False  # the kernels: GPU only
