"""Our decoder (adapters_lab/decoding.py) with prefix tuning chooses the tokens of transformers'
generate through the virtual-token hook: greedy and 4 beams, with and without the prefix's
projection, left-padded prompts of different lengths, sequences ending early. The prefix is random
and non-zero and changes the tokens, so the equality is not vacuous. Prompt tuning stays on generate."""

from __future__ import annotations

import pytest
import torch

from adapters_lab import decoding, evaluate
from adapters_lab.adapters import virtual_tokens
from adapters_lab.adapters.base import freeze
from adapters_lab.adapters.prefix import MODULE_NAME, PrefixTuning
from adapters_lab.adapters.prompt import PromptInit, PromptTuning
from tests.adapter_helpers import randomize_trainable, tiny_model
from tests.test_decoding import EOS, LENGTHS, PAD, _IdsTokenizer, frequent_token, left_padded, ours, reference

N = 5  # virtual tokens: an odd count, unlike every other size of the tiny models


def prefixed(projection: bool, model_type: str = "llama", confident: bool = False):
    """A tiny model with a random prefix (its embedding, and the projection's MLP, moved off init)."""
    model = tiny_model(model_type)
    if confident:  # beams that end early can win
        with torch.no_grad():
            model.lm_head.weight.mul_(100)
    freeze(model)
    PrefixTuning(name="prefix", num_virtual_tokens=N, projection=projection, projection_hidden=7).inject(model)
    randomize_trainable(model, seed=3)
    return model.eval()


def redraw_prefix(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in getattr(model, MODULE_NAME).parameters():
            param.copy_(torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("beams", [1, 4])
@pytest.mark.parametrize("early_eos", [False, True])
def test_prefix_tuned_tokens_equal_generate(projection, beams, early_eos):
    model = prefixed(projection, confident=early_eos)
    assert decoding.supports(model, 64)
    ids, mask = left_padded(LENGTHS)
    steps = 16
    eos = frequent_token(model, ids, mask, steps, beams) if early_eos else EOS
    expected = reference(model, ids, mask, beams, steps, eos)
    assert torch.equal(ours(model, ids, mask, beams, steps, eos, window=8, check_every=4), expected)
    if early_eos:
        assert (expected == eos).any() and (expected[:, -1] == PAD).any()  # some sequences did end early


def test_the_prefix_changes_the_tokens_and_is_read_at_each_batch():
    model = prefixed(projection=False)
    ids, mask = left_padded(LENGTHS)
    decoder = decoding.Decoder(model, len(LENGTHS), ids.shape[1] + 2, 4, 12, EOS, PAD, window=4)
    with_prefix = decoder(ids, mask)
    base = tiny_model("llama")
    assert not torch.equal(with_prefix, reference(base, ids, mask, 4, 12, EOS))  # the prefix matters
    redraw_prefix(model, seed=7)
    redrawn = decoder(ids, mask)  # the same decoder: the prefix is written again at the prefill
    assert not torch.equal(redrawn, with_prefix)
    assert torch.equal(redrawn, reference(model, ids, mask, 4, 12, EOS))


def test_prefill_chunks_windows_and_reuse_keep_the_prefix_tokens(monkeypatch):
    model = prefixed(projection=True)
    ids, mask = left_padded(LENGTHS)
    expected = reference(model, ids, mask, 4, 12, EOS)
    monkeypatch.setattr(decoding, "PREFILL_TOKENS", 2 * ids.shape[1])  # prefill two prompts at a time
    other_ids, other_mask = left_padded([3, 12, 5, 7, 2], seed=1)
    decoder = decoding.Decoder(model, 5, 16, 4, 12, EOS, PAD, window=1, check_every=1)
    decoder(other_ids, other_mask)
    assert torch.equal(decoder(ids, mask), expected)


def test_the_cache_and_the_memory_estimate_count_the_prefix_slots():
    model = prefixed(projection=False)
    slots, beams, steps = 16, 4, 6
    decoder = decoding.Decoder(model, 1, slots, beams, steps, EOS, PAD)
    assert decoder.cache.keys.shape[3] == N + slots + beams * steps
    per_prompt = decoder.cache.keys.nbytes + decoder.cache.values.nbytes + 4 * beams * model.lm_head.out_features * 4
    fit = decoding.prompts_that_fit
    assert fit(model, slots, beams, steps, decoding.WORKSPACE_BYTES + 3 * per_prompt) == 3
    assert fit(model, slots, beams, steps, decoding.WORKSPACE_BYTES + 3 * per_prompt - 1) == 2


def test_supports_prefix_tuning_but_not_prompt_tuning():
    prompted = tiny_model("llama")
    freeze(prompted)
    PromptTuning(name="prompt", num_virtual_tokens=N, init=PromptInit.random).inject(prompted)
    assert not decoding.supports(prompted, 16)
    assert decoding.supports(prefixed(False), 8192) and decoding.supports(prefixed(True, "qwen2"), 8192)
    mistral = prefixed(False, "mistral")
    mistral.config.sliding_window = 64
    assert decoding.supports(mistral, 64 - N) and not decoding.supports(mistral, 65 - N)  # the window spans the prefix


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_evaluate_decodes_prefix_tuning_with_our_decoder_and_prompt_tuning_with_generate(method, monkeypatch):
    if method == "prefix":
        model = prefixed(projection=True)
    else:
        model = tiny_model("llama")
        freeze(model)
        PromptTuning(name="prompt", num_virtual_tokens=N, init=PromptInit.random).inject(model)
        randomize_trainable(model, seed=3)
    ids, mask = left_padded(LENGTHS)
    tokenizer, prompts = _IdsTokenizer(ids, mask), [str(i) for i in range(len(LENGTHS))]
    expected = evaluate.generate(model, tokenizer, prompts, 2, 4, 8, torch.device("cpu"), "transformers")
    built, real_init = [], decoding.Decoder.__init__

    def counting_init(self, *args, **kwargs):
        built.append(args[1])
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(decoding.Decoder, "__init__", counting_init)
    assert evaluate.generate(model, tokenizer, prompts, 2, 4, 8, torch.device("cpu")) == expected
    assert built == ([2] if method == "prefix" else [])


def test_suspended_hooks_leave_the_models_calls_unchanged():
    model, base = prefixed(projection=True), tiny_model("llama")
    ids, mask = left_padded(LENGTHS)
    hooked = model(input_ids=ids, attention_mask=mask).logits
    plain = base(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(hooked, plain, atol=1e-3)  # the hook adds the prefix
    with virtual_tokens.hooks_suspended(model):
        with virtual_tokens.hooks_suspended(model):
            pass
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, plain)  # still suspended
    with pytest.raises(RuntimeError, match="inside"):
        with virtual_tokens.hooks_suspended(model):
            raise RuntimeError("inside")
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, hooked)  # hooked again
