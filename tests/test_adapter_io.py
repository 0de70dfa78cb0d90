"""Adapter-only save/load reproduces outputs exactly; LoRA/DoRA/IA3/prompt exports load in HF PEFT
(``PeftModel.from_pretrained``) with the same logits; a run with ``export.peft`` and
``export.merged`` leaves base_model/, adapter/, peft_adapter/ and merged_model/ that agree."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters_lab.adapters import AdapterConfigError, build_adapter, freeze
from adapters_lab.adapters.io import check_export, export_peft, load_adapter, save_adapter
from adapters_lab.pipeline import run
from tests.adapter_helpers import batch, randomize_trainable, tiny_model

peft = pytest.importorskip("peft")


def trained(make_cfg, name: str, model_type: str = "llama", *overrides: str):
    adapter = build_adapter(make_cfg(f"adapter={name}", *overrides).adapter)
    base = tiny_model(model_type)
    model = copy.deepcopy(base)
    freeze(model)
    adapter.inject(model)
    randomize_trainable(model)
    return adapter, base, model.eval()


@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "series", "llm_adapters_series", "prefix", "prompt"])
def test_save_then_load_reproduces_logits(make_cfg, tmp_path, name):
    adapter, base, model = trained(make_cfg, name, "llama", "adapter.init=random") if name == "prompt" else \
        trained(make_cfg, name)
    save_adapter(model, adapter, tmp_path / "adapter", base_model="tiny")
    fresh = copy.deepcopy(base)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert type(loaded) is type(adapter)
    inputs = batch()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "prompt"])
def test_peft_export_loads_in_peft_with_the_same_logits(make_cfg, tmp_path, name, model_type):
    overrides = {"prompt": ["adapter.init=random"],
                 "ia3": ["adapter.placement.modules=[qkv,down]"] if model_type == "gpt2" else [],
                 "lora": ["adapter.placement.modules=[qkv,up,down]", "+adapter.rank_pattern.down=3"]
                 if model_type == "gpt2" else ["+adapter.rank_pattern.down=3"],
                 "dora": ["adapter.placement.modules=[qkv,o]"] if model_type == "gpt2" else []}[name]
    adapter, base, model = trained(make_cfg, name, model_type, *overrides)
    export_peft(model, adapter, tmp_path / "peft_adapter", base_model="tiny")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft_adapter")).eval()
    inputs = batch()
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits[:, -length:], model(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_exports_the_method_lacks_fail_before_any_weights(make_cfg):
    with pytest.raises(AdapterConfigError, match=r"export\.peft=true: adapter=series"):
        check_export(build_adapter(make_cfg("adapter=series").adapter), peft=True, merged=False)
    with pytest.raises(AdapterConfigError, match=r"export\.merged=true: adapter=prompt"):
        check_export(build_adapter(make_cfg("adapter=prompt").adapter), peft=False, merged=True)


def test_run_writes_base_adapter_peft_and_merged_outputs_that_agree(make_cfg, tmp_path):
    cfg = make_cfg("adapter=dora", "export.peft=true", "export.merged=true", "eval.limit=1")
    run(cfg)
    out = tmp_path / "run"
    for folder in ("base_model", "adapter", "peft_adapter", "merged_model"):
        assert (out / folder).is_dir(), folder
    base = AutoModelForCausalLM.from_pretrained(out / "base_model").eval()
    ours = copy.deepcopy(base)
    load_adapter(ours, out / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out / "peft_adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged_model").eval()
    ids = torch.randint(4, base.config.vocab_size, (2, 9))
    with torch.no_grad():
        reference = ours.eval()(input_ids=ids).logits
        assert not torch.allclose(reference, base(input_ids=ids).logits)  # training changed something
        torch.testing.assert_close(theirs(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5)
