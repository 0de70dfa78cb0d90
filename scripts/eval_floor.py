"""The floor of the math suite's decoding on the LLaMA-7B shape: the time its matrix products and
its memory reads need at a given compute rate and memory bandwidth, beside which
``scripts/bench_eval.py --suite`` is measured (docs/benchmarks.md).

    python scripts/eval_floor.py                 # the suite's prompts (local tokenizer), greedy and 4 beams
    python scripts/eval_floor.py --tflops 786 --tbps 4.4   # at the rates measured on an H200
    python scripts/eval_floor.py --tflops 786 --tbps 4.4 --live 0.29   # beams' dead tokens not read

Per decoding step of a batch of ``n`` prompts, ``b`` beams, ``t`` tokens generated so far:
- products: 2 x 6.61e9 FLOPs per row (the 32 layers' linear weights and the output head), ``n * b`` rows;
- reads: the weights once (2 bytes each) and every key and value each row attends, 512 KiB per cached token
  (32 layers x K and V x 4096 x 2 bytes): each prompt's real tokens once (its beams share them) and
  ``b * t`` generated tokens (each beam's own ``t``), or with ``--live f`` the fraction ``f`` of them that
  some running beam descends from (what the decoder's compaction keeps; greedy: all);
- the two are summed: the step's kernels run one after another (products bound by compute, attention by
  bandwidth), so this floor assumes no overlap between them.
Prefill adds 2 x 6.61e9 FLOPs per prompt token. Every answer runs the full budget of new tokens, as a
random-init model's do. Batches are the evaluator's (``balanced_batches``, longest prompts first),
capped at ``--batch`` prompts (256 greedy, 128 with 4 beams: bench_eval's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

LAYERS, HIDDEN, MLP, VOCAB = 32, 4096, 11008, 32000
MATMUL_PARAMS = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP) + HIDDEN * VOCAB  # 6.61e9
KV_BYTES_PER_TOKEN = LAYERS * 2 * HIDDEN * 2  # 512 KiB


def suite_floor(lengths: list[int], batches: list[list[int]], beams: int, new_tokens: int,
                tflops: float, tbps: float, live: float = 1.0) -> dict:
    """Seconds the decoding of ``batches`` (lists of indices into ``lengths``) needs at least, reading
    the fraction ``live`` of the beams' generated tokens (all of them when greedy)."""
    live = 1.0 if beams == 1 else live
    compute, memory = 0.0, 0.0
    for batch in batches:
        rows, prompt_tokens = len(batch) * beams, sum(lengths[i] for i in batch)
        compute += 2 * MATMUL_PARAMS * prompt_tokens / (tflops * 1e12)  # prefill
        for t in range(1, new_tokens):
            compute += 2 * MATMUL_PARAMS * rows / (tflops * 1e12)
            read = 2 * MATMUL_PARAMS + KV_BYTES_PER_TOKEN * (prompt_tokens + live * len(batch) * beams * t)
            memory += read / (tbps * 1e12)
    return {"compute_s": compute, "memory_s": memory, "floor_s": compute + memory,
            "floor_min": (compute + memory) / 60, "batches": len(batches), "steps": len(batches) * (new_tokens - 1)}


def main(argv=None) -> dict:
    from bench_eval import suite_prompts

    from adapters_lab.evaluate import balanced_batches
    from adapters_lab.models import build_tiny_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, default=989.0, help="dense bf16 rate (H100/H200 datasheet: 989)")
    parser.add_argument("--tbps", type=float, default=4.8, help="memory bandwidth, TB/s (H200 datasheet: 4.8)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--live", type=float, default=1.0,
                        help="fraction of the beams' generated tokens a step reads (1: all; compaction: fewer)")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("ADAPTERS_LAB_DATA", ROOT.parent / "shared" / "data")) / "llm_adapters")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    tokenizer = build_tiny_tokenizer()
    prompts = [p for ps in suite_prompts(args.data_dir).values() for p in ps]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    result = {"questions": len(lengths), "mean_prompt_tokens": sum(lengths) / len(lengths),
              "tflops": args.tflops, "tbps": args.tbps, "live": args.live}
    for beams, cap in ((1, 256), (4, 128)):
        result[f"{beams}_beams"] = suite_floor(lengths, balanced_batches(order, cap), beams, args.new_tokens,
                                               args.tflops, args.tbps, args.live)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
