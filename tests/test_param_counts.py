"""Exact trainable-parameter counts on the LLaMA-7B shape, built on the meta device (no memory,
no download), from the real ``conf/adapter`` files; the two published numbers come from
LLM-Adapters (LoRA r=32 on q,k,v,up,down; its AdapterH = the "200M" of its README)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapters_lab.adapters import build_adapter, count_parameters, freeze

H, FF, LAYERS = 4096, 11008, 32


@pytest.fixture(scope="module")
def llama7b_meta():
    def make():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                                 num_attention_heads=32, vocab_size=32000))
        freeze(model)
        return model

    return make


@pytest.mark.parametrize("name,overrides,expected", [
    ("lora", [], 56_098_816),  # LLM-Adapters' LoRA row
    ("llm_adapters_series", [], 201_326_592),  # LLM-Adapters' AdapterH ("200M")
    # the rest by formula, from each method's definition
    ("dora", [], 56_098_816 + LAYERS * (3 * H + FF + H)),  # + one magnitude per output row of q,k,v,up,down
    ("ia3", [], LAYERS * (H + H + FF)),  # k and v outputs, down's input
    ("llm_adapters_parallel", [], LAYERS * 2 * 256 * (H + FF)),  # up: H->256->FF, down: FF->256->H
    ("adapterh", ["adapter.rank=64"], LAYERS * 2 * (2 * 64 * H + 64 + H)),  # with biases
    ("prompt", ["adapter.num_virtual_tokens=20"], 20 * H),
    ("prefix", ["adapter.projection=false"], 20 * LAYERS * 2 * H),
    ("lora", ["adapter.rank=8", "+adapter.rank_pattern.down=16"],
     LAYERS * (8 * (H + H) * 3 + 8 * (H + FF) + 16 * (FF + H))),
])
def test_llama7b_trainable_parameters(make_cfg, llama7b_meta, name, overrides, expected):
    adapter = build_adapter(make_cfg(f"adapter={name}", *overrides).adapter)
    model = llama7b_meta()
    adapter.inject(model, tokenizer=None)
    assert count_parameters(model)["trainable"] == expected
    assert all(p.is_meta for p in model.parameters())
