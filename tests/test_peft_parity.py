"""Parity with HF PEFT (test-only dependency): same weights -> same logits (train and eval mode),
same loss, same gradients on the adapter parameters, on tiny LLaMA, OPT and GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from adapters_lab.adapters.base import Placement, freeze  # noqa: E402
from adapters_lab.adapters.ia3 import IA3  # noqa: E402
from adapters_lab.adapters.lora import LoRA  # noqa: E402
from adapters_lab.adapters.prefix import PrefixTuning  # noqa: E402
from adapters_lab.adapters.prompt import PromptInit, PromptTuning  # noqa: E402
from tests.adapter_helpers import batch, randomize_trainable, tiny_model  # noqa: E402

# generic placement words -> the PEFT target_modules they must mean, per architecture
TARGETS = {
    "llama": (["q", "k", "v", "up", "down"], ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], "down_proj"),
    "opt": (["q", "v", "up", "down"], ["q_proj", "v_proj", "fc1", "fc2"], "fc2"),
    "gpt2": (["qkv", "o", "down"], ["c_attn", "attn.c_proj", "mlp.c_proj"], "mlp.c_proj"),
}
N_VIRTUAL = 4


def pair(method: str, model_type: str):
    """(ours, theirs, prompt-learning?) built from one base, with our random adapter weights copied into PEFT's."""
    words, peft_names, ff = TARGETS[model_type]
    base = tiny_model(model_type)
    if method in ("lora", "rslora", "dora"):
        ours_cfg = LoRA(name=method, rank=4, alpha=6.0, dropout=0.0, use_rslora=method == "rslora",
                        use_dora=method == "dora", placement=Placement(modules=words))
        theirs_cfg = peft.LoraConfig(r=4, lora_alpha=6.0, lora_dropout=0.0, target_modules=peft_names,
                                     use_rslora=method == "rslora", use_dora=method == "dora",
                                     fan_in_fan_out=model_type == "gpt2")
    elif method == "ia3":
        ff_word = words[-1]
        ours_cfg = IA3(name="ia3", placement=Placement(modules=words), feedforward_modules=[ff_word])
        theirs_cfg = peft.IA3Config(target_modules=peft_names, feedforward_modules=[ff],
                                    fan_in_fan_out=model_type == "gpt2")
    elif method == "prompt":
        ours_cfg = PromptTuning(name="prompt", num_virtual_tokens=N_VIRTUAL, init=PromptInit.random)
        theirs_cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL)
    else:
        projection = method == "prefix_mlp"
        ours_cfg = PrefixTuning(name=method, num_virtual_tokens=N_VIRTUAL, projection=projection, projection_hidden=10)
        theirs_cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL,
                                             prefix_projection=projection, encoder_hidden_size=10)
    ours = copy.deepcopy(base)
    freeze(ours)
    ours_cfg.validate()
    ours_cfg.inject(ours)
    randomize_trainable(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cfg)
    mapping = _name_map(ours, theirs, method)
    with torch.no_grad():
        for their_name, our_param in mapping.items():
            their_param = dict(theirs.named_parameters())[their_name]
            their_param.copy_(our_param.reshape(their_param.shape))
    return ours, theirs, mapping


def _name_map(ours, theirs, method: str) -> dict[str, torch.nn.Parameter]:
    """PEFT trainable parameter name -> our parameter; every trainable tensor on both sides is paired."""
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    module = "prompt_tuning" if method == "prompt" else "prefix_tuning"
    mapping = {}
    for name, param in theirs.named_parameters():
        if not param.requires_grad:
            continue
        key = name.replace("base_model.model.", "", 1).replace(".default", "")
        key = key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
        key = key.replace("prompt_encoder.", f"{module}.")
        mapping[name] = our_params[key]
    assert sorted(id(p) for p in mapping.values()) == sorted(id(p) for p in our_params.values())
    return mapping


def _logits(model, inputs, prompt_learning: bool):
    logits = model(**inputs).logits
    return logits[:, -inputs["input_ids"].shape[1]:] if prompt_learning else logits


METHODS = ["lora", "rslora", "dora", "ia3", "prompt", "prefix", "prefix_mlp"]


@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_logits_loss_and_grads_match_peft(method, model_type):
    ours, theirs, mapping = pair(method, model_type)
    prompt_learning = method in ("prompt", "prefix", "prefix_mlp")
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours.eval(), inputs, prompt_learning),
                                   _logits(theirs.eval(), inputs, prompt_learning), rtol=1e-5, atol=1e-6)
    ours.train(), theirs.train()
    out_ours, out_theirs = ours(**inputs), theirs(**inputs)
    torch.testing.assert_close(out_ours.logits[:, -inputs["input_ids"].shape[1]:],
                               out_theirs.logits[:, -inputs["input_ids"].shape[1]:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, rtol=1e-5, atol=1e-6)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    their_params = dict(theirs.named_parameters())
    for their_name, our_param in mapping.items():
        their_grad = their_params[their_name].grad
        assert their_grad is not None and our_param.grad is not None, their_name
        torch.testing.assert_close(our_param.grad.reshape(their_grad.shape), their_grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{their_name}: {m}")
