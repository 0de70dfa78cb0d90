"""Time the math table end to end: its four cells on the random-init LLaMA-7B shape, per stage.

    python scripts/bench_table.py --out outputs/bench_table.json              # one GPU, the whole table
    python scripts/bench_table.py --out t.json --cells lora --max-steps 60 --eval-limit 64   # a sample, extrapolated
    python scripts/bench_table.py --tiny --out /tmp/bench_table.json          # CPU smoke run (tests use it)

Each cell (``conf/sweep/math_main.yaml``'s experiments: paper/prefix, paper/series, paper/parallel,
paper/lora) is composed from the real configs with ``model=llama7b model.init=random`` and run by the
same library calls as ``pipeline.run``: build (random weights on the GPU) and inject, train with the
cell's own recipe, evaluate. The training set is math_10k-sized (``--examples``, 10,000): the real
``math_data.json`` lengths (``scripts/math_data_lengths.json``, LLaMA-token estimates under the
paper's prompt cut at 256) repeated, as random token ids; 120 of them are the validation split, as in
a real run. Evaluation is the whole math suite (seven sets, 4,314 questions) at 4 beams, through the
evaluator's own batching, from ``paths.data_dir``; the local byte-level tokenizer makes its prompts
somewhat longer than LLaMA's, and a random model never emits EOS, so every answer runs to 256 new
tokens (an upper bound for a trained model).

Stages per cell, wall seconds: ``load`` (build, freeze, inject, on the device), ``compile`` (the
run's time beyond its steps at the steady rate and its validations and checkpoints at their
recurring cost: compilation, warm-up, the first validation's and checkpoint's excess), ``train``
(the steps at the steady rate, the validations and the checkpoints), ``eval``. The trainer's steady
rate leaves validations and checkpoints out and times each of them (``TrainResult``), so a sample
(``--max-steps N``, which validates and checkpoints at its half and its end) extrapolates to the
full schedule (marked ``extrapolated``): its steps at the steady rate, its validations and checkpoints
as many as the loop schedules (every ``trainer.eval_every`` / ``checkpoint_every`` steps and at the
end), each at the cost of the sample's later ones. ``--eval-limit N`` extrapolates eval linearly by
questions, an upper bound, since a sample of one batch pays for building a decoder and capturing its
CUDA graphs, which the whole suite pays a few times over its 34 batches. Each finished
cell is written to ``--out`` at once and skipped when the script runs again (``--overwrite``
redoes it), so the table can be timed one cell per command; the printed table sums every cell in
the file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_lab.files import write_json_atomic  # noqa: E402

CELLS = ("prefix", "series", "parallel", "lora")
LENGTHS_FILE = ROOT / "scripts" / "math_data_lengths.json"
MATH_10K_SIZE = 10_000
STAGES = ("load", "compile", "train", "eval")
TINY = ["model=tiny_llama", "trainer.device=cpu", "dataset.cutoff_len=64", "eval.max_new_tokens=8",
        "eval.batch_size=8", "dataset.val_set_size=4", "trainer.eval_every=4", "trainer.checkpoint_every=4"]


def compose_cell(cell: str, tiny: bool, overrides: list[str]):
    """The cell's config as the table composes it, the model random-init, the whole math suite."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from adapters_lab.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    model = TINY if tiny else ["model=llama7b", "model.init=random"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[
            "sweep=math_main", f"experiment=paper/{cell}", "dataset.eval_sets=[math]", "eval.num_beams=4",
            "trainer.progress_bar=false", "logger=none", "paths.output_dir=unused", *model, *overrides])


