"""One process of ``tests/test_distributed.py``, under the distributed environment it was started
with (WORLD_SIZE, RANK, MASTER_ADDR, ...): ``train`` trains the tiny LoRA model and writes its adapter
weights, loss history and token count to the file named by ``argv[1]``; ``eval`` evaluates the tiny
model on synthetic arithmetic (two sets) and writes its metrics and predictions there; ``term`` trains with
checkpoints beside that file while process 1 alone receives SIGTERM after step 2."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from adapters_lab.config import EvalConfig, TinyModelConfig
from adapters_lab.data.arith import arith_splits
from adapters_lab import evaluate
from adapters_lab.models import build_tiny_model, build_tiny_tokenizer
from adapters_lab.tracking import NullTracker
from tests.train_helpers import run, token_examples, trainable, trainer_cfg

DISTRIBUTED_CASE = dict(max_steps=5, batch_size=8, micro_batch_size=2)  # 4 micro-batches a step; 14 an epoch
EXAMPLES = dict(count=28, seed=3)


def train_case(fused_loss: bool):
    """5 steps on 28 examples (the fourth step is an epoch's last 2 micro-batches), then the loss on 7
    validation examples (micro-batches of 2: shares of 2 and 2 for two processes)."""
    return run(trainer_cfg(**DISTRIBUTED_CASE, fused_loss=fused_loss), token_examples(**EXAMPLES),
               val=token_examples(7, seed=9))


def eval_case(predictions_dir: Path | None, processes: int = 1, rank: int = 0) -> dict:
    """Greedy evaluation of the tiny random model on two sets of arithmetic questions, 9 and 4, of one
    budget (generated together: shares of 7 and 6 for two processes), batches of 2; returns the
    metrics without timings."""
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(), tokenizer, torch.float32, "sdpa")
    records = arith_splits(0, 13, 20, seed=4)[1]
    cfg = EvalConfig(batch_size=2, num_beams=1, max_new_tokens=6)
    metrics = evaluate.evaluate_sets(model, tokenizer, {"arith": records[:9], "gsm8k": records[9:]}, cfg,
                                     torch.device("cpu"), predictions_dir, processes, rank)
    for name in ("arith", "gsm8k"):
        metrics[name].pop("seconds")
        metrics[name].pop("group_seconds")
    return metrics


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "eval":
        accelerator = Accelerator(cpu=True)  # joins the process group
        generated, generate = [], evaluate.generate

        def counting(model, tokenizer, prompts, *args):  # how many prompts this process generates
            generated.append(len(prompts))
            return generate(model, tokenizer, prompts, *args)

        evaluate.generate = counting
        main = accelerator.is_main_process
        metrics = eval_case(out.parent / "predictions" if main else None, accelerator.num_processes,
                            accelerator.process_index)
        torch.save({"metrics": metrics, "generated": generated}, out)
    elif mode == "term":
        class TermOnProcessOne(NullTracker):
            def log(self, metrics, step=None):
                if step == 2 and os.environ["RANK"] == "1":
                    os.kill(os.getpid(), signal.SIGTERM)

        run(trainer_cfg(**DISTRIBUTED_CASE, log_every=1), token_examples(**EXAMPLES), checkpoint_dir=out.parent,
            tracker=TermOnProcessOne())
    else:
        model, result = train_case(fused_loss=mode == "fused")
        torch.save({"weights": trainable(model), "loss": result.loss_history, "tokens": result.tokens,
                    "val_loss": result.val_loss}, out)
