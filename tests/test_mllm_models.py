"""Image-text models: parts found by object, placement inside the language model only, per-part
parameter counts by hand, LoRA logits equal to HF PEFT's with a target regex on the language model."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters_lab.adapters.base import Placement, freeze
from adapters_lab.adapters.ia3 import IA3
from adapters_lab.adapters.lora import LoRA
from adapters_lab.models.parts import (
    count_by_part,
    model_parts,
    parameter_groups,
    part_of_parameters,
    set_connector_trainable,
)
from tests.adapter_helpers import randomize_trainable
from tests.mm_helpers import TINY, batch, build, shapes

PARTS = {"tiny_llava": ("LlamaModel", "CLIPVisionModel", "LlavaMultiModalProjector"),
         "tiny_qwen2vl": ("Qwen2VLTextModel", "Qwen2VisionTransformerPretrainedModel", "PatchMerger")}


@pytest.mark.parametrize("name", TINY)
def test_parts_found_by_object(name):
    model, _ = build(name)
    parts = model_parts(model)
    assert tuple(type(p).__name__ for p in (parts.language_model, parts.vision_tower, parts.connector)) == PARTS[name]
    where = part_of_parameters(model)
    assert {"language_model", "vision_tower", "connector", "other"} == set(where.values())


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("modules", [["q_proj", "v_proj"], ["q", "k", "v", "o", "gate", "up", "down"]])
def test_placement_adapts_no_vision_or_connector_module(name, modules):
    model, _ = build(name)
    freeze(model)
    report = LoRA(name="lora", rank=4, alpha=8.0, placement=Placement(modules=modules)).inject(model)
    where = part_of_parameters(model)
    adapted = {n: where[n] for n, p in model.named_parameters() if p.requires_grad}
    layers = model.config.get_text_config().num_hidden_layers
    assert len(report.adapted) == layers * len(modules)
    assert set(adapted.values()) == {"language_model"}
    # the pitfall this avoids: PEFT's suffix list also catches the vision tower's q_proj / v_proj (CLIP)
    if name == "tiny_llava" and modules == ["q_proj", "v_proj"]:
        peft = pytest.importorskip("peft")
        theirs = peft.get_peft_model(build(name)[0], peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        vision_layers = model.config.vision_config.num_hidden_layers
        caught = [n for n, m in theirs.named_modules() if n.endswith(("q_proj", "v_proj")) and hasattr(m, "lora_A")]
        assert len(caught) == 2 * (layers + vision_layers)


def _lora_count(d_in: int, d_out: int, r: int) -> int:
    return r * d_in + d_out * r


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("train_connector", [True, False])
def test_trainable_counts_per_part_match_hand_computation(name, train_connector):
    model, _ = build(name)
    freeze(model)
    LoRA(name="lora", rank=4, placement=Placement(modules=["q", "v"])).inject(model)
    set_connector_trainable(model, train_connector)
    text, vision = model.config.get_text_config(), model.config.vision_config
    head = text.hidden_size // text.num_attention_heads
    lora = text.num_hidden_layers * (_lora_count(text.hidden_size, text.hidden_size, 4)
                                     + _lora_count(text.hidden_size, text.num_key_value_heads * head, 4))
    if name == "tiny_llava":  # Linear(vision -> text) + GELU + Linear(text -> text), biases
        connector = vision.hidden_size * text.hidden_size + text.hidden_size + text.hidden_size**2 + text.hidden_size
    else:  # LayerNorm(embed) then Linear(embed * merge^2 -> same) + GELU + Linear(-> text hidden)
        merged = vision.embed_dim * vision.spatial_merge_size**2
        connector = 2 * vision.embed_dim + merged * merged + merged + merged * text.hidden_size + text.hidden_size
    counts = count_by_part(model)
    assert counts["adapter"]["trainable"] == lora == counts["language_model"]["trainable"]
    assert counts["connector"]["total"] == connector
    assert counts["connector"]["trainable"] == (connector if train_connector else 0)
    assert counts["vision_tower"]["trainable"] == 0
    groups = parameter_groups(model, 1e-3, 2e-5)
    assert [g["name"] for g in groups] == (["adapter", "connector"] if train_connector else ["adapter"])
    assert sum(p.numel() for p in groups[-1]["params"]) == (connector if train_connector else lora)
    assert groups[-1]["lr"] == (2e-5 if train_connector else 1e-3)


LANGUAGE_QV = r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"


def test_lora_logits_match_peft_with_language_model_regex():
    peft = pytest.importorskip("peft")
    base, processor = build("tiny_llava")
    inputs = batch("tiny_llava", processor, shapes("tiny_llava", 3))
    ours = copy.deepcopy(base)
    freeze(ours)
    LoRA(name="lora", rank=4, alpha=6.0, dropout=0.0, placement=Placement(modules=["q", "v"])).inject(ours)
    randomize_trainable(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=6.0, lora_dropout=0.0,
                                                                       target_modules=LANGUAGE_QV))
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    their_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(their_params) == len(our_params) == 4 * base.config.text_config.num_hidden_layers
    with torch.no_grad():
        for name, param in their_params.items():
            param.copy_(our_params[name.replace("base_model.model.", "", 1).replace(".default", "")])
    for mode in ("eval", "train"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        with torch.no_grad():
            torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours(**inputs).logits, base(**inputs).logits)  # the adapter changes the logits


@pytest.mark.parametrize("name", TINY)
def test_ia3_feedforward_on_down_stays_in_language_model(name):
    model, _ = build(name)
    freeze(model)
    IA3(name="ia3", placement=Placement(modules=["k", "v", "down"]), feedforward_modules=["down"]).inject(model)
    where = part_of_parameters(model)
    assert {where[n] for n, p in model.named_parameters() if p.requires_grad} == {"language_model"}