def synthetic_examples(count: int, vocab: int, bos: int, cutoff: int, seed: int) -> list[dict]:
    """``count`` examples whose lengths are the math_data lengths in order, repeated (cut at ``cutoff``),
    of random token ids (labels = inputs, as train_on_inputs)."""
    lengths = json.loads(LENGTHS_FILE.read_text())["lengths"]
    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = min(lengths[i % len(lengths)], cutoff)
        ids = [bos] + [rng.randrange(4, vocab) for _ in range(n - 1)]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def full_updates(trainer, examples: list[dict], pad_token_id: int, seed: int) -> int:
    """Optimiser steps of the cell's full schedule on ``examples``, as the trainer counts them."""
    from adapters_lab.data.batching import BatchPlan
    from adapters_lab.training.loop import total_updates
    from adapters_lab.training.settings import check_trainer_config

    settings = check_trainer_config(trainer)
    micro_per_epoch = BatchPlan(examples, settings.cfg, pad_token_id, seed).micro_batches_per_epoch()
    return total_updates(settings.cfg, micro_per_epoch, settings.accumulation)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - start


def build(cfg, device):
    from adapters_lab.adapters import build_adapter, count_parameters, freeze
    from adapters_lab.models import build_model

    adapter = build_adapter(cfg.adapter)
    model, tokenizer = build_model(cfg.model, device)
    freeze(model)
    adapter.inject(model, tokenizer)
    return adapter, model.to(device), tokenizer, count_parameters(model)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()


def train_stage(cfg, model, tokenizer, adapter, examples: list[dict], device) -> tuple[float, object]:
    """Train on ``examples`` (the first dataset.val_set_size held out, as a real run holds out a split) with the
    cell's recipe; returns the wall seconds and the TrainResult."""
    from adapters_lab.tracking import NullTracker
    from adapters_lab.training.loop import train
    from adapters_lab.training.settings import check_trainer_config, make_accelerator

    settings = check_trainer_config(cfg.trainer, cfg.dataset.val_set_size)
    adapter.check_training(settings.cfg)
    held = cfg.dataset.val_set_size
    val, rest = examples[:held], examples[held:]
    accelerator = make_accelerator(cfg.trainer)
    with tempfile.TemporaryDirectory() as checkpoints:
        result, seconds = timed(lambda: train(model, rest, val, tokenizer.pad_token_id, settings, accelerator,
                                              NullTracker(), cfg.seed, checkpoint_dir=Path(checkpoints),
                                              base_precision=cfg.model.base_precision), device)
    return seconds, result


