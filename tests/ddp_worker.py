"""One process of ``tests/test_distributed.py``: trains the tiny LoRA model under the distributed
environment it was started with (WORLD_SIZE, RANK, MASTER_ADDR, ...), then writes its adapter
weights, loss history and token count to the file named by ``argv[1]``."""

from __future__ import annotations

import sys

import torch

from tests.train_helpers import run, token_examples, trainable, trainer_cfg

DISTRIBUTED_CASE = dict(max_steps=5, batch_size=8, micro_batch_size=2)  # 4 micro-batches a step; 14 an epoch
EXAMPLES = dict(count=28, seed=3)


def train_case(fused_loss: bool):
    return run(trainer_cfg(**DISTRIBUTED_CASE, fused_loss=fused_loss), token_examples(**EXAMPLES))


if __name__ == "__main__":
    model, result = train_case(fused_loss=sys.argv[2] == "fused")
    torch.save({"weights": trainable(model), "loss": result.loss_history, "tokens": result.tokens}, sys.argv[1])
