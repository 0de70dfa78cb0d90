"""The placement language: generic names per architecture, layers / exclude_layers / ranges,
raw suffixes and regex, rank_pattern; and every bad placement fails before training, naming the key."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.errors import ConfigCompositionException

from adapters_lab.adapters import build_adapter, freeze
from adapters_lab.adapters.base import AdapterConfigError, LayerPlacement, Placement
from adapters_lab.adapters.ia3 import IA3
from adapters_lab.adapters.lora import LoRA, LoRALinear
from adapters_lab.adapters.placement import select_modules
from adapters_lab.adapters.prefix import PrefixTuning
from tests.adapter_helpers import TINY, batch, tiny_model

# generic word -> the module-name ending it must select, per architecture (transformers' own names)
EXPECTED = {
    "llama": {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj",
              "up": "mlp.up_proj", "down": "mlp.down_proj", "attn": "self_attn", "mlp": "mlp"},
    "opt": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"},
    "gptj": {"q": "attn.q_proj", "v": "attn.v_proj", "o": "attn.out_proj", "up": "mlp.fc_in", "down": "mlp.fc_out"},
    "gpt2": {"q": "attn.c_attn", "qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "bloom": {"k": "self_attention.query_key_value", "o": "self_attention.dense", "up": "mlp.dense_h_to_4h",
              "down": "mlp.dense_4h_to_h"},
    "gpt_neox": {"v": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
                 "down": "mlp.dense_4h_to_h"},
}
EXPECTED["mistral"] = EXPECTED["qwen2"] = EXPECTED["llama"]


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_generic_names_map_per_architecture_and_lora_runs(model_type):
    model = tiny_model(model_type)
    for word, suffix in EXPECTED[model_type].items():
        targets = select_modules(model, Placement(modules=[word]))
        assert [t.layer for t in targets] == [0, 1]
        assert all(t.name.endswith("." + suffix) for t in targets), (word, [t.name for t in targets])
    freeze(model)
    report = LoRA(name="lora", rank=2, placement=Placement(modules=["q", "down"])).inject(model)
    assert len(report.adapted) == 4  # q (the fused qkv where there is one) and down, in both layers
    assert torch.isfinite(model(**batch()).loss)


def test_layers_ranges_exclusions_suffixes_and_regex():
    model = tiny_model("llama")
    assert [t.layer for t in select_modules(model, Placement(modules=["q"], layers="1:"))] == [1]
    assert [t.layer for t in select_modules(model, Placement(modules=["q"], layers=[0, 1], exclude_layers=[0]))] == [1]
    suffix = select_modules(model, Placement(modules=["k_proj"], layers=0))
    assert [t.name for t in suffix] == ["model.layers.0.self_attn.k_proj"]
    regex = select_modules(model, Placement(regex=r".*\.1\.mlp\.(up|down)_proj"))
    assert sorted(t.name for t in regex) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]


def test_rank_pattern_sets_rank_per_module():
    model = tiny_model("llama")
    freeze(model)
    LoRA(name="lora", rank=2, rank_pattern={"down": 5, r".*layers\.0\.self_attn\.q_proj": 3},
         placement=Placement(modules=["q", "down"])).inject(model)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert ranks == {"model.layers.0.self_attn.q_proj": 3, "model.layers.1.self_attn.q_proj": 2,
                     "model.layers.0.mlp.down_proj": 5, "model.layers.1.mlp.down_proj": 5}


@pytest.mark.parametrize("adapter,key", [
    (LoRA(name="lora", placement=Placement(modules=["nonexistent_proj"])), r"adapter\.placement\.modules"),
    (LoRA(name="lora", placement=Placement(modules=["q"], layers=[5])), r"adapter\.placement\.layers=\[5\]"),
    (LoRA(name="lora", placement=Placement(modules=["q"], exclude_layers=[9])), r"adapter\.placement\.exclude_layers"),
    (LoRA(name="lora", placement=Placement(regex="nothing.*")), r"adapter\.placement\.regex"),
    (LoRA(name="lora", placement=Placement(modules=["attn"])), r"adapter\.placement\.modules.*linear layers only"),
    (IA3(name="ia3", placement=Placement(modules=["mlp"]), feedforward_modules=[]), r"ia3 adapts linear layers only"),
    (IA3(name="ia3", placement=Placement(modules=["k"]), feedforward_modules=["down"]),
     r"adapter\.feedforward_modules"),
    (LoRA(name="lora", rank_pattern={"gate": 4}, placement=Placement(modules=["q"])), r"adapter\.rank_pattern\.gate"),
])
def test_bad_placements_name_the_key(adapter, key):
    with pytest.raises(AdapterConfigError, match=key):
        adapter.validate()
        adapter.inject(tiny_model("llama"))


@pytest.mark.parametrize("adapter,key", [
    (LoRA(name="lora", rank=0), r"adapter\.rank=0"),
    (LoRA(name="lora", rank_pattern={"q": -1}), r"adapter\.rank_pattern\.q=-1"),
    (LoRA(name="lora", dropout=1.0), r"adapter\.dropout"),
    (PrefixTuning(name="prefix", placement=LayerPlacement(layers="0:1")), r"adapter\.placement\.layers"),
])
def test_bad_options_fail_before_any_model(adapter, key):
    with pytest.raises(AdapterConfigError, match=key):
        adapter.validate()


def test_generic_name_on_an_unmapped_architecture_lists_the_modules():
    model = tiny_model("llama")
    model.config.model_type = "unmapped_arch"
    with pytest.raises(AdapterConfigError, match=r"'unmapped_arch' has none.*q_proj"):
        select_modules(model, Placement(modules=["q"]))
    # raw names still work there
    assert len(select_modules(model, Placement(modules=["q_proj"]))) == 2


def test_fused_qkv_architectures_have_no_gate():
    with pytest.raises(AdapterConfigError, match="'gate' does not exist in gpt2"):
        select_modules(tiny_model("gpt2"), Placement(modules=["gate"]))


@pytest.mark.parametrize("overrides", [
    ["adapter=lora", "adapter.placement.position=input"],  # LoRA has no position
    ["adapter=lora", "adapter.placement.modlues=[q]"],  # a typo
    ["adapter=prompt", "adapter.placement.layers=all"],  # prompt tuning has no placement
    ["adapter=series", "adapter.placement.position=sideways"],
    ["adapter=ia3", "adapter.rank=4"],  # IA3 has no capacity word
])
def test_meaningless_keys_fail_at_compose_time(make_cfg, overrides):
    with pytest.raises(ConfigCompositionException):
        make_cfg(*overrides)


def test_bad_rank_from_the_command_line_names_the_key(make_cfg):
    with pytest.raises(AdapterConfigError, match=r"adapter\.rank=-2"):
        build_adapter(make_cfg("adapter=series", "adapter.rank=-2").adapter)


def test_multimodal_placement_stays_in_the_language_model():
    """A LLaVA-style model: even a raw name its vision tower also has (``q_proj``) adapts only the decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        text_config=LlamaConfig(hidden_size=48, intermediate_size=76, num_hidden_layers=2, num_attention_heads=3,
                                num_key_value_heads=1, vocab_size=97),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=28, patch_size=14, projection_dim=32),
        image_token_index=96)
    model = LlavaForConditionalGeneration(config)
    freeze(model)
    for words in (["q_proj"], ["q", "down"]):
        report = LoRA(name="lora", rank=2, placement=Placement(modules=words)).inject(copy.deepcopy(model))
        assert report.adapted and all(".language_model.layers." in name for name in report.adapted), report.adapted
