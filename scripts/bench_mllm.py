"""LoRA training throughput on an image-text model: ours (adapters_lab's train() with the image-text
collator and the connector in its own optimiser group) against HF PEFT on the same model, same
micro-batches, same process. Prints real tokens/s (every non-pad token, image tokens included) and
peak GPU memory for each, and their ratio; writes them as JSON.

Default: the random-init LLaVA-1.5-7B shape (CLIP ViT-L/14 at 336x336: 576 image tokens; Vicuna-7B),
LoRA r=128 alpha 256 on q k v o gate up down of the language model, connector trained, bf16.
``--tiny``: tiny_llava on the CPU (a check that the script runs).

    python scripts/bench_mllm.py --out outputs/bench_mllm.json            # H200
    python scripts/bench_mllm.py --tiny --device cpu --steps 3 --warmup 1  # CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_lab.adapters.base import Placement, freeze  # noqa: E402
from adapters_lab.adapters.lora import LoRA  # noqa: E402
from adapters_lab.config import DType, ModelConfig, TinyModelConfig, TinyVisionConfig, TrainerConfig  # noqa: E402
from adapters_lab.data.mllm import ImageTextCollator  # noqa: E402
from adapters_lab.data.tokenize import IGNORE_INDEX  # noqa: E402
from adapters_lab.files import write_json_atomic  # noqa: E402
from adapters_lab.models.image_text import build_tiny_image_text, build_tiny_processor  # noqa: E402
from adapters_lab.models.parts import parameter_groups, set_connector_trainable  # noqa: E402
from adapters_lab.tracking import NullTracker  # noqa: E402
from adapters_lab.training.loop import train  # noqa: E402
from adapters_lab.training.settings import check_trainer_config, make_accelerator  # noqa: E402

MODULES = ["q", "k", "v", "o", "gate", "up", "down"]
PEFT_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# LLaVA-1.5-7B's shape (llava-hf/llava-1.5-7b-hf config.json): Vicuna-7B and CLIP ViT-L/14-336
LLAVA_7B = TinyModelConfig(model_type="llava", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           vocab_size=32064, vision=TinyVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                                     num_hidden_layers=24, num_attention_heads=16,
                                                                     image_size=336, patch_size=14))
TINY = TinyModelConfig(model_type="llava", vocab_size=448, vision=TinyVisionConfig())


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    """(model, processor): random weights of the chosen shape, on ``device`` (a local tokenizer)."""
    shape = TINY if tiny else LLAVA_7B
    cfg = ModelConfig(name="tiny_llava" if tiny else "llava15_7b_shape", tiny=shape, dtype=DType.float32,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model, processor = build_tiny_image_text(cfg, "llava")
        if not tiny:  # the local tokenizer is small; the 7B shape keeps LLaVA-1.5's 32064-row embedding and head
            model.resize_token_embeddings(shape.vocab_size, mean_resizing=False)  # 7.06B parameters
    return model.to(dtype), processor


def examples(processor, count: int, text_tokens: int, answer_tokens: int, size: int) -> list[dict]:
    """Image + ``text_tokens`` random text tokens each, the last ``answer_tokens`` of them trained."""
    rng = np.random.default_rng(0)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    image_tokens = processor.num_image_tokens(size, size)
    vocab = [i for i in range(len(processor.tokenizer)) if i not in processor.tokenizer.all_special_ids]
    out = []
    for _ in range(count):
        text = rng.choice(vocab, text_tokens).tolist()
        ids = [processor.tokenizer.bos_token_id] + [image_id] * image_tokens + text
        labels = [IGNORE_INDEX] * (len(ids) - answer_tokens) + ids[-answer_tokens:]
        image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        out.append({"input_ids": ids, "labels": labels, "image": image})
    return out


def ours(model, processor, data, args, device) -> dict:
    freeze(model)
    LoRA(name="lora", rank=args.rank, alpha=2.0 * args.rank, dropout=0.05,
         placement=Placement(modules=MODULES)).inject(model)
    set_connector_trainable(model, True)
    cfg = TrainerConfig(max_steps=args.warmup + args.steps, batch_size=args.micro_batch,
                        micro_batch_size=args.micro_batch,
                        lr=2e-4, connector_lr=2e-5, warmup_steps=0, device=device.type, progress_bar=False,
                        eval_every=0, checkpoint_every=0, log_every=10**6,
                        precision="bf16" if device.type == "cuda" else "fp32")
    settings = check_trainer_config(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(model, data, [], processor.tokenizer.pad_token_id, settings, make_accelerator(cfg), NullTracker(),
                   0, collate=ImageTextCollator(processor, processor.tokenizer.pad_token_id),
                   param_groups=parameter_groups(model, 2e-4, 2e-5))
    return {"tokens_per_second": result.steady_tokens_per_second, "peak_memory_gib": result.peak_memory_gib,
            "loss_final": result.loss_final}


def theirs(model, processor, data, args, device) -> dict:
    """HF PEFT's LoRA (targets restricted to the language model), the connector unfrozen, a plain
    AdamW loop under bf16 autocast over the same micro-batches in the same order."""
    import peft

    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules=PEFT_TARGETS)
    model = peft.get_peft_model(model, config)
    for param in model.base_model.model.model.multi_modal_projector.parameters():
        param.requires_grad_(True)
    groups = parameter_groups(model, 2e-4, 2e-5)
    optimizer = torch.optim.AdamW(groups, lr=2e-4, fused=device.type == "cuda")
    collate = ImageTextCollator(processor, processor.tokenizer.pad_token_id)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i:i + args.micro_batch] for i in range(0, len(order), args.micro_batch)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    tokens, start = 0, None
    for step in range(args.warmup + args.steps):
        batch = collate([data[i] for i in batches[step % len(batches)]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 == args.warmup:
            loss.item()  # the warm-up's work finished before the clock starts
            start = time.perf_counter()
        elif step + 1 > args.warmup:
            tokens += int(batch["attention_mask"].sum())
    final = loss.item()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"tokens_per_second": tokens / seconds, "peak_memory_gib": peak, "loss_final": final}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny_llava (CPU check) instead of the LLaVA-1.5-7B shape")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8, help="timed optimiser steps, after --warmup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=256, help="text tokens after the image tokens")
    parser.add_argument("--answer-tokens", type=int, default=64, help="trained tokens at the end")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_mllm.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = (TINY if args.tiny else LLAVA_7B).vision.image_size
    processor = build_tiny_processor(TINY if args.tiny else LLAVA_7B, "llava")
    count = args.micro_batch * (args.warmup + args.steps)
    data = examples(processor, count, args.text_tokens, args.answer_tokens, size)
    results = {"model": "tiny_llava" if args.tiny else "llava-1.5-7b shape (random init)", "device": str(device),
               "image_tokens": processor.num_image_tokens(size, size), "sequence": len(data[0]["input_ids"]),
               "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup, "rank": args.rank}
    for name, run in (("ours", ours), ("hf_peft", theirs)):
        model, processor = build(args.tiny, device, dtype)
        results[name] = run(model, processor, data, args, device)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(name, results[name], flush=True)
    mine, peft_run = results["ours"], results["hf_peft"]
    results["speed_ratio_ours_over_peft"] = mine["tokens_per_second"] / peft_run["tokens_per_second"]
    if mine["peak_memory_gib"] and peft_run["peak_memory_gib"]:
        results["memory_ratio_ours_over_peft"] = mine["peak_memory_gib"] / peft_run["peak_memory_gib"]
    write_json_atomic(args.out, results)
    print(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
