"""Bottleneck adapters against a hand computation of their formula, for every position:
per linear (series input ``W(x + a(x))``, series output ``Wx + a(Wx)``, parallel ``Wx + a(x)``)
and per sublayer (series ``f(x) + a(f(x))``, parallel ``f(x) + a(x)``) on several architectures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapters_lab.adapters.base import AdapterConfigError, freeze
from adapters_lab.adapters.bottleneck import Bottleneck, BottleneckAdapter, BottleneckPlacement, Init, Position
from tests.adapter_helpers import batch, randomize_trainable, tiny_model

S = 0.7  # a scaling other than 1, so a missing factor shows


def by_hand(h: torch.Tensor, adapter: BottleneckAdapter) -> torch.Tensor:
    """s * up(tanh(down(h))) with explicit matrix products."""
    down = h @ adapter.down.weight.T + adapter.down.bias
    return S * (torch.tanh(down) @ adapter.up.weight.T + adapter.up.bias)


@pytest.mark.parametrize("parallel,position,expected", [
    (False, "input", lambda W, b, x, a: F.linear(x + by_hand(x, a), W, b)),
    (False, "output", lambda W, b, x, a: F.linear(x, W, b) + by_hand(F.linear(x, W, b), a)),
    (True, "input", lambda W, b, x, a: F.linear(x, W, b) + by_hand(x, a)),
])
def test_per_linear_positions_match_the_formula(parallel, position, expected):
    model = tiny_model("llama")
    freeze(model)
    adapter = Bottleneck(name="b", rank=5, parallel=parallel, activation="tanh", scaling=S, bias=True, init=Init.bert,
                         placement=BottleneckPlacement(modules=["up"], position=Position(position)))
    adapter.validate()
    adapter.inject(model)
    randomize_trainable(model)
    layer = model.model.layers[1].mlp.up_proj
    weight = layer.base_layer.weight.detach().clone()
    x = torch.randn(2, 3, weight.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected(weight, None, x, layer.adapter), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bloom", "gpt_neox", "gptj"])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("position", ["after_attn", "after_mlp", "both"])
def test_sublayer_positions_match_the_formula(model_type, parallel, position):
    model = tiny_model(model_type)
    freeze(model)
    adapter = Bottleneck(name="b", rank=6, parallel=parallel, activation="tanh", scaling=S, bias=True,
                         init=Init.zero_up, placement=BottleneckPlacement(position=Position(position)))
    report = adapter.inject(model)
    randomize_trainable(model)
    sublayers = [m for m in model.modules() if hasattr(m, "bottleneck")]
    if model_type == "bloom" and not parallel:
        # BLOOM adds the residual inside its sublayers: the series adapter sits on the output projection,
        # whose formula the per-linear test checks
        assert sublayers == [] and all(name.endswith(("dense[output]", "dense_4h_to_h[output]"))
                                       for name in report.adapted), report.adapted
        return
    assert len(sublayers) == len(report.adapted) == (4 if position == "both" else 2)
    checked = []

    def check(module, args, kwargs, output):  # runs after the adapter's hook: sees the adapted output
        base = module.forward(*args, **kwargs)  # the sublayer without hooks
        base_h = base[0] if isinstance(base, tuple) else base
        out_h = output[0] if isinstance(output, tuple) else output
        source = (args[0] if args else kwargs["hidden_states"]) if parallel else base_h
        torch.testing.assert_close(out_h, base_h + by_hand(source, module.bottleneck), rtol=1e-5, atol=1e-6)
        checked.append(module)

    for sub in sublayers:
        sub.register_forward_hook(check, with_kwargs=True)
    with torch.no_grad():
        model(**batch(), use_cache=False)
    assert len(checked) == len(sublayers)


def test_llm_adapters_bert_init_is_not_the_identity_and_zero_up_is():
    inputs = batch()
    base = tiny_model("llama")
    with torch.no_grad():
        reference = base(**inputs).logits
    for init, identity in ((Init.bert, False), (Init.zero_up, True)):
        model = tiny_model("llama")
        freeze(model)
        Bottleneck(name="b", rank=8, init=init, bias=False, activation="tanh",
                   placement=BottleneckPlacement(modules=["gate", "up", "down"], position=Position.input,
                                                 position_pattern={"down": Position.output})).inject(model)
        std = model.model.layers[0].mlp.up_proj.adapter.down.weight.std().item()
        with torch.no_grad():
            same = torch.allclose(model(**inputs).logits, reference)
        assert same == identity
        if init == Init.bert:
            assert 0.01 < std < 0.03  # N(0, 0.02)


@pytest.mark.parametrize("placement,key", [
    (BottleneckPlacement(modules=["up"], position=Position.after_mlp), "adapter.placement.modules"),
    (BottleneckPlacement(position=Position.input), "adapter.placement.position"),
    (BottleneckPlacement(modules=["up"], position=Position.input, position_pattern={"up": Position.both}),
     "adapter.placement.position_pattern"),
])
def test_meaningless_positions_are_refused(placement, key):
    with pytest.raises(AdapterConfigError, match=key.replace(".", r"\.")):
        Bottleneck(name="b", placement=placement).validate()


def test_parallel_output_is_refused():
    with pytest.raises(AdapterConfigError, match=r"adapter\.placement\.position=output"):
        Bottleneck(name="b", parallel=True, placement=BottleneckPlacement(modules=["down"],
                                                                         position=Position.output)).validate()


def test_opt_has_no_mlp_sublayer_and_says_so():
    model = tiny_model("opt")
    with pytest.raises(AdapterConfigError, match="'mlp' does not exist in opt"):
        Bottleneck(name="b").inject(model)


