"""The decoder's fused layers (adapters_lab/fused_layers.py): under Triton's CPU interpreter the kernels
compute transformers' add, RMSNorm and SiLU product, a decoder running them (alone and inside lanes)
chooses generate's tokens, adapters hooked on the sublayers still run; the swap holds only inside
its block and leaves layers with forwards of their own alone."""

from __future__ import annotations

import torch

from adapters_lab import fused_layers
from tests.adapter_helpers import tiny_model
from tests.triton_interpreter import needs_triton, run_interpreted

CHECK = """
import torch
import torch.nn.functional as F
from adapters_lab import fused_layers
from tests.adapter_helpers import tiny_model
from tests.test_decoding import compacting_case

torch.manual_seed(0)
model = tiny_model("llama")
norm = model.model.layers[0].post_attention_layernorm
with torch.no_grad():
    norm.weight.copy_(torch.rand(norm.weight.shape) + 0.5)
# In bfloat16 to one unit in the last place: the interpreter truncates where a GPU rounds to nearest.
for dtype, (rtol, atol) in ((torch.float32, (1e-6, 1e-6)), (torch.bfloat16, (1e-2, 1e-2))):
    x, delta = torch.randn(3, 1, norm.weight.shape[0], dtype=dtype), torch.randn(3, 1, norm.weight.shape[0], dtype=dtype)
    summed, normed = fused_layers.add_rms_norm(x, delta, norm.to(dtype))
    torch.testing.assert_close(summed, x + delta, rtol=rtol, atol=atol)
    expected = F.rms_norm(x + delta, norm.weight.shape, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(normed, expected, rtol=rtol * 2, atol=atol * 2)
    gate, up = torch.randn(2, 1, 3000, dtype=dtype) * 4, torch.randn(2, 1, 3000, dtype=dtype)  # three programs
    torch.testing.assert_close(fused_layers.silu_mul(gate, up), F.silu(gate) * up, rtol=rtol * 2, atol=atol * 2)
    norm.float()
assert fused_layers.kernels_agree(torch.device("cpu"), torch.float32, 24)  # the decoder's check at build passes
calls = []
for name in ("add_rms_norm", "silu_mul"):
    kernel = getattr(fused_layers, name)
    setattr(fused_layers, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
for model_type, beams, lanes in (("llama", 4, 1), ("qwen2", 1, 1), ("llama", 4, 2)):
    decoder, ids, mask, expected = compacting_case(model_type, beams, lanes=lanes)
    decoder.fused = fused_layers.fusable(decoder.model)  # on a GPU by default; forced here
    calls.clear()
    assert torch.equal(decoder(ids, mask), expected), (model_type, beams, lanes)
    layers = decoder.model.config.num_hidden_layers
    assert calls.count("add_rms_norm") >= 24 * layers and calls.count("silu_mul") >= 24 * layers, len(calls)
    unfused, ids, mask, _ = compacting_case(model_type, beams)
    unfused(ids, mask)  # the beams' scores, more sensitive than tokens, as transformers' layers give them
    torch.testing.assert_close(decoder.scores, unfused.scores, rtol=1e-5, atol=1e-5)
# Adapters on the sublayers (AdapterH: after the attention and after the MLP; IA3 on the projections) still run.
from adapters_lab import decoding
from adapters_lab.adapters import build_adapter, freeze
from tests.adapter_helpers import randomize_trainable
from tests.conftest import compose_config
from tests.test_decoding import LENGTHS, PAD, left_padded, reference
for adapter in ("adapterh", "ia3"):
    model = tiny_model("llama")
    freeze(model)
    build_adapter(compose_config([f"adapter={adapter}"]).adapter).inject(model)
    randomize_trainable(model)
    model.eval()
    ids, mask = left_padded(LENGTHS)
    decoder = decoding.Decoder(model, ids.shape[0], ids.shape[1], 4, 10, 2, PAD)
    decoder.fused = fused_layers.fusable(model)
    assert len(decoder.fused[0]) == model.config.num_hidden_layers, adapter
    assert torch.equal(decoder(ids, mask), reference(model, ids, mask, 4, 10, 2)), adapter
    plain = decoding.Decoder(model, ids.shape[0], ids.shape[1], 4, 10, 2, PAD)
    plain(ids, mask)
    torch.testing.assert_close(decoder.scores, plain.scores, rtol=1e-5, atol=1e-5)
print("fused layers ok")
"""


