"""Training throughput, one process: HF PEFT with the paper's recipe, tuned HF PEFT, adapters_lab.

    python scripts/bench_train.py                 # LLaMA-7B shape, bf16, one GPU (make bench-train)
    python scripts/bench_train.py --tiny          # CPU smoke run of every variant (tests use it)
    python scripts/bench_train.py --variants check_varlen,ours,ours_varlen,ours_liger,tuned

HF PEFT baselines: ``paper`` (the paper's recipe: micro-batch 4 padded to the longest), ``tuned``
(the anchor the training target was set against: 32 sequences of exactly 256 real tokens, compiled
layers; not the math lengths),
``tuned_lengths`` (the same tuning on the math lengths: 32 per micro-batch padded to 256, one shape
for the compiled layers), ``tuned_packed`` (HF PEFT on adapters_lab's packed rows, position ids
restarting per example, transformers' own ``--attn`` attention, compiled layers: what packing
gives without the rest of our trainer). adapters_lab: ours, ours_padded, series, parallel.
``ours`` takes suffixes: ``_varlen`` (trainer.attn_implementation=varlen instead of --attn),
``_plainlora`` (trainer.fused_lora=false: LoRA through nn.Dropout and separate adds, the
layers before commit 871c8c8), ``_liger`` (liger-kernel's RMSNorm, SwiGLU and RoPE for LLaMA; needs CUDA and the
optional liger-kernel package), ``_nocompile`` (eager layers), ``_autotune`` (trainer.compile_mode=
max_autotune_no_cudagraphs), ``_fp8`` (model.base_precision=fp8: the frozen base's GEMMs in FP8, the rest
as the variant without it; its model is bf16 under ``--tiny`` too, where the others' is fp32),
e.g. ``ours_varlen_liger``. Every adapters_lab row keeps its loss per step in the JSON (``loss_history``).
``check_varlen`` trains nothing: on one packed batch of a 4-layer model of the same shape it
prints the loss and LoRA-gradient differences of varlen vs flex attention (and SDPA vs flex, the
bf16 noise floor), checking the CUDA varlen kernel.

Every variant trains LoRA r=32 alpha=64 dropout=0.05 on q,k,v,up,down of a random-init model
(random weights cost the same FLOPs as real ones) on random token ids whose lengths follow
``math_data.json`` under the paper's prompt cut at 256 (``scripts/math_data_lengths.json``).
Real tokens exclude padding; MFU counts 4N FLOPs per token for frozen weights and 6N for
trainable ones (N = matmul weights), against the datasheet peak and the measured bf16 matmul
ceiling. Each variant runs on a freshly built model; the first steps (compilation) are not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_lab.training.metrics import default_peak_tflops, flops_per_token  # noqa: E402
from adapters_lab.training.speed.layers import compile_decoder_layers  # noqa: E402

LENGTHS_FILE = ROOT / "scripts" / "math_data_lengths.json"
MATH_DATA = ROOT.parent / "shared" / "data" / "llm_adapters" / "ft-training_set" / "math_data.json"
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
# every linear layer a multiple of 16 (k, v: one 16-wide head), so that --tiny runs the FP8 base too
TINY = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
            num_key_value_heads=1, vocab_size=384)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
PIECE = re.compile(r"[A-Za-z]+|\d| {2,}|\n|[^\sA-Za-z\d]")


def estimate_llama_tokens(text: str) -> int:
    """LLaMA-tokenizer length estimate (no tokenizer file is available offline): SentencePiece
    splits every digit, keeps common words whole (about one token per 6 letters), gives each
    symbol and newline a token, and has single tokens for runs of up to 16 spaces."""
    count = 0
    for match in PIECE.finditer(text):
        piece = match.group()
        if piece[0].isalpha():
            count += math.ceil(len(piece) / 6)
        elif piece.startswith("  "):
            count += math.ceil(len(piece) / 16)
        else:
            count += 1
    return count


def write_lengths(cutoff: int = 256) -> list[int]:
    from adapters_lab.data.prompts import train_prompt

    records = json.loads(MATH_DATA.read_text())
    # BOS + text, cut at cutoff; EOS appended when it fits (as tokenize_record does).
    lengths = [min(cutoff, 1 + estimate_llama_tokens(train_prompt(r["instruction"], r["input"], r["output"])) + 1)
               for r in records]
    LENGTHS_FILE.write_text(json.dumps({"source": "math_data.json, paper prompt, estimated LLaMA tokens, cut at 256",
                                        "lengths": lengths}) + "\n")
    return lengths


class Skipped(Exception):
    """A variant that cannot run here (missing optional package, needs a GPU)."""


@dataclass
class Row:
    name: str
    tokens_per_second: float
    padded_share: float
    mfu: float | None
    mfu_measured: float | None
    peak_gib: float | None
    note: str = ""
    variant: str = ""  # the --variants name
    loss_history: list[float] = field(default_factory=list)  # adapters_lab rows: the loss of every step


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def examples_from(lengths: list[int], vocab: int, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    picked = [rng.choice(lengths) for _ in range(count)]
    out = []
    for n in picked:
        ids = [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()


def peft_steps(model, batches, device, warmup: int, compile_layers: bool, dropout: float) -> tuple[float, float, float]:
    """HF PEFT LoRA, a plain loop as HF Trainer runs it: autocast bf16, fused AdamW, clipping.
    ``batches``: (collated tensors, real tokens) pairs. Returns (seconds, real tokens, padded
    tokens) over the timed steps."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=dropout,
                                                  target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    if compile_layers:
        compile_decoder_layers(peft_model.get_base_model())
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, fused=device.type == "cuda")
    peft_model.train()
    real = padded = 0.0
    start = None
    for index, (batch, batch_real) in enumerate(batches):
        if index == warmup:
            sync(device)
            start = time.perf_counter()
        tensors = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = peft_model(**tensors).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            real += batch_real
            padded += batch["input_ids"].numel()
    sync(device)
    return time.perf_counter() - start, real, padded


