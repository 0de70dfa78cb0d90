"""The spine end to end on the tiny model: results written, honest accuracy, early failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from adapters_lab import pipeline
from adapters_lab.data.arith import arith_splits
from adapters_lab.data.records import DataError
from tests.conftest import REPO, compose_config


def test_run_writes_every_result(make_cfg, tmp_path):
    cfg = make_cfg()
    value = pipeline.run(cfg)
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["params"]["trainable"] > 0
    assert metrics["params"]["total"] > metrics["params"]["trainable"]
    assert metrics["train"]["steps"] == 3
    assert metrics["train"]["loss_final"] > 0
    assert metrics["train"]["tokens_per_second"] > 0
    assert 0.0 <= metrics["eval"]["arith"]["accuracy"] <= 1.0
    assert value == metrics["eval"]["average"]
    lines = [json.loads(x) for x in (out / "predictions" / "arith.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert {"prompt", "output", "prediction", "label", "correct"} <= set(lines[0])
    # Adapter weights alone: every tensor is a LoRA tensor, none of the base model.
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == metrics["params"]["trainable"]
    assert "lr: 0.0003" in (out / "config.yaml").read_text()  # the resolved config


def test_run_types_the_config_once_and_the_evaluator_gets_its_enums(make_cfg, monkeypatch):
    """The composed DictConfig becomes typed objects once, at the top of run: the evaluator gets that
    object's own ``eval`` (an EvalConfig holding enum members, not a DictConfig node nor strings); the
    trainer options are checked once and the device is worked out once."""
    from adapters_lab.config import Config, DecoderKind, EvalConfig, Protocol, Scoring, TrainerConfig
    from adapters_lab.kinds import causal_lm
    from adapters_lab.training import settings

    seen: dict = {"typed": [], "checked": [], "devices": 0, "eval": []}

    def spy(module, name, record):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            record(args, result)
            return result
        monkeypatch.setattr(module, name, wrapper)

    spy(pipeline, "typed_config", lambda args, result: seen["typed"].append(result))
    spy(pipeline, "check_trainer_config", lambda args, result: seen["checked"].append(args[0]))
    spy(settings, "resolve_device", lambda args, result: seen.__setitem__("devices", seen["devices"] + 1))
    spy(causal_lm, "evaluate_sets", lambda args, result: seen["eval"].append(args[3]))
    pipeline.run(make_cfg("eval.protocol=strict", "eval.decoder=transformers"))
    (cfg,) = seen["typed"]
    (eval_cfg,) = seen["eval"]
    assert type(cfg) is Config and eval_cfg is cfg.eval and type(eval_cfg) is EvalConfig
    assert eval_cfg.protocol is Protocol.strict and eval_cfg.scoring is Scoring.generate
    assert eval_cfg.decoder is DecoderKind.transformers
    assert len(seen["checked"]) == 1 and seen["checked"][0] is cfg.trainer and type(cfg.trainer) is TrainerConfig
    assert seen["devices"] == 1


def test_the_converter_takes_strings_at_the_boundary_and_names_a_bad_one():
    from adapters_lab.config import EvalConfig, PromptTemplate, Scoring
    from adapters_lab.typed import ConfigValueError, typed

    converted = typed(EvalConfig(scoring="both", prompt_template="train"), "eval")
    assert converted.scoring is Scoring.both and converted.prompt_template is PromptTemplate.train
    with pytest.raises(ConfigValueError, match=r"^eval.scoring='best': expected one of generate, likelihood, both$"):
        typed(EvalConfig(scoring="best"), "eval")


def test_zero_shot_baseline_trains_nothing(make_cfg, tmp_path):
    pipeline.run(make_cfg("adapter=none"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["params"]["trainable"] == 0
    assert "train" not in metrics
    assert not (tmp_path / "run" / "adapter").exists()
    assert metrics["eval"]["arith"]["n"] == 4


def test_memorising_a_handful_scores_full_marks_only_after_training(make_cfg, tmp_path, monkeypatch):
    """The honest-path check: near 0% before training, 100% on the same examples after it,
    through the real generate-and-parse path (the evaluation set is the training set)."""
    data = ["dataset.arith.num_train=4", "dataset.arith.num_test=1", "dataset.val_set_size=0",
            "eval.max_new_tokens=24"]
    from adapters_lab.kinds import causal_lm  # the causal-LM kind reads the task data for the pipeline

    original = causal_lm.load_task_data

    def train_split_as_eval_set(*args, **kwargs):
        task = original(*args, **kwargs)
        task.eval_sets = {"arith": arith_splits(4, 1, 20, 1234)[0]}
        return task

    monkeypatch.setattr(causal_lm, "load_task_data", train_split_as_eval_set)
    before = make_cfg(*data, "adapter=none")
    pipeline.run(before)
    assert _accuracy(before) <= 0.25

    after = compose_config([*data, "adapter.rank=16", "adapter.dropout=0.0", "trainer.max_steps=150", "trainer.lr=1e-2",
                            "trainer.batch_size=4", "trainer.micro_batch_size=4", "trainer.warmup_steps=5"],
                           output_dir=tmp_path / "after")
    pipeline.run(after)
    assert _accuracy(after) == 1.0


def _accuracy(cfg) -> float:
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["eval"]["arith"]["accuracy"]


def test_missing_eval_file_fails_before_the_model_loads(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "build_model", lambda *_: pytest.fail("model built before data check"))
    cfg = make_cfg(f"paths.data_dir={tmp_path}/nowhere", "dataset.eval_sets=[gsm8k]")
    with pytest.raises(DataError, match=r"dataset.eval_sets\[gsm8k\].*nowhere/dataset/gsm8k/test.json"):
        pipeline.run(cfg)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_rejects_unknown_adapter_and_bad_types():
    bad_adapter = _run_cli("adapter=nope")
    assert bad_adapter.returncode != 0 and "nope" in bad_adapter.stderr
    bad_lr = _run_cli("trainer.lr=abc")
    assert bad_lr.returncode != 0 and "abc" in bad_lr.stderr
    typo = _run_cli("adapter.rnak=4")
    assert typo.returncode != 0 and "rnak" in typo.stderr


def test_cli_composes_paper_model_without_download():
    result = _run_cli("--cfg", "job", "model=llama7b", "adapter=lora")
    assert result.returncode == 0, result.stderr
    assert "hub_id: yahma/llama-7b-hf" in result.stdout


def test_cli_names_missing_training_file(tmp_path):
    result = _run_cli("dataset=math_10k", f"paths.data_root={tmp_path}", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode != 0
    assert "dataset.train=math_10k" in result.stderr and "math_10k.json" in result.stderr
    assert "Traceback" not in result.stderr
