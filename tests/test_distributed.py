"""Data-parallel training and evaluation through accelerate (two CPU processes, gloo) compute what
one process computes: each process takes its share of a step's micro-batches, the adapter gradients
are averaged once per step, and every process ends with the same weights as a single-process run;
each process generates a share of the evaluation sets' prompts, and all of them score every set."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import FAST, REPO
from tests.distributed_worker import eval_case, train_case
from tests.train_helpers import trainable

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], exit_code: int = 0) -> list[str]:
    """Run ``command`` as WORLD processes of one distributed job (the environment ``accelerate
    launch`` sets up, ``{rank}`` in an argument replaced); returns each process's output."""
    port, workers = free_port(), []
    for rank in range(WORLD):
        env = {**os.environ, "WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        workers.append(subprocess.Popen([a.replace("{rank}", str(rank)) for a in command], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    for worker in workers:
        outputs.append(worker.communicate(timeout=240)[0].decode(errors="replace"))
        assert worker.returncode == exit_code, outputs[-1][-3000:]
    return outputs


def run_workers(tmp_path, mode: str, exit_code: int = 0) -> list[dict]:
    """WORLD processes of tests/distributed_worker.py in ``mode``; returns what each wrote."""
    launch([sys.executable, "-m", "tests.distributed_worker", str(tmp_path / "rank{rank}.pt"), mode], exit_code)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)] if exit_code == 0 else []


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["plain", "fused"])
def test_two_processes_train_the_same_weights_as_one(tmp_path, loss):
    ranks = run_workers(tmp_path, loss)
    model, single = train_case(fused_loss=loss == "fused")
    for name, weight in trainable(model).items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name  # gradients were synchronised
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(single.loss_history), rtol=1e-5, atol=1e-6)
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == single.tokens  # every process counts the step's tokens
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"]  # summed over both shares
    assert ranks[0]["val_loss"] == pytest.approx(single.val_loss, rel=1e-5)


@pytest.mark.slow
def test_two_processes_evaluate_what_one_does(tmp_path):
    (tmp_path / "two").mkdir()
    ranks = run_workers(tmp_path / "two", "eval")
    assert [r["generated"] for r in ranks] == [[7], [6]]  # each process generates its share of both sets' 13
    single = eval_case(tmp_path / "one" / "predictions")
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == single  # every process scores the whole sets
    for name, count in (("arith", 9), ("gsm8k", 4)):
        two = (tmp_path / "two" / "predictions" / f"{name}.jsonl").read_text()
        assert two == (tmp_path / "one" / "predictions" / f"{name}.jsonl").read_text()  # same texts, same order
        assert len(two.splitlines()) == count


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_checkpoint(tmp_path):
    run_workers(tmp_path, "term", exit_code=128 + signal.SIGTERM)  # neither process is left waiting for the other
    # process 1's signal (after step 2) reaches process 0 with step 3's sums: both stop after step 3
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 3


@pytest.mark.slow
def test_processes_share_process_zeros_run_folder(tmp_path):
    # Each process resolves its own run folder (here: one per rank); all of them use process 0's.
    command = [sys.executable, "run.py", "experiment=demo", *FAST, f"hydra.run.dir={tmp_path}/rank{{rank}}"]
    launch(command)
    assert (tmp_path / "rank0" / "metrics.json").is_file() and (tmp_path / "rank0" / "checkpoints").is_dir()
    assert not (tmp_path / "rank1" / "metrics.json").exists() and not (tmp_path / "rank1" / "checkpoints").exists()
    # Run again: every process sees the finished run in process 0's folder (else one would train alone)
    assert all("skipping this finished run" in output for output in launch(command))


def test_each_process_takes_every_world_th_micro_batch_and_none_goes_empty():
    from adapters_lab.training.step import shard

    assert [shard([0, 1, 2, 3], 2, r) for r in range(2)] == [[0, 2], [1, 3]]
    assert [shard([0, 1, 2], 2, r) for r in range(2)] == [[0, 2], [1]]
    assert [shard([7], 3, r) for r in range(3)] == [[7], [7], [7]]  # an epoch's last, short step
    assert shard([0, 1, 2], 1, 0) == [0, 1, 2]