def padded_batches(examples, micro: int, fixed: int | None = None, pad_to: int | None = None):
    """(batch, real tokens) pairs of right-padded micro-batches. ``fixed``: every sequence made
    exactly ``fixed`` real tokens (tuned PEFT as the training target defines it); ``pad_to``: the lengths kept,
    cut at ``pad_to`` tokens and each batch padded to ``pad_to`` columns (one shape, so compiled layers
    compile once)."""
    from adapters_lab.data.tokenize import PaddedCollator

    collate = PaddedCollator(pad_token_id=0, pad_to_multiple_of=pad_to or 8)
    if fixed:
        examples = [{"input_ids": (x["input_ids"] * 3)[:fixed], "labels": (x["labels"] * 3)[:fixed]} for x in examples]
    elif pad_to:
        examples = [{"input_ids": x["input_ids"][:pad_to], "labels": x["labels"][:pad_to]} for x in examples]
    batches = [collate(examples[i : i + micro]) for i in range(0, len(examples) - micro + 1, micro)]
    return [(batch, int(batch["attention_mask"].sum())) for batch in batches]


def packed_peft_batches(examples, rows: int, row_length: int):
    """(batch, real tokens) pairs of padding-free rows (adapters_lab's packing: whole examples per
    row, position ids restarting per example), for HF PEFT with transformers' own packed attention."""
    from adapters_lab.data.tokenize import PackedCollator, pack_rows

    lengths = [len(x["input_ids"]) for x in examples]
    packed = pack_rows(list(range(len(examples))), lengths, row_length)
    collate = PackedCollator(pad_token_id=0, row_length=row_length)
    return [(collate([[examples[i] for i in row] for row in packed[b : b + rows]]),
             sum(lengths[i] for row in packed[b : b + rows] for i in row))
            for b in range(0, len(packed) - rows + 1, rows)]


