"""The paper's LoRA recipe, timed three ways in one process: HF PEFT + transformers' ``Trainer`` with
LLM-Adapters' settings, adapters_lab's padded recipe (``trainer=default``), and the same recipe as
packed rows (``trainer=paper_packed``: the same examples in the same optimiser steps, the same loss).

    python scripts/bench_paper.py --out outputs/bench_paper.json          # one GPU: LLaMA-7B and SmolLM2-135M shapes
    python scripts/bench_paper.py --tiny --out /tmp/bench_paper.json      # CPU smoke run (tests use it)

Every variant trains LoRA r=32, alpha=64, dropout 0.05 on q, k, v, up, down of a random-init model
(``model.init=random``: the real shape, random weights; the same FLOPs as real ones), for the same
``--steps`` optimiser steps of 16 examples (micro-batches of 4, accumulation 4, lr 3e-4, warm-up 100,
clipping 1.0), on the same examples: random token ids whose lengths are the ``math_data.json`` lengths
(``scripts/math_data_lengths.json``). The HF baseline is upstream ``finetune.py``'s call: its
``DataCollatorForSeq2Seq`` (padded to the longest, a multiple of 8), ``adamw_torch``, here in bf16
autocast (upstream: fp16). Real tokens exclude padding; each rate leaves out the first
``--warmup`` steps (compilation, allocator warm-up). The ratio column divides by the HF Trainer's rate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_table import free, synthetic_examples  # noqa: E402

from adapters_lab.files import write_json_atomic  # noqa: E402

SHAPES = ("llama7b", "smollm2_135m")
TINY_ARCH = ["model.arch.hidden_size=64", "model.arch.intermediate_size=96", "model.arch.num_hidden_layers=2",
             "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2", "model.arch.vocab_size=512",
             "model.dtype=float32"]
LORA = dict(r=32, alpha=64, dropout=0.05, targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
PAPER = dict(micro=4, accumulation=4, lr=3e-4, warmup=100, max_grad_norm=1.0, cutoff=256)
VARIANTS = ("hf_trainer", "padded", "paper_packed")


def compose(shape: str, tiny: bool, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from adapters_lab.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[
            f"model={shape}", "model.init=random", "adapter=lora", "adapter.rank=32", "adapter.alpha=64",
            "adapter.dropout=0.05", "adapter.placement.modules=[q,k,v,up,down]", "trainer.progress_bar=false",
            "trainer.checkpoint_every=0", "trainer.eval_every=0", "dataset.val_set_size=0",
            "paths.output_dir=unused", *(TINY_ARCH + ["trainer.device=cpu"] if tiny else []), *overrides])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


class FetchLog(torch.utils.data.Dataset):
    """The examples as a dataset that notes the real tokens of every item fetched, in order."""

    def __init__(self, examples: list[dict]):
        self.examples, self.fetched = examples, []

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        self.fetched.append(len(example["input_ids"]))
        return {**example, "attention_mask": [1] * len(example["input_ids"])}


def hf_trainer(cfg, examples: list[dict], steps: int, warmup: int, device: torch.device,
               logging_steps: int = 10) -> dict:
    """HF PEFT LoRA trained by transformers' ``Trainer`` with upstream ``finetune.py``'s arguments."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from adapters_lab.models import build_model

    model, tokenizer = build_model(cfg.model, device)
    # Upstream pads left (fp16, eager attention). Left-padded bf16 steps under transformers 5.17's SDPA gave
    # grad_norm NaN from the fifth step on an H200 (both shapes, 2026-12-02); right padding is the same work.
    tokenizer.padding_side = "right"
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["targets"], task_type="CAUSAL_LM"))
    data = FetchLog(examples)
    marks: list[tuple[float, int]] = []  # (time, real tokens fetched) at each step's end
    logged: list[dict] = []  # the Trainer's own logs (loss, grad_norm), every ``--hf-logging-steps``

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            marks.append((time.perf_counter(), sum(data.fetched)))

        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append({"step": state.global_step, **(logs or {})})

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=PAPER["micro"],
            gradient_accumulation_steps=PAPER["accumulation"], learning_rate=PAPER["lr"],
            warmup_steps=PAPER["warmup"], max_steps=steps, max_grad_norm=PAPER["max_grad_norm"], optim="adamw_torch",
            bf16=device.type == "cuda", use_cpu=device.type == "cpu", logging_steps=logging_steps, save_strategy="no",
            eval_strategy="no", report_to="none", train_sampling_strategy="random", disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False, seed=cfg.seed)
        collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
        Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Timer()]).train()
    (start, before), (end, after) = marks[warmup - 1], marks[-1]
    row = {"tokens_per_second": (after - before) / (end - start), "steps": len(marks), "peak_gib": peak_gib(device),
           "trainer_logs": logged}
    del model
    return row


