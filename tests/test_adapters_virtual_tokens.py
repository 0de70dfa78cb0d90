"""Prompt and prefix tuning through the real generation path: batched, left-padded
``model.generate(input_ids, attention_mask)`` with the KV cache must give, for every prompt, the
tokens of a cache-free greedy loop over that prompt alone; training-style calls (labels,
``use_cache=False``) keep the caller's sequence length."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from adapters_lab.adapters.base import freeze
from adapters_lab.adapters.prefix import PrefixTuning
from adapters_lab.adapters.prompt import PromptInit, PromptTuning
from tests.adapter_helpers import VOCAB, randomize_trainable, tiny_model

PAD, NEW = 0, 6


def adapted(method: str, model_type: str):
    model = tiny_model(model_type)
    freeze(model)
    adapter = (PromptTuning(name="prompt", num_virtual_tokens=3, init=PromptInit.random) if method == "prompt"
               else PrefixTuning(name="prefix", num_virtual_tokens=3, projection=method == "prefix_mlp",
                                 projection_hidden=8))
    adapter.inject(model)
    randomize_trainable(model, seed=3)
    return model


def greedy_without_cache(model, ids: list[int]) -> list[int]:
    """Reference: recompute the whole unpadded sequence each step, take the argmax."""
    seq = list(ids)
    for _ in range(NEW):
        x = torch.tensor([seq])
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "bloom"])  # bloom: alibi, no position ids
@pytest.mark.parametrize("method", ["prompt", "prefix", "prefix_mlp"])
def test_left_padded_batched_generate_matches_unpadded_greedy(method, model_type):
    model = adapted(method, model_type)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 4, 2)]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=NEW, min_new_tokens=NEW,
                              pad_token_id=PAD, eos_token_id=None, use_cache=True)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        expected = [greedy_without_cache(model, p) for p in prompts]
    assert out[:, width:].tolist() == expected


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_beam_search_runs_and_logits_keep_the_callers_length(method):
    model = adapted(method, "llama")
    ids = torch.randint(3, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    assert out.logits.shape[:2] == (2, 5) and torch.isfinite(out.loss)
    # the same logits with or without a cache being built
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, out.logits)
    config = GenerationConfig(do_sample=False, num_beams=3, max_new_tokens=4, pad_token_id=PAD, eos_token_id=2)
    with torch.no_grad():
        seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert seqs.shape[0] == 2 and seqs.shape[1] > 5


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_packed_training_is_refused_before_any_weights(make_cfg, name):
    from adapters_lab.adapters import AdapterConfigError, build_adapter

    cfg = make_cfg(f"adapter={name}", "trainer.batching=packed")
    with pytest.raises(AdapterConfigError, match=r"trainer\.batching=packed"):
        build_adapter(cfg.adapter).check_training(cfg.trainer)


def test_packed_rows_are_refused_at_forward_too():
    model = adapted("prompt", "llama")
    ids = torch.randint(3, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="trainer.batching=packed"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), labels=ids)


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_chunked_loss_is_refused_before_any_weights(make_cfg, name):
    """The chunked loss calls the decoder alone, which would skip the virtual tokens (no gradient)."""
    from adapters_lab.adapters import AdapterConfigError, build_adapter

    cfg = make_cfg(f"adapter={name}", "trainer.batching=padded", "trainer.fused_loss=true")
    with pytest.raises(AdapterConfigError, match=r"trainer\.fused_loss=true"):
        build_adapter(cfg.adapter).check_training(cfg.trainer)
    build_adapter(cfg.adapter).check_training(make_cfg(f"adapter={name}", "trainer.fused_loss=false").trainer)


def test_chunked_loss_check_names_virtual_tokens():
    from adapters_lab.training.speed.loss import check_fused_loss_supported

    assert "virtual tokens" in check_fused_loss_supported(adapted("prefix", "llama"))
