"""Properties every method in ``conf/adapter`` must have, on the real configs and the tiny LLaMA:
the base is frozen and unchanged by an optimiser step, only adapter tensors get gradients,
identity-at-init methods leave the logits unchanged at step 0, and merged equals unmerged."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from adapters_lab.adapters import build_adapter, freeze
from adapters_lab.adapters.bottleneck import Bottleneck, Init
from adapters_lab.adapters.ia3 import IA3
from adapters_lab.adapters.lora import LoRA
from adapters_lab.models import build_model
from tests.adapter_helpers import randomize_trainable

CONF = Path(__file__).resolve().parents[1] / "conf" / "adapter"
TRAINING = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "none")


_BASES: dict = {}


def base_model(model_cfg):
    """The composed model (tiny_llama), built once per session: every test copies it."""
    if model_cfg.name not in _BASES:
        model, tokenizer = build_model(model_cfg)
        freeze(model)
        _BASES[model_cfg.name] = model, tokenizer
    return _BASES[model_cfg.name]


def setup(make_cfg, name: str, wanted=lambda adapter: True):
    cfg = make_cfg(f"adapter={name}")
    adapter = build_adapter(cfg.adapter)
    if not wanted(adapter):
        pytest.skip(f"{name}: property does not apply")
    base, tokenizer = base_model(cfg.model)
    model = copy.deepcopy(base)
    adapter.inject(model, tokenizer)
    enc = tokenizer(["Tom has 3 apples and buys 4.", "What is 2 + 2?"], return_tensors="pt", padding=True)
    inputs = {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    return adapter, model, base, inputs


def identity_at_init(adapter) -> bool:
    return isinstance(adapter, (LoRA, IA3)) or (isinstance(adapter, Bottleneck) and adapter.init == Init.zero_up)


@pytest.mark.parametrize("name", TRAINING)
def test_only_adapter_tensors_train_and_the_base_never_moves(make_cfg, name):
    adapter, model, base, inputs = setup(make_cfg, name)
    base_names = {n for n, _ in base.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, f"{name}: nothing to train"
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # every frozen tensor is a base tensor (renamed at most by a wrapper's ``base_layer``)
    assert {n.replace(".base_layer", "") for n in frozen_before} == base_names
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**inputs).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    optimizer.step()
    params = dict(model.named_parameters())
    for n, before in frozen_before.items():
        assert torch.equal(params[n], before), f"{name}: base tensor {n} changed"
    assert any(not torch.equal(params[n], b) for n, b in trainable_before.items()), f"{name}: no adapter tensor moved"


@pytest.mark.parametrize("name", TRAINING)
def test_identity_at_init_where_the_method_says_so(make_cfg, name):
    # not the identity at step 0 by design: prompt/prefix tokens, LLM-Adapters' bert init
    adapter, model, base, inputs = setup(make_cfg, name, identity_at_init)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", TRAINING)
def test_merged_equals_unmerged(make_cfg, name):
    # bottleneck, prompt and prefix add computation that is no weight change: nothing to merge
    adapter, model, base, inputs = setup(make_cfg, name, lambda a: a.can_merge())
    randomize_trainable(model)
    model.eval()
    with torch.no_grad():
        unmerged = model(**inputs).logits
        adapter.merge(model)
        merged = model(**inputs).logits
    assert not any(p.requires_grad for p in model.parameters())
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in base.named_parameters()}
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
