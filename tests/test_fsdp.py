"""Sharded training (``trainer.distributed=fsdp``, torch's FSDP2 over two gloo CPU processes) computes
what one process computes: every adapter family ends with the weights, losses and validation loss of a
single process taking the step's two micro-batches by gradient accumulation; checkpoints hold the
whole adapter and optimiser state, so a run stopped under two processes resumes under one (and the
reverse) to the uninterrupted run's weights; a whole run (train, then evaluate with the gathered
weights) writes the predictions and metrics of one process; options that cannot run sharded fail
at config time in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adapters_lab.adapters.base import AdapterConfigError
from adapters_lab.adapters.lora import LoRA
from adapters_lab.config import TrainerConfigError
from adapters_lab.training.settings import check_trainer_config
from tests.conftest import FAST, REPO
from tests.fsdp_worker import STOP_AT, StopAt, checkpointed, family_model, train_family
from tests.test_distributed import WORLD, launch
from tests.train_helpers import trainable, trainer_cfg

FAMILIES = ["lora", "dora", "ia3", "adapterh", "adapterp", "parallel", "llm_adapters_series", "prefix", "prompt"]


def workers(tmp_path, *args) -> list[dict]:
    launch([sys.executable, "-m", "tests.fsdp_worker", str(tmp_path / "rank{rank}.pt"), *args])
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


def assert_same_weights(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_sharded_processes_train_what_one_does_with_accumulation(tmp_path, family):
    ranks = workers(tmp_path, "train", family)
    model, single = train_family(family)
    expected = trainable(model)
    for rank in ranks:  # whole (gathered) weights on both processes, not shards
        assert {n: w.shape for n, w in rank["weights"].items()} == {n: w.shape for n, w in expected.items()}
    for name in expected:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
    assert_same_weights(ranks[0]["weights"], expected)
    initial = trainable(family_model(family))
    assert all(not torch.equal(initial[n], w) for n, w in expected.items()), "an adapter tensor did not train"
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(single.loss_history), rtol=1e-5, atol=1e-6)
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"] == pytest.approx(single.val_loss, rel=1e-5)


@pytest.mark.slow
def test_micro_batches_accumulated_in_each_sharded_process_sync_once_per_step(tmp_path):
    # 4 micro-batches a step: 2 per process, the first under no_sync (no reduce-scatter), as under DDP
    ranks = workers(tmp_path, "train", "lora", json.dumps({"batch_size": 8}))
    model, single = train_family("lora", batch_size=8)
    assert_same_weights(ranks[0]["weights"], trainable(model))
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(single.loss_history), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_stopped_under_two_processes_resumes_under_one_and_the_reverse(tmp_path):
    model, uninterrupted = checkpointed(None)
    expected = trainable(model)

    two = tmp_path / "two"
    two.mkdir()
    assert all(r == {"stopped": True} for r in workers(two, "stop"))
    assert json.loads((two / "latest.json").read_text())["step"] == STOP_AT - 2  # the step-2 checkpoint
    saved = load_file(str(two / "step-0000002" / "adapter_model.safetensors"))
    assert {n: t.shape for n, t in saved.items()} == {n: t.shape for n, t in expected.items()}  # whole, not shards
    model, resumed = checkpointed(two)  # one process
    assert resumed.resumed_from_step == 2
    assert_same_weights(trainable(model), expected)
    torch.testing.assert_close(torch.tensor(resumed.loss_history), torch.tensor(uninterrupted.loss_history),
                               rtol=1e-5, atol=1e-6)

    one = tmp_path / "one"
    one.mkdir()
    with pytest.raises(KeyboardInterrupt):
        checkpointed(one, StopAt())
    ranks = workers(one, "resume")
    assert ranks[0]["resumed"] == ranks[1]["resumed"] == 2
    assert_same_weights(ranks[0]["weights"], expected)
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(uninterrupted.loss_history),
                               rtol=1e-5, atol=1e-6)


RUNS = {"text": ["experiment=demo"],  # image-text: LLaVA with its connector trained (an optimiser group of its own)
        "image_text": ["model=tiny_llava", "dataset=shapes", "dataset.shapes.num_train=16", "dataset.shapes.num_test=4",
                       "model.train_connector=true"]}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RUNS))
def test_a_sharded_run_evaluates_and_writes_what_one_process_does(tmp_path, kind):
    common = [sys.executable, "run.py", *RUNS[kind], *FAST, "trainer.distributed=fsdp", "adapter.dropout=0"]
    launch([*common, f"hydra.run.dir={tmp_path}/two/rank{{rank}}"])
    subprocess.run([*common, f"hydra.run.dir={tmp_path}/one"], check=True, capture_output=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    two, one = tmp_path / "two" / "rank0", tmp_path / "one"
    assert not (tmp_path / "two" / "rank1" / "metrics.json").exists()  # process 0 alone writes the results
    assert_same_weights(load_file(str(two / "adapter" / "adapter_model.safetensors")),
                        load_file(str(one / "adapter" / "adapter_model.safetensors")))
    assert sorted((one / "predictions").glob("*.jsonl"))
    for predictions in sorted((one / "predictions").glob("*.jsonl")):
        assert (two / "predictions" / predictions.name).read_text() == predictions.read_text()
    got, expected = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert got["eval"]["average"] == expected["eval"]["average"]
    assert got["train"]["loss_history"] == pytest.approx(expected["train"]["loss_history"], rel=1e-5)


@pytest.mark.parametrize("key, value, named", [("fused_loss", True, "trainer.fused_loss=true"),
                                                ("compile", True, "trainer.compile=true"),
                                                ("precision", "fp16", "trainer.precision=fp16"),
                                                ("batching", "paper_packed", "trainer.batching=paper_packed")])
def test_options_a_sharded_model_cannot_run_fail_at_config_time(key, value, named):
    with pytest.raises(TrainerConfigError, match=f"^{named}: not supported with trainer.distributed=fsdp") as err:
        check_trainer_config(trainer_cfg(distributed="fsdp", **{key: value}))
    assert "\n" not in str(err.value)
    check_trainer_config(trainer_cfg(**{key: value}))  # ddp takes it


def test_the_command_line_refuses_before_any_weight_loads():
    done = subprocess.run([sys.executable, "run.py", "experiment=demo", *FAST, "trainer.distributed=fsdp",
                           "trainer.fused_loss=true", "hydra.run.dir=/nonexistent/never-written"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: trainer.fused_loss=true: not supported with trainer.distributed=fsdp")


class UnshardedFamily(LoRA):
    """A family that declares it cannot train sharded."""

    @classmethod
    def can_shard(cls) -> bool:
        return False


def test_a_family_that_cannot_shard_fails_at_config_time_naming_it():
    adapter = UnshardedFamily(_target_="tests.test_fsdp.UnshardedFamily", name="unsharded_lora")
    with pytest.raises(AdapterConfigError, match=r"^trainer.distributed=fsdp: adapter=unsharded_lora "
                                                 r"\(UnshardedFamily\) does not train on a sharded model") as err:
        adapter.check_training(check_trainer_config(trainer_cfg(distributed="fsdp")).cfg)
    assert "\n" not in str(err.value)
    adapter.check_training(check_trainer_config(trainer_cfg()).cfg)  # ddp: trains