def ours(cfg, examples: list[dict], device: torch.device) -> dict:
    """adapters_lab's trainer with ``cfg.trainer`` (its steady rate leaves out the first 2 steps)."""
    from adapters_lab.adapters import build_adapter, freeze
    from adapters_lab.models import build_model
    from adapters_lab.tracking import NullTracker
    from adapters_lab.training.loop import train
    from adapters_lab.training.settings import check_trainer_config, make_accelerator

    adapter = build_adapter(cfg.adapter)
    model, tokenizer = build_model(cfg.model, device)
    freeze(model)
    adapter.inject(model, tokenizer)
    model.to(device)
    settings = check_trainer_config(cfg.trainer)
    adapter.check_training(settings.cfg)
    result = train(model, examples, [], tokenizer.pad_token_id, settings, make_accelerator(cfg.trainer),
                   NullTracker(), cfg.seed)
    row = {"tokens_per_second": result.steady_tokens_per_second, "steps": result.steps,
           "padding": 1 - result.tokens / max(result.padded_tokens, 1), "peak_gib": peak_gib(device),
           "loss_final": result.loss_final, "loss_history": result.loss_history}
    del model
    return row


def variant_overrides(variant: str, steps: int, tiny: bool, pack_length: int) -> list[str]:
    recipe = [f"trainer.max_steps={steps}", "trainer.batch_size=16", "trainer.micro_batch_size=4"]
    if variant == "padded":
        return ["trainer=default", *recipe]
    eager = ["trainer.compile=false", "trainer.attn_implementation=null"] if tiny else []  # CPU: no flex kernels
    return ["trainer=paper_packed", *recipe, f"trainer.pack_length={pack_length}", *eager]


class Profiled:
    """``--profile DIR``: where a variant's time goes (torch.profiler's top ops by host and by device
    time, and torch.compile's recompilation counters), written to ``DIR/<shape>_<variant>.txt``."""

    def __init__(self, folder: Path | None, name: str, device: torch.device):
        self.folder, self.name, self.device, self.profiler = folder, name, device, None

    def __enter__(self):
        if self.folder is not None:
            import torch._dynamo.utils

            torch._dynamo.utils.counters.clear()
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.profiler is None:
            return
        import torch._dynamo.utils

        self.profiler.__exit__(*exc)
        table = self.profiler.key_averages()
        keys = ["self_cpu_time_total"] + (["self_device_time_total"] if self.device.type == "cuda" else [])
        text = [f"{self.name}: dynamo counters {dict((k, dict(v)) for k, v in torch._dynamo.utils.counters.items())}"]
        text += [table.table(sort_by=key, row_limit=18) for key in keys]
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{self.name}.txt").write_text("\n".join(text))
        print(text[0][:2000], flush=True)


def run_shape(shape: str, args, device: torch.device) -> list[dict]:
    rows = []
    base = compose(shape, args.tiny, [])
    examples = synthetic_examples(args.steps * 16, base.model.arch.vocab_size if not args.tiny else 512, 1,
                                  PAPER["cutoff"], seed=0)
    for variant in args.variants.split(","):
        start = time.perf_counter()
        with Profiled(args.profile, f"{shape}_{variant}", device):
            if variant == "hf_trainer":
                row = hf_trainer(base, examples, args.steps, args.warmup, device, args.hf_logging_steps)
            else:
                cfg = compose(shape, args.tiny, variant_overrides(variant, args.steps, args.tiny, args.pack_length)
                              + args.overrides)
                row = ours(cfg, examples, device)
        free(device)
        row.update(shape=shape, variant=variant, wall_seconds=time.perf_counter() - start)
        rows.append(row)
        print(f"{shape} {variant}: {row['tokens_per_second']:,.0f} real tok/s, {row['steps']} steps, "
              f"{row['wall_seconds']:.0f} s", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | variant | real tok/s | x HF Trainer | padding | peak GiB |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        hf = next((r for r in rows if r["shape"] == row["shape"] and r["variant"] == "hf_trainer"), None)
        ratio = f"{row['tokens_per_second'] / hf['tokens_per_second']:.2f}" if hf else "-"
        padding = f"{row['padding']:.0%}" if "padding" in row else "-"
        lines.append(f"| {row['shape']} | {row['variant']} | {row['tokens_per_second']:,.0f} | {ratio} | {padding} | "
                     f"{row['peak_gib'] or 0:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON of the rows")
    parser.add_argument("--tiny", action="store_true", help="shrunk shapes on CPU, a few steps (smoke test)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, help="optimiser steps per variant (default 30; --tiny 4)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the HF Trainer's rate")
    parser.add_argument("--pack-length", type=int, default=0,
                        help="paper_packed's row length (0, conf/trainer/paper_packed.yaml's: one row a step)")
    parser.add_argument("--hf-logging-steps", type=int, default=10,
                        help="the HF Trainer's logging_steps (its logs are kept)")
    parser.add_argument("--profile", type=Path, help="write each variant's profile (top ops, recompiles) here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for our variants, e.g. trainer.compile=false")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 30)
    args.pack_length = 0 if args.tiny else args.pack_length
    for name, value, known in (("--shapes", args.shapes, SHAPES), ("--variants", args.variants, VARIANTS)):
        unknown = sorted(set(value.split(",")) - set(known))
        if unknown:
            raise SystemExit(f"{name}: unknown {unknown} (known: {', '.join(known)})")
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}",
          flush=True)
    rows = [row for shape in args.shapes.split(",") for row in run_shape(shape, args, device)]
    write_json_atomic(args.out, {"device": str(device), "steps": args.steps, "rows": rows})
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
