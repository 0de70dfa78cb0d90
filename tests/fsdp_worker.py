"""One process of ``tests/test_fsdp.py`` (started by ``tests/test_distributed.py``'s ``launch``):
``train <family> [<trainer overrides as JSON>]`` trains the tiny LLaMA with that adapter family under
``trainer.distributed=fsdp`` and writes its adapter weights and loss history to ``argv[1]``; ``stop`` trains LoRA with
checkpoints beside that file and is interrupted during step 4 (after the step-2 checkpoint);
``resume`` continues from the checkpoints there."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from adapters_lab.adapters.base import freeze
from adapters_lab.adapters.registry import adapter_from_file
from tests.adapter_helpers import randomize_trainable, tiny_model
from tests.train_helpers import run, token_examples, trainable, trainer_cfg

# 2 micro-batches a step (one per process under two), dropout off in every family; 18 examples: 9 micro-batches
# an epoch, so step 5 is an epoch's last, a single micro-batch (each of two processes takes it)
CASE = dict(max_steps=5, batch_size=4, micro_batch_size=2, distributed="fsdp", log_every=1)
EXAMPLES = dict(count=18, seed=3)
VAL = dict(count=5, seed=9)  # 3 micro-batches: shares of 2 and 1
NO_DROPOUT = {"lora": {"dropout": 0.0, "rank": 4}, "dora": {"dropout": 0.0, "rank": 4}, "prompt": {"init": "random"}}
STOP_AT = 4


class StopAt:
    def log(self, metrics, step=None):
        if step == STOP_AT:
            raise KeyboardInterrupt


def family_model(family: str, seed: int = 0) -> nn.Module:
    """The tiny float32 LLaMA (odd sizes) with ``conf/adapter/<family>.yaml`` injected, every adapter
    tensor moved off its init so that each one gets a gradient from the first step."""
    model = tiny_model("llama", seed).train()
    freeze(model)
    adapter_from_file(family, NO_DROPOUT.get(family, {})).inject(model)
    randomize_trainable(model, seed + 1)
    return model


def train_family(family: str, **overrides):
    """(model, result) of the family's case, in this process (one process: accumulation 2)."""
    cfg = trainer_cfg(**{**CASE, **overrides})
    return run(cfg, token_examples(**EXAMPLES), model=family_model(family), val=token_examples(**VAL))


def checkpointed(directory: Path, tracker=None):
    return run(trainer_cfg(**CASE, checkpoint_every=2), token_examples(**EXAMPLES), model=family_model("lora"),
               checkpoint_dir=directory, tracker=tracker, val=token_examples(**VAL))


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "train":
        model, result = train_family(sys.argv[3], **json.loads(sys.argv[4] if len(sys.argv) > 4 else "{}"))
        torch.save({"weights": trainable(model), "loss": result.loss_history, "val_loss": result.val_loss}, out)
    elif mode == "stop":
        try:
            checkpointed(out.parent, StopAt())
        except KeyboardInterrupt:
            torch.save({"stopped": True}, out)
    else:
        model, result = checkpointed(out.parent)
        torch.save({"weights": trainable(model), "loss": result.loss_history, "resumed": result.resumed_from_step},
                   out)
