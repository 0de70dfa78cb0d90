"""Tiny random decoders of every mapped architecture, for the adapter tests (no download)."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 97
_LLAMA = dict(hidden_size=48, intermediate_size=76, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1)
TINY = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "opt": dict(hidden_size=48, ffn_dim=76, num_hidden_layers=2, num_attention_heads=3, word_embed_proj_dim=48,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    "gptj": dict(n_embd=48, n_inner=76, n_layer=2, n_head=3, rotary_dim=8, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0),
    "gpt2": dict(n_embd=48, n_inner=76, n_layer=2, n_head=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "bloom": dict(hidden_size=48, n_layer=2, n_head=3, hidden_dropout=0.0, attention_dropout=0.0),
    "gpt_neox": dict(hidden_size=48, intermediate_size=76, num_hidden_layers=2, num_attention_heads=3,
                     hidden_dropout=0.0, attention_dropout=0.0),
}


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """A float32 random-init causal LM in eval mode, dropout off everywhere."""
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                  **TINY[model_type])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def batch(seed: int = 0, size: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def randomize_trainable(model: nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor off its init so parity and merge tests see non-trivial adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
