"""Training image-text models: each of the study's four methods (their experiment files) trains a few
steps on tiny_llava and tiny_qwen2vl; the vision tower is bit-identical afterwards; the connector
changes if and only if model.train_connector; prefix tuning on Qwen2-VL and prompt tuning are refused
at config time naming the model and the method."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from adapters_lab.adapters.base import AdapterConfigError, build_adapter, freeze
from adapters_lab.kinds import model_kind
from adapters_lab.models.parts import model_parts
from adapters_lab.tracking import NullTracker
from adapters_lab.training.loop import train
from adapters_lab.training.settings import check_trainer_config, make_accelerator
from tests.conftest import compose_config
from tests.mm_helpers import TINY, build, one_thread, shapes  # noqa: F401  (one_thread: autouse)

METHODS = ("lora", "ia3", "adapter", "prefix")
SMALL = ["trainer.max_steps=3", "trainer.batch_size=4", "trainer.micro_batch_size=2", "trainer.precision=fp32",
         "trainer.device=cpu", "trainer.progress_bar=false", "trainer.eval_every=0", "trainer.checkpoint_every=0",
         "dataset.val_set_size=2", "dataset=shapes"]


def _state(module: torch.nn.Module, skip: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    skipped = {id(p) for p in skip.parameters()} if skip is not None else set()
    return {n: p.detach().clone() for n, p in module.named_parameters() if id(p) not in skipped}


def _run(name: str, method: str, train_connector: bool = True, lr: float = 1e-2):
    cfg = compose_config([f"model={name}", f"experiment=mllm/{method}", f"model.train_connector={train_connector}",
                          *SMALL, f"trainer.lr={lr}", f"trainer.connector_lr={lr}"])
    kind, adapter = model_kind(cfg.model), build_adapter(cfg.adapter)
    kind.check(adapter, cfg)
    model, processor = build(name)
    freeze(model)
    adapter.inject(model, processor.tokenizer)
    described = kind.describe(model, cfg)
    parts = model_parts(model)
    vision = _state(parts.vision_tower, skip=parts.connector)  # Qwen2-VL's merger sits inside its ViT
    in_connector = {id(q) for q in parts.connector.parameters()}
    connector = _state(parts.connector)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()
               if p.requires_grad and id(p) not in in_connector}
    records = shapes(name, 8)
    features = kind.features(records, processor, cfg.dataset, "test")
    trainer = OmegaConf.to_object(cfg.trainer)
    result = train(model, features.examples[:6], features.examples[6:], processor.tokenizer.pad_token_id,
                   check_trainer_config(trainer), make_accelerator(trainer), NullTracker(), 0, **kind.train_options(model, processor, cfg))
    return model, parts, vision, connector, trained, result, described


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_leaves_the_vision_tower_untouched(name, method):
    if name == "tiny_qwen2vl" and method == "prefix":
        with pytest.raises(AdapterConfigError, match=r"model=tiny_qwen2vl adapter=prefix: Qwen2-VL"):
            _run(name, method)
        return
    model, parts, vision, connector, trained, result, described = _run(name, method)
    assert result.steps == 3 and all(math.isfinite(v) for v in result.loss_history) and math.isfinite(result.val_loss)
    after = _state(parts.vision_tower, skip=parts.connector)
    assert vision.keys() == after.keys() and all(torch.equal(vision[n], after[n]) for n in vision)
    now = dict(model.named_parameters())
    assert trained and all(not torch.equal(trained[n], now[n].detach()) for n in trained), "adapter did not train"
    assert any(not torch.equal(connector[n], p.detach()) for n, p in parts.connector.named_parameters())
    assert described["params_by_part"]["vision_tower"]["trainable"] == 0


@pytest.mark.parametrize("name", TINY)
def test_connector_changes_only_when_trained(name):
    _, parts, _, connector, _, _, described = _run(name, "lora", train_connector=False)
    assert all(torch.equal(connector[n], p.detach()) for n, p in parts.connector.named_parameters())
    assert described["params_by_part"]["connector"]["trainable"] == 0


@pytest.mark.parametrize("name", TINY)
def test_prompt_tuning_is_refused_at_config_time(name):
    cfg = compose_config([f"model={name}", "adapter=prompt", "dataset=shapes"])
    with pytest.raises(AdapterConfigError, match=f"model={name} adapter=prompt: prompt tuning"):
        model_kind(cfg.model).check(build_adapter(cfg.adapter), cfg)