def scheduled_events(updates: int, eval_every: int, checkpoint_every: int, validates: bool) -> tuple[int, int]:
    """(validations, checkpoints) of a run of ``updates`` steps, as the training loop schedules them:
    a validation every ``eval_every`` steps before the last and one at the end (when there is a
    validation split); a checkpoint every ``checkpoint_every`` steps and one at the end."""
    validations = (((updates - 1) // eval_every if eval_every > 0 else 0) + 1) if validates else 0
    every = (updates // checkpoint_every) if checkpoint_every > 0 else 0
    last = 0 if checkpoint_every > 0 and updates % checkpoint_every == 0 else 1
    return validations, every + last


def recurring(times: list[float]) -> tuple[float, float]:
    """(the cost of one more such event, the first one's excess): the mean after the first when there are
    several (the first validation also compiles its shapes), else the one measured. An excess below zero
    (a first event cheaper than the later ones, as when a later checkpoint waits for a background write)
    counts as none."""
    if not times:
        return 0.0, 0.0
    later = times[1:] or times
    cost = sum(later) / len(later)
    return cost, max(0.0, times[0] - cost)


def split_train(seconds: float, result, full_steps: int, full_validations: int, full_checkpoints: int
                ) -> tuple[float, float]:
    """(compile, train) seconds of the full schedule from a run that took ``seconds``: train is the full
    schedule's steps at the steady rate (with the run's mean tokens per step) plus its validations and
    checkpoints at their measured recurring cost; compile is the rest of the run's wall time (the first
    steps' compilation and warm-up, the first validation's and checkpoint's excess, selecting weights),
    counted once. A run of the full schedule gives back its own wall time."""
    steady = result.steady_tokens_per_second
    steps_time = result.tokens / steady if steady > 0 else seconds
    validation, validation_first = recurring(result.validation_seconds)
    checkpoint, checkpoint_first = recurring(result.checkpoint_seconds)
    other = seconds - steps_time - sum(result.validation_seconds) - sum(result.checkpoint_seconds)
    compile_seconds = max(0.0, other) + validation_first + checkpoint_first
    per_step = result.tokens / max(result.steps, 1)
    train = full_steps * per_step / steady if steady > 0 else seconds * full_steps / max(result.steps, 1)
    return compile_seconds, train + full_validations * validation + full_checkpoints * checkpoint


def profiled_steps(after: int | None, device: torch.device):
    """torch.profiler over four optimiser steps after the first ``after`` + 1 (bench_train's summary: top
    kernels, kernel time per step by kind); no profiler when ``after`` is None."""
    if after is None:
        return contextlib.nullcontext()
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    from bench_train import profiled

    return profiled(device, warmup=after, steps=5)


def run_cell(cell: str, args, device: torch.device) -> dict:
    """One cell: its stages' seconds (extrapolated where a sample ran) and what was measured."""
    from transformers import set_seed

    from adapters_lab.data.sources import load_task_data
    from adapters_lab.evaluate import evaluate_sets

    half = max(1, (args.max_steps or 0) // 2)  # a sample validates and checkpoints at its half and its end
    steps = [f"trainer.max_steps={args.max_steps}", f"trainer.eval_every={half}", f"trainer.checkpoint_every={half}"]
    sample = [*(steps if args.max_steps else []),
              *([f"eval.limit={args.eval_limit}"] if args.eval_limit else [])]
    full_cfg = compose_cell(cell, args.tiny, args.overrides)
    cfg = compose_cell(cell, args.tiny, [*args.overrides, *sample])
    data = load_task_data(cfg.dataset, cfg.eval, cfg.paths, cfg.seed, needs_train=False)
    full_questions = sum(len(v) for v in load_task_data(full_cfg.dataset, full_cfg.eval, full_cfg.paths, cfg.seed,
                                                        needs_train=False).eval_sets.values())
    set_seed(cfg.seed)
    (adapter, model, tokenizer, params), load_seconds = timed(lambda: build(cfg, device), device)
    examples = synthetic_examples(args.examples, model.config.vocab_size, tokenizer.bos_token_id,
                                  cfg.dataset.cutoff_len, cfg.seed)
    with profiled_steps(args.profile, device):
        train_seconds, result = train_stage(cfg, model, tokenizer, adapter, examples, device)
    train_examples = examples[cfg.dataset.val_set_size:]
    full_steps = full_updates(full_cfg.trainer, train_examples, tokenizer.pad_token_id, cfg.seed)
    events = scheduled_events(full_steps, full_cfg.trainer.eval_every, full_cfg.trainer.checkpoint_every,
                              cfg.dataset.val_set_size > 0)
    compile_seconds, train = split_train(train_seconds, result, full_steps, *events)
    stages = {"compile": compile_seconds, "train": train}
    extrapolated = ["train"] if result.steps < full_steps else []
    metrics, eval_seconds = timed(lambda: evaluate_sets(model, tokenizer, data.eval_sets, cfg.eval, device, None),
                                  device)
    questions = sum(len(v) for v in data.eval_sets.values())
    row = {"stages": {"load": load_seconds, "compile": stages["compile"], "train": stages["train"],
                      "eval": eval_seconds * full_questions / questions}, "extrapolated": extrapolated}
    if questions < full_questions:
        extrapolated.append("eval")
    row["total"] = sum(row["stages"].values())
    row["measured"] = {"steps": result.steps, "full_steps": full_steps,
                       "train_examples": len(train_examples), "train_seconds": train_seconds,
                       "validation_seconds": result.validation_seconds, "checkpoint_seconds": result.checkpoint_seconds,
                       "full_validations": events[0], "full_checkpoints": events[1],
                       "questions": questions, "full_questions": full_questions, "eval_seconds": eval_seconds,
                       "tokens": result.tokens, "tokens_per_second": result.tokens_per_second,
                       "steady_tokens_per_second": result.steady_tokens_per_second,
                       "peak_memory_gib": result.peak_memory_gib, "eval_sets": sorted(data.eval_sets)}
    row["recipe"] = {"adapter": adapter.name, "params": params, "lr": cfg.trainer.lr, "epochs": cfg.trainer.epochs,
                     "batch_size": cfg.trainer.batch_size, "micro_batch_size": cfg.trainer.micro_batch_size,
                     "batching": str(cfg.trainer.batching.value), "num_beams": cfg.eval.num_beams,
                     "base_precision": str(cfg.model.base_precision.value),
                     "eval_accuracy": metrics.get("average")}
    model = None  # freed before the next cell is built
    free(device)
    return row


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.2f}"


def markdown(results: dict) -> str:
    """Minutes per stage per cell and in total, over every cell in ``results``."""
    lines = ["| cell | " + " | ".join(STAGES) + " | total | extrapolated |", "| --- " + "| ---: " * 5 + "| --- |"]
    totals = dict.fromkeys(STAGES, 0.0)
    for cell in CELLS:
        row = results["cells"].get(cell)
        if row is None:
            continue
        for stage in STAGES:
            totals[stage] += row["stages"][stage]
        lines.append(f"| {cell} | " + " | ".join(minutes(row["stages"][s]) for s in STAGES)
                     + f" | {minutes(row['total'])} | {', '.join(row['extrapolated']) or '-'} |")
    lines.append("| **all** | " + " | ".join(minutes(totals[s]) for s in STAGES)
                 + f" | **{minutes(sum(totals.values()))}** | |")
    return "\n".join(lines)


def setting(args, device: torch.device) -> dict:
    """What makes two cells' times comparable (cells of other settings are not mixed in one file)."""
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": name, "tiny": args.tiny, "examples": args.examples, "overrides": list(args.overrides)}


def commit() -> str:
    import subprocess

    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON of the cells timed so far (read, then extended)")
    parser.add_argument("--tiny", action="store_true", help="tiny_llama on CPU, tiny sizes (smoke test)")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma list of {', '.join(CELLS)}")
    parser.add_argument("--examples", type=int, help=f"training examples, validation split included "
                                                     f"(default {MATH_10K_SIZE}, math_10k's size; --tiny 24)")
    parser.add_argument("--max-steps", type=int, help="train this many steps and extrapolate to the full schedule")
    parser.add_argument("--eval-limit", type=int, help="evaluate the first N questions per set and extrapolate "
                                                       "(--tiny: 2)")
    parser.add_argument("--profile", type=int, metavar="N", help="profile the four training steps after the "
                        "first N + 1 (diagnostics: it slows them, so use an --out not kept; keep the window clear of "
                        "the sample's validations at --max-steps / 2 and the end, which CPU builds fail to profile)")
    parser.add_argument("--overwrite", action="store_true", help="time cells already in --out again")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every cell, e.g. trainer=fast")
    args = parser.parse_args(argv)
    args.examples = args.examples or (24 if args.tiny else MATH_10K_SIZE)
    args.eval_limit = args.eval_limit or (2 if args.tiny else None)
    cells = args.cells.split(",")
    if set(cells) - set(CELLS):
        raise SystemExit(f"--cells: unknown {sorted(set(cells) - set(CELLS))} (known: {', '.join(CELLS)})")
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    fresh = {"setting": setting(args, device), "cells": {}}
    results = json.loads(args.out.read_text()) if args.out.is_file() else fresh
    if results["setting"] != setting(args, device):
        raise SystemExit(f"--out {args.out}: holds cells timed with {results['setting']}, not {setting(args, device)}; "
                         "use another file")
    print(f"device: {results['setting']['device']}; torch {torch.__version__}; commit {commit()}", flush=True)
    for cell in cells:
        if cell in results["cells"] and not args.overwrite:
            print(f"{cell}: already in {args.out} (--overwrite times it again)", flush=True)
            continue
        row = run_cell(cell, args, device)
        results["cells"][cell] = {**row, "commit": commit()}
        write_json_atomic(args.out, results)
        print(f"{cell}: " + ", ".join(f"{s} {row['stages'][s]:.1f} s" for s in STAGES)
              + f"; total {minutes(row['total'])} min", flush=True)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
