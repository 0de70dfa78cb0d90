"""The adapter registry and interface: each ``conf/adapter`` file names its class once and composes to
the registered class; what a method can do after training (merge, HF PEFT export, virtual tokens) is
said by the method itself, and what it cannot do fails in one line naming the key."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch.nn as nn
from omegaconf import OmegaConf

from adapters_lab.adapters import AdapterConfigError, build_adapter, freeze, virtual_tokens
from adapters_lab.adapters.base import Adapter
from adapters_lab.adapters.io import load_adapter, save_adapter
from adapters_lab.adapters.registry import ADAPTERS, adapter_class, adapter_from_file, register_adapter, target
from tests.adapter_helpers import tiny_model
from tests.conftest import CONF_DIR

NAMES = sorted(p.stem for p in (CONF_DIR / "adapter").glob("*.yaml"))


def schema_class(name: str) -> type:
    """The class a ``conf/adapter`` file's defaults list names: its schema entry, or its parent file's."""
    raw = OmegaConf.load(CONF_DIR / "adapter" / f"{name}.yaml")
    assert "_target_" not in raw, f"{name}.yaml: the class comes from its schema entry"
    parents = [str(e) for e in raw.defaults if str(e) != "_self_"]
    assert len(parents) == 1, f"{name}.yaml: one schema or parent file, got {parents}"
    if parents[0].startswith("/schema/adapter/"):
        return ADAPTERS[parents[0].removeprefix("/schema/adapter/").split("@")[0]]
    return schema_class(parents[0])


@pytest.mark.parametrize("name", NAMES)
def test_each_adapter_file_names_its_class_once_and_composes_to_it(make_cfg, name):
    cls = schema_class(name)
    composed = make_cfg(f"adapter={name}").adapter
    assert composed._target_ == target(cls)
    adapter = build_adapter(composed)
    assert type(adapter) is cls
    assert adapter_from_file(name) == adapter  # the scripts' path agrees


def test_what_each_family_can_do_after_training():
    assert {n for n, c in ADAPTERS.items() if c.can_merge()} == {"LoRA", "IA3"}
    assert {n for n, c in ADAPTERS.items() if c.can_export_peft()} == {"LoRA", "IA3", "PromptTuning"}


@pytest.mark.parametrize("name,method", [("series", "peft_export"), ("prompt", "merge"), ("prefix", "merge"),
                                         ("prefix", "peft_export"), ("none", "merge")])
def test_an_export_the_method_lacks_fails_in_one_line(make_cfg, name, method):
    adapter = build_adapter(make_cfg(f"adapter={name}").adapter)
    key = "export.peft" if method == "peft_export" else "export.merged"
    with pytest.raises(AdapterConfigError, match=rf"^{key}=true: adapter={name} [^\n]*$"):
        getattr(adapter, method)(tiny_model("llama"))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"])
def test_virtual_tokens_are_what_the_injected_model_holds(make_cfg, name):
    overrides = ["adapter.init=random"] if name == "prompt" else []
    adapter = build_adapter(make_cfg(f"adapter={name}", *overrides).adapter)
    model = tiny_model("llama")
    freeze(model)
    adapter.inject(model)
    assert virtual_tokens.count(model) == adapter.virtual_tokens
    assert (adapter.virtual_tokens > 0) == (name in ("prompt", "prefix"))


def test_register_adapter_refuses_non_adapters_and_a_second_class_of_one_name():
    with pytest.raises(TypeError, match="not an Adapter subclass"):
        register_adapter(nn.Linear)

    @dataclass
    class LoRA(Adapter):  # same name as the registered family, another class
        pass

    with pytest.raises(ValueError, match="LoRA is already registered as adapters_lab.adapters.lora.LoRA"):
        register_adapter(LoRA)
    assert register_adapter(ADAPTERS["LoRA"]) is ADAPTERS["LoRA"]  # registering the same class again is a no-op


def test_a_saved_adapter_of_an_unknown_class_fails_naming_it(make_cfg, tmp_path):
    adapter = build_adapter(make_cfg("adapter=lora").adapter)
    model = tiny_model("llama")
    freeze(model)
    adapter.inject(model)
    save_adapter(model, adapter, tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(config.read_text().replace("adapters_lab.adapters.lora.LoRA", "somewhere.Else"))
    with pytest.raises(AdapterConfigError, match=r"adapter\._target_='somewhere\.Else': not a registered"):
        load_adapter(tiny_model("llama"), tmp_path)
    assert adapter_class("adapters_lab.adapters.lora.LoRA") is adapter_class("LoRA")