def ours(model, adapter_node: dict, examples, trainer_overrides: dict, steps: int, device,
         base_precision: str = "bf16"):
    """adapters_lab's own trainer on the same model (``base_precision``: model.base_precision): returns its
    TrainResult."""
    from adapters_lab.adapters.registry import adapter_from_file
    from adapters_lab.config import TrainerConfig
    from adapters_lab.tracking import NullTracker
    from adapters_lab.training.loop import train
    from adapters_lab.training.settings import check_trainer_config, make_accelerator

    adapter = adapter_from_file(adapter_node["config"], adapter_node.get("overrides", {}))
    adapter.inject(model)
    cfg = TrainerConfig(max_steps=steps, warmup_steps=0, progress_bar=False, checkpoint_every=0, log_every=10**6,
                        device=device.type, lr=3e-4, **trainer_overrides)
    accelerator = make_accelerator(cfg)
    flops = flops_per_token(model)
    result = train(model, examples, [], 0, check_trainer_config(cfg), accelerator, NullTracker(), seed=0,
                   base_precision=base_precision)
    return result, flops


def ours_variant(variant: str) -> dict | None:
    """``ours`` plus suffixes -> its switches, or None for other variant names."""
    parts = variant.split("_")
    if parts[0] != "ours" or variant == "ours_padded":
        return None
    flags = set(parts[1:])
    known = {"varlen", "liger", "nocompile", "autotune", "plainlora", "fp8"}
    if flags - known:
        raise SystemExit(f"--variants: {variant!r} has unknown suffixes {sorted(flags - known)} ({', '.join(sorted(known))})")
    return {"varlen": "varlen" in flags, "liger": "liger" in flags, "compile": "nocompile" not in flags,
            "autotune": "autotune" in flags, "fused_lora": "plainlora" not in flags, "fp8": "fp8" in flags}


