"""Data-parallel (DDP) and sharded (FSDP) training on the GPUs of one machine, on the paper's shapes.

    python scripts/bench_distributed.py --out outputs/bench_distributed.json        # a machine with 2 GPUs
    python scripts/bench_distributed.py --tiny --out /tmp/bench_distributed.json    # CPU, tiny shapes (tests)

Four legs, each its own ``torchrun --standalone --nproc_per_node N`` job running the trainer
(``training/loop.py:train``) on the random-init model (``model.init=random``: the shape's FLOPs and
memory, random weights), LoRA r=32 alpha=64 on q, k, v, up, down, with dropout 0 so that runs over
different process counts take the same steps (a process draws its own dropout masks). Every leg takes
optimiser steps of 8 examples in micro-batches of 4 (``--steps``, default 50; lr 3e-4, warm-up 10, bf16)
on the same examples, random token ids of the ``math_data.json`` lengths (``scripts/math_data_lengths.json``):

- ``ddp_7b_1gpu``: LLaMA-7B, one process, gradient accumulation 2;
- ``ddp_7b_2gpu``: LLaMA-7B, two processes, one micro-batch each per step;
- ``ddp_13b_2gpu`` and ``fsdp_13b_2gpu``: LLaMA-13B over two processes, whole model on each GPU or
  sharded (``trainer.distributed=fsdp``).

Reported: real tokens/s over all processes after the first steps (the trainer's steady rate), peak
allocated GPU memory while training on each process, the per-step loss. The comparisons: 2 GPUs'
speed-up over 1 on 7B and the largest per-step loss difference between the two 7B legs (the same
steps, so only rounding); FSDP against DDP on 13B: speed, memory per GPU, loss difference.
``--tiny`` runs the same legs on CPU (gloo) with tiny shapes in fp32, where the loss curves agree
to rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

LEGS = {"ddp_7b_1gpu": ("llama7b", 1, "ddp"), "ddp_7b_2gpu": ("llama7b", 2, "ddp"),
        "ddp_13b_2gpu": ("llama13b", 2, "ddp"), "fsdp_13b_2gpu": ("llama13b", 2, "fsdp")}
BATCH, MICRO = 8, 4
TINY_ARCH = {"llama7b": ["model.arch.hidden_size=64", "model.arch.intermediate_size=96",
                         "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4"],
             "llama13b": ["model.arch.hidden_size=80", "model.arch.intermediate_size=136",
                          "model.arch.num_hidden_layers=3", "model.arch.num_attention_heads=5"]}
TINY = ["model.arch.vocab_size=509", "model.dtype=float32", "trainer.device=cpu", "trainer.precision=fp32",
        "dataset.cutoff_len=64"]


def compose(leg: str, steps: int, tiny: bool):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from adapters_lab.config import register_configs

    shape, _, distributed = LEGS[leg]
    register_configs()
    sizes = ["trainer.micro_batch_size=2", "trainer.batch_size=4", *TINY_ARCH[shape], *TINY] if tiny else \
        [f"trainer.micro_batch_size={MICRO}", f"trainer.batch_size={BATCH}", "trainer.precision=bf16"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[
            f"model={shape}", "model.init=random", "adapter=lora", "adapter.dropout=0", f"trainer.max_steps={steps}",
            "trainer.lr=3e-4", "trainer.warmup_steps=10", "trainer.log_every=1", "trainer.eval_every=0",
            "trainer.checkpoint_every=0", "trainer.progress_bar=false", f"trainer.distributed={distributed}",
            "logger=none", "paths.output_dir=unused", *sizes])


def child(leg: str, steps: int, tiny: bool, out: Path) -> None:
    """One process of a leg: build, train, write this process's figures to ``out``.rank<N>.json."""
    from bench_table import build, synthetic_examples
    from transformers import set_seed

    from adapters_lab.tracking import NullTracker
    from adapters_lab.training.loop import train
    from adapters_lab.training.settings import check_trainer_config, close_process_group, make_accelerator

    cfg = compose(leg, steps, tiny)
    accelerator = make_accelerator(cfg.trainer)
    settings = check_trainer_config(cfg.trainer)
    set_seed(cfg.seed)  # the same random weights in every process, as pipeline.run_in (FSDP shards each one's own)
    adapter, model, tokenizer, params = build(cfg, accelerator.device)
    adapter.check_training(settings.cfg)
    examples = synthetic_examples(steps * cfg.trainer.batch_size + 16, cfg.model.arch.vocab_size,
                                  tokenizer.bos_token_id or 1, cfg.dataset.cutoff_len, seed=0)
    result = train(model, examples, [], tokenizer.pad_token_id, settings, accelerator, NullTracker(), cfg.seed)
    figures = {"leg": leg, "processes": accelerator.num_processes, "rank": accelerator.process_index,
               "distributed": settings.cfg.distributed.value, "steps": result.steps, "tokens": result.tokens,
               "tokens_per_second": result.steady_tokens_per_second, "peak_memory_gib": result.peak_memory_gib,
               "loss_history": result.loss_history, "trainable": params["trainable"], "total": params["total"]}
    Path(f"{out}.rank{accelerator.process_index}.json").write_text(json.dumps(figures))
    close_process_group()


