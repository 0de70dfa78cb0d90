"""The tiny model and its local tokenizer: no download, LLaMA-like special tokens, odd sizes."""

from __future__ import annotations

import logging

import pytest
import torch

from adapters_lab.config import DType, ModelConfig, TinyModelConfig
from adapters_lab.models import build_model, build_tiny_tokenizer, cache_argument, call_cache, ensure_pad_token


def test_tiny_tokenizer_round_trips_any_text_and_prepends_bos():
    tok = build_tiny_tokenizer()
    text = "Ünïcödé ∑ 1,234.5 — «quotes»\n\t  spaces"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    assert build_tiny_tokenizer().get_vocab() == tok.get_vocab()  # deterministic


def test_tiny_model_has_the_configured_odd_shape():
    cfg = ModelConfig(name="t", tiny=TinyModelConfig(hidden_size=36, intermediate_size=58, num_hidden_layers=2,
                                                     num_attention_heads=3, num_key_value_heads=1), dtype=DType.float32)
    model, tok = build_model(cfg)
    layer = model.model.layers[0]
    assert len(model.model.layers) == 2
    assert layer.self_attn.q_proj.weight.shape == (36, 36)
    assert layer.self_attn.k_proj.weight.shape == (12, 36)  # one kv head of dim 12
    assert layer.mlp.up_proj.weight.shape == (58, 36)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    # The head is wide enough that a frozen random head can still express confident logits.
    assert model.lm_head.weight.std().item() == pytest.approx(2 / 36**0.5, rel=0.1)
    out = model(**tok(["a b", "c"], return_tensors="pt", padding=True))
    assert out.logits.shape[:2] == (2, len(tok("a b")["input_ids"]))
    assert torch.isfinite(out.logits).all()


class _NoPadTokenizer:
    def __init__(self, unk=None, eos=None):
        self.pad_token, self.unk_token, self.eos_token = None, unk, eos
        self.padding_side = "right"

    @property
    def pad_token_id(self):
        return None if self.pad_token is None else 0


def test_missing_pad_token_borrows_unk_then_eos(caplog):
    with caplog.at_level(logging.WARNING):
        tok = _NoPadTokenizer(unk="<unk>", eos="</s>")
        ensure_pad_token(tok, "m")
    assert tok.pad_token == "<unk>" and tok.padding_side == "left"
    assert "model=m" in caplog.text and "no pad token" in caplog.text
    tok = _NoPadTokenizer(eos="</s>")
    ensure_pad_token(tok, "m")
    assert tok.pad_token == "</s>"
    with pytest.raises(ValueError, match="model=m"):
        ensure_pad_token(_NoPadTokenizer(), "m")


def test_pretrained_model_needs_a_source():
    with pytest.raises(ValueError, match="model.local_path or model.hub_id"):
        build_model(ModelConfig(name="x"))


def test_cache_argument_follows_the_forward_signature_and_either_name_is_read():
    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):
            return None

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return None

    assert cache_argument(New()) == "cache" and cache_argument(Old()) == "past_key_values"
    marker = object()
    assert call_cache({"cache": marker}) is marker
    assert call_cache({"past_key_values": marker, "cache": None}) is marker
    assert call_cache({"input_ids": 1}) is None