@contextlib.contextmanager
def liger_kernels(model, device):
    """liger-kernel's Triton RMSNorm, SwiGLU MLP and RoPE on this LLaMA model (its loss kernels
    stay off: our trainer computes the loss). liger patches transformers' llama module globals as
    well as the instance; they are restored afterwards so later variants run plain LLaMA."""
    if device.type != "cuda":
        raise Skipped("liger kernels need a CUDA GPU (Triton); --tiny runs on the CPU")
    if importlib.util.find_spec("liger_kernel") is None:
        raise Skipped("liger-kernel not installed")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except Exception as err:  # installed but unusable (no Triton, transformers mismatch)
        raise Skipped(f"liger-kernel not importable: {type(err).__name__}: {err}") from err
    from transformers.models.llama import modeling_llama

    saved = {name: getattr(modeling_llama, name) for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    saved_forward = modeling_llama.LlamaForCausalLM.forward
    try:
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
        yield
    finally:
        for name, value in saved.items():
            setattr(modeling_llama, name, value)
        modeling_llama.LlamaForCausalLM.forward = saved_forward


def check_varlen(shape: dict, device, dtype, lengths: list[int], rows: int, pack_length: int) -> dict:
    """Loss and LoRA gradients of one packed batch under flex attention (CUDA only), SDPA with the
    position-id mask, and varlen attention, on a 4-layer model of ``shape`` with eager layers;
    prints the differences against the first of them and returns them."""
    from accelerate.utils import send_to_device

    from adapters_lab.adapters.registry import adapter_from_file
    from adapters_lab.config import TrainerConfig
    from adapters_lab.data.batching import BatchPlan
    from adapters_lab.training.settings import typed_trainer_config
    from adapters_lab.training.speed import SpeedPaths, forward_loss

    model = build_model({**shape, "num_hidden_layers": min(4, shape["num_hidden_layers"])}, device, dtype)
    adapter_from_file("lora", {"dropout": 0.0}).inject(model)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():  # non-zero B, so that A gets a gradient too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    examples = examples_from(lengths, shape["vocab_size"], 4 * rows * pack_length // 150, seed=2)
    cfg = typed_trainer_config(TrainerConfig(batching="packed", pack_length=pack_length, micro_batch_size=rows,
                                             batch_size=rows, attn_implementation="varlen", device=device.type,
                                             fused_loss=True))
    speed = SpeedPaths(cfg, device)
    plan = BatchPlan(examples, cfg, 0, seed=0, extras=speed.batch_extras)
    batch = send_to_device(plan.batch(plan.epoch(0)[0])[0], device)
    plain = {k: v for k, v in batch.items() if not k.startswith("varlen_")}
    results = {}
    for attn in (["flex_attention"] if device.type == "cuda" else []) + ["sdpa", "varlen"]:
        if attn == "varlen":
            speed.apply(model)
        else:
            model.set_attn_implementation(attn)
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = forward_loss(model, batch if attn == "varlen" else plain, fused=True)
        loss.backward()
        results[attn] = (float(loss.detach()), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    base = next(iter(results))
    ref_loss, ref_grads = results[base]
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    report = {}
    for attn, (loss_value, grads) in results.items():
        grad_diff = max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads) / scale
        report[attn] = {"loss": loss_value, "loss_diff": abs(loss_value - ref_loss), "grad_rel_diff": grad_diff}
    tokens = batch["input_ids"].numel()
    print(f"varlen check ({model.config.num_hidden_layers} layers, {rows} x {pack_length} tokens, {tokens} total, "
          f"{int(batch['varlen_cu_seqlens'].numel()) - 1} segments, {str(dtype).replace('torch.', '')}): "
          + "; ".join(f"{a} loss {r['loss']:.6f}" for a, r in report.items()), flush=True)
    for attn, r in report.items():
        if attn != base:
            print(f"varlen check: {attn} vs {base}: |loss diff| {r['loss_diff']:.2e}, "
                  f"LoRA grads max|diff|/max|grad| {r['grad_rel_diff']:.2e}", flush=True)
    del model
    return report


def matmul_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(device)
    return 20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


FILL_OPS = ("aten::fill_", "aten::zero_")
# Kernel-name words of each kind, checked in this order (first match wins); the rest is "other".
KERNEL_KINDS = (("GEMM", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")),
                ("attention", ("flash", "flex", "attention", "fmha")),
                ("Inductor templates (flex attention, autotuned GEMMs)", ("triton_tem",)),
                ("Inductor fused", ("triton_",)),
                ("copies", ("memcpy", "copy")))


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, words in KERNEL_KINDS if any(w in lowered for w in words)), "other")


def kernel_time_by_kind(averages, steps: int) -> dict[str, float]:
    """Milliseconds of GPU kernel time per step by kernel kind (GEMM, attention, Inductor's fused
    Triton kernels, copies, other), from the profiler's averages of CUDA kernel events."""
    totals = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for event in averages:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[kernel_kind(event.key)] += event.self_device_time_total / steps / 1e3
    return totals


