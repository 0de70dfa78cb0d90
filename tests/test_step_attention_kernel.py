"""The Triton step-attention kernel (adapters_lab/step_attention_kernel.py) under Triton's CPU
interpreter: it equals SDPA on strided cache views and masks, and a decoder running its steps on
it chooses ``generate``'s tokens, greedy and with 4 beams, compaction included."""

from __future__ import annotations

import importlib.util

import torch

from adapters_lab import step_attention
from tests.triton_interpreter import needs_triton, run_interpreted

CHECK = """
import torch
import torch.nn.functional as F
from adapters_lab import step_attention
from adapters_lab.step_attention_kernel import few_query_attention_kernel
from tests.test_decoding import compacting_case

torch.manual_seed(0)
# Views of a larger cache (the decoder's layout), rows padded to 16 or 32, slots not a multiple of the block.
for rows, slots in ((1, 70), (4, 133), (20, 64)):
    cache = torch.randn(2, 3, 2, 150, 16)  # (layers, prompts, kv heads, slots, d): the views below are strided
    k, v = cache[1, :, :, :slots], cache[0, :, :, :slots]
    q = torch.randn(3, 2, rows, 16)
    mask = torch.rand(3, 1, rows, slots) < 0.4
    mask[..., slots - 1] = True
    out = few_query_attention_kernel(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3))
    mask[0, 0, 0] = False  # a row that attends nothing: zeros, not NaN
    assert few_query_attention_kernel(q, k, v, mask, 0.3)[0, :, 0].abs().max() == 0
# A read window: the slots before each prompt's first, in its gap and from the end given are not read. NaN
# keys and values there leave the result SDPA gives on the clean cache; read without the window they give NaN.
q, k, v = torch.randn(3, 2, 4, 16), torch.randn(3, 2, 260, 16), torch.randn(3, 2, 260, 16)
mask = torch.rand(3, 1, 4, 260) < 0.5
read_from, gap_from = torch.tensor([0, 70, 131], dtype=torch.int32), torch.tensor([140, 180, 150], dtype=torch.int32)
gap_to, read_until = torch.tensor(200, dtype=torch.int32), torch.tensor(250, dtype=torch.int32)
poisoned_k, poisoned_v = k.clone(), v.clone()
for p, (first, gap) in enumerate(zip(read_from.tolist(), gap_from.tolist())):
    mask[p, ..., :first] = False
    mask[p, ..., gap:200] = False
    mask[p, ..., first] = True
    for cache in (poisoned_k, poisoned_v):
        cache[p, :, :first] = float("nan")
        cache[p, :, gap:200] = float("nan")
mask[..., 250:] = False
for cache in (poisoned_k, poisoned_v):
    cache[:, :, 250:] = float("nan")
expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
window = (read_from, gap_from, gap_to, read_until)
ours = few_query_attention_kernel(q, poisoned_k, poisoned_v, mask, 0.25, window=window)
torch.testing.assert_close(ours, expected)
assert few_query_attention_kernel(q, poisoned_k, poisoned_v, mask, 0.25).isnan().any()
# Grouped query heads through few_query_attention: 4 query heads on 2 key/value heads, 3 beams.
q, k, v = torch.randn(2, 4, 3, 32), torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32)
mask = torch.rand(2, 1, 3, 40) < 0.5
mask[..., 0] = True
expected = step_attention.few_query_attention(q, k, v, mask, 0.2)
with step_attention.attention_backend(step_attention.TRITON):
    torch.testing.assert_close(step_attention.few_query_attention(q, k, v, mask, 0.2), expected)
# A decoder whose steps run on the kernel chooses generate's tokens (compaction forced at this size).
# With lanes (adapters_lab/step_lanes.py), each lane's kernel reads its own prompts' windows.
for model_type, beams, lanes in (("llama", 4, 1), ("qwen2", 4, 1), ("llama", 1, 1), ("llama", 4, 2)):
    decoder, ids, mask, expected = compacting_case(model_type, beams, lanes=lanes)
    decoder.step_backend = step_attention.TRITON
    assert torch.equal(decoder(ids, mask), expected), (model_type, beams, lanes)
    assert beams == 1 or decoder.slots.kept < beams * 24 - beams * 4, "compaction dropped slots"
    if beams > 1:  # the beams' scores, more sensitive than tokens, as SDPA (every slot read) gives them
        on_sdpa, ids, mask, _ = compacting_case(model_type, beams)
        on_sdpa(ids, mask)
        for ours, theirs in ((decoder.scores, on_sdpa.scores),
                             (decoder.beam_search.finished_scores, on_sdpa.beam_search.finished_scores)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
print("kernel ok")
"""


@needs_triton
def test_step_kernel_under_the_triton_interpreter():
    run_interpreted(CHECK, "kernel ok")


def test_the_kernel_is_a_candidate_for_16_bit_caches_only():
    with_triton = importlib.util.find_spec("triton") is not None
    assert (step_attention.TRITON in step_attention.step_backends(torch.bfloat16)) == with_triton
    assert step_attention.TRITON not in step_attention.step_backends(torch.float32)  # tl.dot would round via TF32
    assert step_attention.step_backends(torch.float32) == step_attention.STEP_BACKENDS


def test_a_candidate_that_fails_is_skipped():
    calls = []

    def timer(fn):
        calls.append(fn)
        if len(calls) == 1:
            raise ValueError("compiler error")  # not a RuntimeError: the Triton compiler's own
        return 1.0

    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 5, 16)
    mask = torch.ones(1, 1, 2, 5, dtype=torch.bool)
    chosen = step_attention.fastest_step_backend(q, k, k, mask, 0.25, backends=("first", "second"), timer=timer)
    assert chosen == "second" and len(calls) == 2
