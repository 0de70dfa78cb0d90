"""Data-parallel training through accelerate (two CPU processes, gloo) computes what one process
computes: each process takes its share of a step's micro-batches, the adapter gradients are
averaged once per step, and every process ends with the same weights as a single-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.ddp_worker import train_case
from tests.train_helpers import trainable

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["plain", "fused"])
def test_two_processes_train_the_same_weights_as_one(tmp_path, loss):
    port = free_port()
    workers = []
    for rank in range(WORLD):
        env = {**os.environ, "WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        workers.append(subprocess.Popen([sys.executable, "-m", "tests.ddp_worker", str(tmp_path / f"rank{rank}.pt"),
                                         loss], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for worker in workers:
        output = worker.communicate(timeout=240)[0].decode(errors="replace")
        assert worker.returncode == 0, output[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    model, single = train_case(fused_loss=loss == "fused")
    for name, weight in trainable(model).items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name  # gradients were synchronised
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(single.loss_history), rtol=1e-5, atol=1e-6)
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == single.tokens  # every process counts the step's tokens


def test_each_process_takes_every_world_th_micro_batch_and_none_goes_empty():
    from adapters_lab.train import shard

    assert [shard([0, 1, 2, 3], 2, r) for r in range(2)] == [[0, 2], [1, 3]]
    assert [shard([0, 1, 2], 2, r) for r in range(2)] == [[0, 2], [1]]
    assert [shard([7], 3, r) for r in range(3)] == [[7], [7], [7]]  # an epoch's last, short step
    assert shard([0, 1, 2], 1, 0) == [0, 1, 2]