@needs_triton
def test_fused_layers_under_the_triton_interpreter():
    run_interpreted(CHECK, "fused layers ok")


def test_the_swap_holds_only_inside_the_block_and_spares_forwards_of_their_own():
    model = tiny_model("llama")
    layers, mlps = fused_layers.fusable(model)
    assert len(layers) == len(mlps) == model.config.num_hidden_layers
    own = model.model.layers[1].mlp
    own.forward = own.forward  # as an accelerate hook would leave it
    layers, mlps = fused_layers.fusable(model)
    assert own not in mlps and len(mlps) == len(layers) - 1
    with fused_layers.fused(layers, mlps):
        assert all("forward" in vars(m) for m in [*layers, *mlps])
        assert fused_layers.layer_forward(layers[0]) is not type(layers[0]).forward
    assert all("forward" not in vars(m) for m in [*layers, *mlps])
    assert fused_layers.layer_forward(layers[0]) is type(layers[0]).forward
    assert own.forward is not None and "forward" in vars(own)


def test_inputs_the_kernels_do_not_take_go_to_torch():
    model = tiny_model("llama")
    norm = model.model.layers[0].post_attention_layernorm
    x = torch.randn(4, 2, norm.weight.shape[0]).transpose(0, 1)  # not contiguous
    summed, normed = fused_layers.add_rms_norm(x, x, norm)
    assert torch.equal(summed, x + x) and torch.equal(normed, norm(x + x))
    gate = torch.randn(3, 8)
    assert torch.equal(fused_layers.silu_mul(gate, gate.double()), torch.nn.functional.silu(gate) * gate.double())


def test_kernels_that_fail_or_disagree_leave_transformers_layers(monkeypatch, caplog):
    import torch.nn.functional as F

    monkeypatch.setattr(fused_layers, "triton", fused_layers.triton or object())  # the kernels themselves are stood in for
    monkeypatch.setattr(fused_layers, "_agree", {})

    def torch_add_norm(x, delta, norm):
        return x + delta, F.rms_norm(x + delta, norm.weight.shape, norm.weight, norm.variance_epsilon)

    monkeypatch.setattr(fused_layers, "add_rms_norm", torch_add_norm)
    monkeypatch.setattr(fused_layers, "silu_mul", lambda gate, up: F.silu(gate) * up)
    cpu = torch.device("cpu")
    assert fused_layers.kernels_agree(cpu, torch.float32, 24)
    monkeypatch.setattr(fused_layers, "silu_mul", lambda gate, up: F.silu(gate) * up * 1.05)
    assert fused_layers.kernels_agree(cpu, torch.float32, 24)  # answered once per device, dtype and width
    assert not fused_layers.kernels_agree(cpu, torch.float32, 32)
    monkeypatch.setattr(fused_layers, "silu_mul", lambda gate, up: F.silu(gate) * up)
    monkeypatch.setattr(fused_layers, "add_rms_norm", lambda *a: (_ for _ in ()).throw(ValueError("compiler error")))
    assert not fused_layers.kernels_agree(cpu, torch.float32, 40)
    assert "fused decoder layers off (compiler error)" in caplog.text


def test_each_layers_mlp_add_is_fused_into_the_next_layers_norm(monkeypatch):
    import torch.nn.functional as F

    calls = []

    def torch_add_norm(x, delta, norm):  # the kernel's computation in torch: the chain is what is tested here
        calls.append(norm)
        return x + delta, F.rms_norm(x + delta, norm.weight.shape, norm.weight, norm.variance_epsilon)

    monkeypatch.setattr(fused_layers, "add_rms_norm", torch_add_norm)
    monkeypatch.setattr(fused_layers, "silu_mul", lambda gate, up: F.silu(gate) * up)
    model = tiny_model("qwen2")
    layers = model.model.layers
    first_norms = []
    for layer in layers:
        layer.input_layernorm.register_forward_hook(lambda module, args, out: first_norms.append(module))
    ids = torch.randint(3, 50, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
        first_norms.clear()
        with fused_layers.fused(*fused_layers.fusable(model)):
            got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert first_norms == [layers[0].input_layernorm]  # the others came with the adds before them
    expected_norms = [n for layer, after in zip(layers, [*layers[1:], None])
                      for n in (layer.post_attention_layernorm, after and after.input_layernorm) if n is not None]
    assert calls == expected_norms  # 2 x layers - 1 fused adds, in order
    assert fused_layers._pending == [] and fused_layers._following == {}