def run_leg(leg: str, steps: int, tiny: bool, folder: Path) -> dict:
    """``torchrun`` the leg; returns process 0's figures with every process's peak memory."""
    processes = LEGS[leg][1]
    out = folder / leg
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"OMP_NUM_THREADS": "1"} if tiny else {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(Path(__file__).resolve()), "--child", leg, "--steps", str(steps), "--child-out", str(out),
               *(["--tiny"] if tiny else [])]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"leg {leg} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(processes)]
    return {**ranks[0], "peak_memory_gib_per_process": [r["peak_memory_gib"] for r in ranks]}


def loss_gap(a: dict, b: dict) -> float:
    return max(abs(x - y) for x, y in zip(a["loss_history"], b["loss_history"], strict=True))


def compare(legs: dict) -> dict:
    out = {}
    if {"ddp_7b_1gpu", "ddp_7b_2gpu"} <= set(legs):
        one, two = legs["ddp_7b_1gpu"], legs["ddp_7b_2gpu"]
        out["ddp_7b"] = {"speedup_2_over_1": two["tokens_per_second"] / one["tokens_per_second"],
                         "loss_max_abs_diff": loss_gap(one, two)}
    if {"ddp_13b_2gpu", "fsdp_13b_2gpu"} <= set(legs):
        ddp, fsdp = legs["ddp_13b_2gpu"], legs["fsdp_13b_2gpu"]
        memory = [(d, f) for d, f in zip(ddp["peak_memory_gib_per_process"], fsdp["peak_memory_gib_per_process"])
                  if d is not None and f is not None]
        out["fsdp_13b"] = {"speed_fsdp_over_ddp": fsdp["tokens_per_second"] / ddp["tokens_per_second"],
                           "memory_fsdp_over_ddp": max(f for _, f in memory) / max(d for d, _ in memory)
                           if memory else None, "loss_max_abs_diff": loss_gap(ddp, fsdp)}
    return out


def markdown(legs: dict, comparisons: dict) -> str:
    lines = ["| leg | processes | real tokens/s | peak GiB per process | final loss |",
             "| --- | ---: | ---: | --- | ---: |"]
    for name, leg in legs.items():
        memory = ", ".join("-" if m is None else f"{m:.1f}" for m in leg["peak_memory_gib_per_process"])
        lines.append(f"| {name} | {leg['processes']} | {leg['tokens_per_second']:,.0f} | {memory} | "
                     f"{leg['loss_history'][-1]:.4f} |")
    return "\n".join(lines) + "\n\n" + json.dumps(comparisons, indent=2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_distributed.json")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--legs", nargs="+", choices=list(LEGS), default=list(LEGS))
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes, fp32 (the test's run)")
    parser.add_argument("--child", choices=list(LEGS), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.steps, args.tiny, args.child_out)
        return {}
    with tempfile.TemporaryDirectory() as folder:
        legs = {leg: run_leg(leg, args.steps, args.tiny, Path(folder)) for leg in args.legs}
    result = {"steps": args.steps, "tiny": args.tiny, "legs": legs, "comparisons": compare(legs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(legs, result["comparisons"]))
    return result


if __name__ == "__main__":
    main()
