"""The decoder's fused RMSNorms (adapters_lab/fused_norms.py): the same output as transformers'
norm, swapped in only inside the block, used by the decoder's forwards, hooked modules left alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters_lab import decoding, fused_norms
from tests.adapter_helpers import TINY, tiny_model
from tests.test_decoding import LENGTHS, PAD, left_padded


def test_every_norm_of_llama_and_qwen2_is_found_and_computes_transformers_norm():
    for model_type in ("llama", "qwen2"):
        model = tiny_model(model_type)
        norms = fused_norms.rms_norms(model)
        assert len(norms) == 2 * TINY[model_type]["num_hidden_layers"] + 1  # two a layer and the final one
        x = torch.randn(3, 5, model.config.hidden_size) * 4
        with torch.no_grad():
            norms[0].weight.uniform_(0.5, 1.5)
            expected = norms[0](x)
            with fused_norms.fused(norms):
                got = norms[0](x)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert "forward" not in vars(norms[0])  # the class's forward again after the block


def test_in_bfloat16_the_fused_norm_is_within_one_rounding_of_transformers():
    norm = fused_norms.rms_norms(tiny_model("llama"))[0].to(torch.bfloat16)
    x = torch.randn(64, norm.weight.shape[0], dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        exact = F.rms_norm(x.float(), norm.weight.shape, norm.weight.float(), norm.variance_epsilon)
        theirs = norm(x).float()
        with fused_norms.fused([norm]):
            ours = norm(x).float()
    assert (ours - exact).abs().max() <= (theirs - exact).abs().max() + 1e-6  # one rounding, not two
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_a_module_whose_forward_is_already_an_instance_attribute_is_left_alone():
    model = tiny_model("llama")
    hooked = model.model.norm
    hooked.forward = lambda x: x  # an accelerate hook, say
    assert hooked not in fused_norms.rms_norms(model)


def test_the_decoder_runs_its_forwards_with_the_fused_norms(monkeypatch):
    model = tiny_model("llama")
    calls = []
    real = fused_norms.F.rms_norm
    monkeypatch.setattr(fused_norms.F, "rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, mask = left_padded(LENGTHS)
    decoder = decoding.Decoder(model, ids.shape[0], ids.shape[1], 1, 3, 2, PAD)
    decoder(ids, mask)
    assert len(calls) == 3 * len(decoder.norms)  # the prefill and two steps, every norm each time
    assert all("forward" not in vars(m) for m in decoder.norms)