@contextlib.contextmanager
def profiled(device, warmup: int, steps: int):
    """torch.profiler over the timed optimiser steps only (after warm-up and compilation, which
    launch their own kernels, autotuning benchmarks among them); prints the top kernels per step,
    the fill kernels per step and the Python call sites of the fill/zero ops."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    active = max(1, min(steps - 1, 4))
    schedule = torch.profiler.schedule(wait=warmup, warmup=1, active=active, repeat=1)
    prof = torch.profiler.profile(activities=activities, schedule=schedule, with_stack=True,
                                  experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda *_: prof.step())
    prof.start()
    try:
        yield
    finally:
        handle.remove()
        prof.stop()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of {active} timed steps (totals; divide by {active} for one step):")
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
    averages = prof.key_averages()
    if device.type == "cuda":
        # Inductor's fused kernels (triton_*) are left out: their names list the ops fused, "_to_copy" among them.
        for what, words in (("fill/zero kernels", ("fill", "zero")), ("memsets", ("memset",)), ("copies", ("memcpy", "copy"))):
            hits = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA
                    and any(w in e.key.lower() for w in words) and not e.key.startswith("triton_")]
            print(f"{what} per step: {sum(e.count for e in hits) / active:.0f}, "
                  f"{sum(e.self_device_time_total for e in hits) / active / 1e3:.2f} ms")
        print("kernel time per step by kind: " + ", ".join(
            f"{kind} {ms:.1f} ms" for kind, ms in kernel_time_by_kind(averages, active).items()))
        for kind in ("copies", "other"):
            top = sorted((e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA
                          and kernel_kind(e.key) == kind), key=lambda e: -e.self_device_time_total)[:5]
            print(f"top {kind} kernels per step: " + "; ".join(
                f"{e.key[:80]} {e.self_device_time_total / active / 1e3:.2f} ms x{e.count / active:.0f}" for e in top))
    sites: dict[str, int] = {}
    for event in prof.events():
        if event.name in FILL_OPS:
            frames = [f for f in event.stack if not f.startswith("<built-in") and "torch/nn/modules/module.py" not in f]
            site = " <- ".join(frames[:4]) or "(no Python frame: autograd engine or C++)"
            sites[site] = sites.get(site, 0) + 1
    print("fill/zero ops per step by Python call site:")
    for site, count in sorted(sites.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {count / active:7.1f}  {site}")


def variant_dtype(variant: str, dtype: torch.dtype) -> torch.dtype:
    """A variant's model dtype: an FP8 base needs bf16 weights (under --tiny: the fp32 model's values rounded)."""
    return torch.bfloat16 if (ours_variant(variant) or {}).get("fp8") else dtype


BASELINES = ("paper", "tuned", "tuned_lengths", "tuned_packed")  # the ratio columns, where they ran


def markdown_table(rows: list[Row]) -> str:
    """The rows as a Markdown table, with each row's ratio to every HF PEFT baseline that ran."""
    base = {r.variant: r.tokens_per_second for r in rows if r.variant in BASELINES and r.tokens_per_second > 0}
    ran = [b for b in BASELINES if b in base]
    pct = lambda v: f"{v:.1%}" if v is not None else "-"  # noqa: E731
    lines = ["| variant | real tok/s | padding | MFU (datasheet) | MFU (measured matmul) | peak GiB | "
             + " | ".join(f"x {b}" for b in ran) + " |",
             "| --- " + "| ---: " * (5 + len(ran)) + "|"]
    for r in rows:
        ratios = " | ".join(f"{r.tokens_per_second / base[b]:.2f}" for b in ran)
        lines.append(f"| {r.name} {r.note} | {r.tokens_per_second:,.0f} | {r.padded_share:.0%} | {pct(r.mfu)} | "
                     f"{pct(r.mfu_measured)} | {r.peak_gib or 0:.1f} | {ratios} |")
    return "\n".join(lines)


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU, a few steps (smoke test)")
    parser.add_argument("--variants", default="paper,tuned,tuned_lengths,tuned_packed,ours,series,parallel",
                        help="comma list of paper, tuned, tuned_lengths, tuned_packed, ours[_varlen][_plainlora][_fp8][_liger][_nocompile][_autotune], ours_padded, series, "
                             "parallel, check_varlen (see the module docstring)")
    parser.add_argument("--steps", type=int, default=12, help="timed optimiser steps per variant")
    parser.add_argument("--pack-length", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch")
    parser.add_argument("--write-lengths", action="store_true", help="regenerate the length list from math_data.json")
    parser.add_argument("--attn", default="flex_attention", help="trainer.attn_implementation of the adapters_lab variants")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout of every variant (diagnostics)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the timed steps (after warm-up and compilation) of each variant: top kernels per "
                             "step, fill kernels per step and the Python call sites of the fills")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    lengths = write_lengths() if args.write_lengths else json.loads(LENGTHS_FILE.read_text())["lengths"]
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape, dtype = (TINY, torch.float32) if args.tiny else (LLAMA_7B, torch.bfloat16)
    steps, warmup = (2, 1) if args.tiny else (args.steps, 3)
    datasheet = default_peak_tflops(device)
    measured = matmul_tflops(device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"bf16 8192^3 matmul {measured or 0:.0f} TFLOP/s; datasheet {datasheet} TFLOP/s", flush=True)
    rows: list[Row] = []

    def add(name, tokens_per_second, padded_share, flops, peak, note="", loss_history=()):
        mfu = tokens_per_second * flops / (datasheet * 1e12) if datasheet else None
        mfu_m = tokens_per_second * flops / (measured * 1e12) if measured else None
        rows.append(Row(name, tokens_per_second, padded_share, mfu, mfu_m, peak, note, loss_history=list(loss_history)))
        print(f"  {name}: {tokens_per_second:,.0f} real tok/s, {peak or 0:.1f} GiB {note}", flush=True)

    variants = args.variants.split(",")
    compiled = not args.tiny
    pack_overrides = dict(batching="packed", pack_length=args.pack_length if not args.tiny else 0,
                          attn_implementation=args.attn if not args.tiny else None,
                          micro_batch_size=args.rows if not args.tiny else 2,
                          batch_size=args.rows if not args.tiny else 2, compile=compiled, fused_loss=True,
                          fused_lora=True)
    first_losses: dict[str, float] = {}

    def examples_for(tokens_per_step: int) -> list[dict]:
        """Enough examples (mean 171 tokens, 30% spare) for every step of ``tokens_per_step`` tokens."""
        return examples_from(lengths, shape["vocab_size"], max(64, int(1.3 * tokens_per_step * (steps + warmup) / 171)),
                             seed=1)

    def run_variant(variant, model):
        if variant in ("paper", "tuned", "tuned_lengths", "tuned_packed"):
            micro, cutoff = (4, 256) if variant == "paper" else ((32, 256) if not args.tiny else (4, 32))
            if variant == "tuned_packed":
                row_length = args.pack_length if not args.tiny else 256
                micro = args.rows if not args.tiny else 2
                batches = packed_peft_batches(examples_for(micro * row_length), micro, row_length)
                model.set_attn_implementation(args.attn if not args.tiny else "sdpa")
                label = (f"HF PEFT, tuned, packed ({micro} rows x {row_length}, "
                         f"{args.attn if not args.tiny else 'sdpa'}, compiled)")
            else:
                examples = examples_from(lengths, shape["vocab_size"], micro * (steps + warmup), seed=1)
                batches = padded_batches(examples, micro, fixed=cutoff if variant == "tuned" else None,
                                         pad_to=cutoff if variant == "tuned_lengths" else None)
                label = {"paper": "HF PEFT, paper recipe (micro-batch 4, padded)",
                         "tuned": f"HF PEFT, tuned (micro-batch {micro} x {cutoff}, compiled)",
                         "tuned_lengths": f"HF PEFT, tuned on the math lengths (micro-batch {micro} padded to {cutoff}, "
                                          "compiled)"}[variant]
            seconds, real, padded = peft_steps(model, batches[: steps + warmup], device, warmup,
                                               compile_layers=variant != "paper" and compiled, dropout=args.lora_dropout)
            add(label, real / seconds, 1 - real / padded, flops_per_token(model), peak_gib(device))
            return
        switches = ours_variant(variant)
        lora = {"config": "lora", "overrides": {"dropout": args.lora_dropout}}
        adapter = {"ours_padded": lora, "series": {"config": "series", "overrides": {"rank": 256}},
                   "parallel": {"config": "parallel", "overrides": {"rank": 256}}}.get(variant, lora)
        overrides = dict(pack_overrides) if variant != "ours_padded" else dict(micro_batch_size=4, batch_size=4)
        label = {"ours_padded": "adapters_lab LoRA, paper batching", "series": "adapters_lab series bottleneck 256",
                 "parallel": "adapters_lab parallel bottleneck 256"}.get(variant, "adapters_lab LoRA")
        liger = contextlib.nullcontext()
        if switches:
            if switches["varlen"]:
                overrides["attn_implementation"] = "varlen"
            overrides["compile"] = compiled and switches["compile"]
            if switches["autotune"] and overrides["compile"]:
                overrides["compile_mode"] = "max-autotune-no-cudagraphs"
            overrides["fused_lora"] = switches["fused_lora"]
            extras = [name for name, on in (("liger kernels", switches["liger"]),
                                            ("eager layers", not switches["compile"] and compiled),
                                            ("max-autotune", "compile_mode" in overrides),
                                            ("plain LoRA layers", not switches["fused_lora"]),
                                            ("FP8 frozen base", switches["fp8"])) if on]
            label += "".join(f", {e}" for e in extras)
            if switches["liger"]:
                liger = liger_kernels(model, device)
        rows_per_step = overrides["micro_batch_size"] * (args.pack_length if "pack_length" in overrides and not args.tiny else 180)
        examples = examples_for(rows_per_step)
        with liger:
            result, flops = ours(model, adapter, examples, overrides, steps + warmup, device,
                                 "fp8" if switches and switches["fp8"] else "bf16")
        first_losses[variant] = result.loss_history[0]
        add(label, result.steady_tokens_per_second, 1 - result.tokens / result.padded_tokens, flops,
            result.peak_memory_gib, f"({overrides.get('batching', 'padded')}, {overrides['micro_batch_size']} rows"
            + (f" x {args.pack_length})" if "pack_length" in overrides and not args.tiny else ")")
            + (f"; {overrides['attn_implementation'] or 'sdpa'}" if "attn_implementation" in overrides else "")
            + f"; step-1 loss {result.loss_history[0]:.5f}", result.loss_history)

    for variant in variants:
        free(device)
        if variant == "check_varlen":
            try:
                check_varlen(shape, device, dtype, lengths, rows=pack_overrides["micro_batch_size"],
                             pack_length=args.pack_length if not args.tiny else 512)
            except Exception:  # a failed check is printed; the timings still run
                import traceback

                traceback.print_exc()
                print("varlen check: FAILED (traceback above)", flush=True)
            continue
        model = build_model(shape, device, variant_dtype(variant, dtype))
        added = len(rows)
        try:
            if args.profile:
                with profiled(device, warmup, steps):
                    run_variant(variant, model)
            else:
                run_variant(variant, model)
            for row in rows[added:]:
                row.variant = variant
        except Skipped as reason:
            print(f"  {variant}: skipped: {reason}", flush=True)
        except Exception as err:  # keep measuring the other variants; the table says what failed
            import traceback

            traceback.print_exc()
            rows.append(Row(variant, 0.0, 0.0, None, None, None, f"FAILED: {type(err).__name__}: {err}"[:200]))
        del model
    free(device)

    # Step 1 runs before any update with LoRA B = 0, so its loss is the base model's whatever the
    # dropout draws: varlen and flex (or SDPA) must agree up to bf16 rounding.
    for variant, loss in first_losses.items():
        plain = variant.replace("_varlen", "")
        if "_varlen" in variant and plain in first_losses:
            print(f"varlen vs {args.attn if not args.tiny else 'sdpa'}: step-1 loss {variant} {loss:.5f}, {plain} "
                  f"{first_losses[plain]:.5f}, |diff| {abs(loss - first_losses[plain]):.2e}", flush=True)

    for variant, loss in first_losses.items():  # the same base model's loss, its GEMMs in FP8 or bf16
        plain = variant.replace("_fp8", "")
        if "_fp8" in variant and plain in first_losses:
            print(f"fp8 vs bf16 base: step-1 loss {variant} {loss:.5f}, {plain} {first_losses[plain]:.5f}, "
                  f"|diff| {abs(loss - first_losses[plain]):.2e}", flush=True)

    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
