"""Checks before any weight loads: keys no schema declares (``+`` appends), placement on the meta-device
skeleton, attention per architecture, cutoff overflow, a hub model with no network; one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from adapters_lab import pipeline
from adapters_lab.adapters import build_adapter, freeze
from adapters_lab.adapters.base import AdapterConfigError
from adapters_lab.checks import ConfigKeyError, SettingError, check_known_keys
from adapters_lab.data.records import DataError
from tests.conftest import REPO, compose_config


@pytest.fixture
def no_weights(monkeypatch):
    monkeypatch.setattr(pipeline, "build_model", lambda *_: pytest.fail("model weights loaded before the check"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_appended_typo_fails_at_start_in_one_line(tmp_path):
    result = _cli("+adapter.rnak=4", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: adapter.rnak: no such config key (appended with '+'?); "
                                     "did you mean adapter.rank?")
    assert not (tmp_path / "metrics.json").exists()


def test_the_moved_val_set_size_override_fails_at_compose_in_one_line_naming_its_new_key(tmp_path):
    for override in ("trainer.val_set_size=0", "+trainer.val_set_size=0"):
        result = _cli(override, f"hydra.run.dir={tmp_path}")
        assert result.returncode == 2, override
        assert result.stderr.strip() == ("error: trainer.val_set_size: moved to dataset.val_set_size "
                                         "(write dataset.val_set_size=0)"), override
    assert not any(tmp_path.iterdir())  # refused before Hydra composed (no .hydra/ written)
    assert compose_config(["dataset.val_set_size=0"]).dataset.val_set_size == 0
    assert "val_set_size" not in compose_config([]).trainer


def test_an_appended_moved_key_is_named_with_its_new_place(make_cfg, no_weights):
    with pytest.raises(ConfigKeyError, match=r"^trainer.val_set_size: moved to dataset.val_set_size "
                                             r"\(write dataset.val_set_size=7\)$"):
        pipeline.run(make_cfg("+trainer.val_set_size=7"))


@pytest.mark.parametrize("override,message", [
    ("+trainer.lrr=1", r"trainer.lrr: no such config key .*did you mean trainer.lr\?"),
    ("+rnak=4", r"^rnak: no such config key \(appended with '\+'\?\)$"),
    ("+model.tiny.hidden=8", r"model.tiny.hidden: no such config key"),
])
def test_appended_keys_no_schema_declares_are_refused(make_cfg, no_weights, override, message):
    with pytest.raises(ConfigKeyError, match=message):
        pipeline.run(make_cfg(override))


def test_free_form_fields_take_appended_keys():
    cfg = compose_config(["+adapter.rank_pattern.q_proj=4"])
    check_known_keys(cfg)
    assert cfg.adapter.rank_pattern == {"q_proj": 4}


@pytest.mark.parametrize("override,error,message", [
    ("adapter.placement.layers=[7]", AdapterConfigError, r"adapter.placement.layers=\[7\]: layer 7 is out of range 0..2"),
    ("adapter.placement.modules=[nope_proj]", AdapterConfigError, r"'nope_proj' matches no module of llama"),
    ("dataset.cutoff_len=0", SettingError, r"dataset.cutoff_len=0: must be at least 8"),
    ("dataset.cutoff_len=16", DataError, r"20 of 20 prompts reach dataset.cutoff_len=16"),
])
def test_model_dependent_checks_run_before_the_weights(make_cfg, no_weights, override, error, message):
    with pytest.raises(error, match=message):
        pipeline.run(make_cfg(override))


def test_attention_the_architecture_lacks_fails_before_the_weights(make_cfg, no_weights):
    assert compose_config(["model=bloomz7b"]).model.attn_implementation == "eager"
    with pytest.raises(SettingError, match=r"model=bloomz7b \(model.attn_implementation=sdpa\): BloomForCausalLM "
                                           r"does not support .*scaled_dot_product_attention"):
        pipeline.run(make_cfg("model=bloomz7b", "model.init=random", "model.attn_implementation=sdpa"))


def test_hub_model_without_network_is_one_line_naming_it(make_cfg, no_weights):
    with pytest.raises(SettingError, match=r"^model=llama7b: model.hub_id=nobody/no-such-model: cannot read its config "
                                           r"or tokenizer \(.*\); with no network, set model.local_path=") as err:
        pipeline.run(make_cfg("model=llama7b", "model.hub_id=nobody/no-such-model"))
    assert "\n" not in str(err.value)


def test_unknown_logger_backend_fails_at_compose_time(tmp_path):
    result = _cli("logger.backend=mlflow", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "Invalid value 'mlflow', expected one of [none, wandb]" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("model_type,shape", [
    ("gpt2", dict(n_embd=32, n_layer=2, n_head=2)), ("bloom", dict(hidden_size=32, n_layer=2, n_head=2))])
def test_prefix_tuning_is_supported_on_gpt2_and_bloom(model_type, shape):
    config = AutoConfig.for_model(model_type, vocab_size=100, **shape)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    freeze(model)
    build_adapter(compose_config(["adapter=prefix"]).adapter).inject(model, None)
    ids = torch.randint(0, 100, (2, 5))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_million_character_record_among_sixty_is_named_by_its_index(make_cfg, tmp_path, no_weights):
    good = {"instruction": "What is 1 + 1?", "input": "", "output": "1 + 1 = 2. The answer is 2.", "answer": "2"}
    records = [good] * 60
    records[37] = {**good, "instruction": "x " * 500_000}
    path = tmp_path / "train.json"
    path.write_text(__import__("json").dumps(records))
    with pytest.raises(DataError, match=r"1 of 60 prompts reach dataset.cutoff_len=64 .*\(record 37 of the split, in "
                                        r"file order; the longest, record 37, has 1,000,000 characters\)"):
        pipeline.run(make_cfg(f"dataset.train={path}", "dataset.cutoff_len=64", "dataset.val_set_size=0"))


def test_the_disk_probe_checks_the_space_the_run_will_write(make_cfg, monkeypatch, no_weights):
    from collections import namedtuple

    from adapters_lab import checks
    from adapters_lab.files import OutputDirError

    cfg = make_cfg("trainer.keep_checkpoints=2", "export.peft=true")
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.dtype.value if hasattr(cfg.model.dtype, "value")
                                                           else str(cfg.model.dtype)]
    # adapter + 3 checkpoints of weights and two moments + the PEFT copy + the tiny base model + predictions
    assert checks.space_needed(cfg, {"trainable": 1000, "total": 10000}, 10) == (
        1000 * 4 + 3 * 1000 * 12 + 1000 * 4 + 10000 * itemsize + 10 * 4096)
    assert checks.space_needed(make_cfg("adapter=none"), {"trainable": 0, "total": 10000}, 10) == 10 * 4096
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(OutputDirError, match=r"paths.output_dir=.*: the run will write about [0-9.]+ MiB \(adapter, "
                                             r"checkpoints, predictions\), 0.0 MiB free"):
        pipeline.run(cfg)
