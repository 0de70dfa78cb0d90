"""The decoder's fused rotary embedding (adapters_lab/fused_rotary.py): transformers' rotation under
Triton's CPU interpreter, the decoder's tokens with it, the swap scoped to the block, and inputs the
kernel does not take left to transformers' function."""

from __future__ import annotations

import torch
from transformers.models.llama import modeling_llama

from adapters_lab import fused_rotary
from tests.adapter_helpers import tiny_model
from tests.triton_interpreter import needs_triton, run_interpreted

CHECK = """
import torch
from transformers.models.llama import modeling_llama
from adapters_lab import decoding, fused_rotary
from tests.adapter_helpers import tiny_model
from tests.test_decoding import LENGTHS, PAD, frequent_token, left_padded, reference

torch.manual_seed(0)
for batch, seq, heads, kv_heads, dim in ((3, 5, 3, 1, 16), (2, 1, 32, 32, 128), (1, 7, 4, 2, 8)):
    q = torch.randn(batch, seq, heads, dim).transpose(1, 2)  # the layout the attention layers pass
    k = torch.randn(batch, seq, kv_heads, dim).transpose(1, 2)
    cos, sin = torch.randn(batch, seq, dim), torch.randn(batch, seq, dim)
    for c, s in ((cos, sin), (cos[:1], sin[:1])):  # per-row positions, and one row broadcast
        expected = modeling_llama.apply_rotary_pos_emb(q, k, c, s)
        for got, want in zip(fused_rotary.rotary_kernel(q, k, c, s), expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
for model_type, beams in (("llama", 4), ("qwen2", 1)):
    model = tiny_model(model_type)
    ids, mask = left_padded(LENGTHS)
    eos = frequent_token(model, ids, mask, 16, beams)
    decoder = decoding.Decoder(model, ids.shape[0], ids.shape[1], beams, 16, eos, PAD, window=4)
    decoder.rotary = fused_rotary.rotary_modules(model)  # on a GPU by default; forced here
    calls = []
    kernel = fused_rotary.rotary_kernel
    fused_rotary.rotary_kernel = lambda *a: calls.append(1) or kernel(*a)
    assert torch.equal(decoder(ids, mask), reference(model, ids, mask, beams, 16, eos)), (model_type, beams)
    fused_rotary.rotary_kernel = kernel
    assert len(calls) >= model.config.num_hidden_layers * 2, len(calls)  # the prefill and the steps went through it
print("rotary ok")
"""


@needs_triton
def test_rotary_kernel_under_the_triton_interpreter():
    run_interpreted(CHECK, "rotary ok")


def test_the_swap_holds_only_inside_the_block():
    modules = fused_rotary.rotary_modules(tiny_model("llama"))
    assert modules == [modeling_llama]
    original = modeling_llama.apply_rotary_pos_emb
    with fused_rotary.fused(modules):
        assert modeling_llama.apply_rotary_pos_emb is not original
    assert modeling_llama.apply_rotary_pos_emb is original
    assert fused_rotary.rotary_modules(tiny_model("qwen2"))[0].__name__.endswith("modeling_qwen2")


def test_inputs_the_kernel_does_not_take_go_to_transformers():
    q, k = torch.randn(2, 3, 4, 12), torch.randn(2, 1, 4, 12)  # half of 12 is not a power of two
    cos, sin = torch.randn(2, 4, 12), torch.randn(2, 4, 12)
    assert not fused_rotary.takes(q, cos, 1)
    assert not fused_rotary.takes(torch.randn(2, 3, 4, 16), torch.randn(2, 4, 16), 2)  # another layout
    with fused_rotary.fused([modeling_llama]):
        got = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(got, modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, b)
