"""Time our evaluator against LLM-Adapters' procedure on the same model and GSM8K prompts.

Upstream's ``evaluate.py`` generates one example at a time with 4 beams (here also without the
KV cache, as the issue describes it); ours batches length-sorted, left-padded prompts with an
attention mask and the KV cache. Both run in this one process on one random-init model of
LLaMA-7B's shape in bf16 (``--tiny``: a tiny fp32 model on CPU, a few prompts, for a smoke test),
fed the first prompts of ``dataset/gsm8k/test.json`` through the paper's evaluation template.

A random-init model never emits EOS, so every answer runs to the full 256 new tokens: the
extrapolation to the full math suite is an upper bound for a trained model, which stops earlier.
The tokenizer is the project's local byte-level BPE (no download), whose prompts are somewhat
longer than LLaMA's; the mean prompt length is reported.

    python scripts/bench_eval.py --out bench_eval.json              # on a GPU
    python scripts/bench_eval.py --tiny --out /tmp/bench_eval.json  # CPU smoke test

Prints a Markdown table and writes the same figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters_lab.config import TinyModelConfig  # noqa: E402
from adapters_lab.data.arith import arith_splits  # noqa: E402
from adapters_lab.data.prompts import RESPONSE_MARKER, eval_prompt  # noqa: E402
from adapters_lab.data.records import read_json_records  # noqa: E402
from adapters_lab.evaluate import generate  # noqa: E402
from adapters_lab.files import write_json_atomic  # noqa: E402
from adapters_lab.models import build_tiny_model, build_tiny_tokenizer  # noqa: E402

# Test-set sizes of the math suite (gsm8k, AQuA, SVAMP, MultiArith, AddSub, SingleEq, mawps).
MATH_SUITE_QUESTIONS = 1319 + 254 + 1000 + 600 + 395 + 508 + 238
LLAMA_7B_SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)


def load_prompts(data_dir: Path, n: int) -> tuple[list[str], str]:
    """The first ``n`` GSM8K test questions as evaluation prompts (synthetic arithmetic if absent)."""
    path = data_dir / "dataset" / "gsm8k" / "test.json"
    if path.is_file():
        records = read_json_records(path, "--data-dir")[:n]
        return [eval_prompt(r["instruction"], r.get("input", "")) for r in records], str(path)
    print(f"warning: {path} not found; using synthetic arithmetic prompts", file=sys.stderr)
    records = arith_splits(n, 1, 20, 1234)[0]
    return [eval_prompt(r["instruction"]) for r in records], "arith (synthetic; GSM8K file not found)"


def build_model(tiny: bool, device: torch.device, tokenizer) -> tuple[torch.nn.Module, str]:
    if tiny:
        model = build_tiny_model(TinyModelConfig(), tokenizer, torch.float32, "sdpa")
        description = "tiny random-init LLaMA (hidden 48, 3 layers), fp32"
    else:
        config = AutoConfig.for_model("llama", **LLAMA_7B_SHAPE, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        config._attn_implementation = "sdpa"
        with torch.device(device):  # initialise on the GPU: minutes faster than on the CPU
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        description = "random-init LLaMA-7B shape (32 layers, hidden 4096, vocab 32000), bf16"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), description


@torch.no_grad()
def upstream_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, device: torch.device) -> list[str]:
    """LLM-Adapters' ``evaluate.py`` loop: one prompt at a time, input ids only, 4 beams with its
    sampling settings (inert without do_sample), the full sequence decoded and split at the marker."""
    outputs = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        config = GenerationConfig(temperature=0.1, top_p=0.75, top_k=40, num_beams=4, use_cache=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        result = model.generate(input_ids=input_ids, generation_config=config, return_dict_in_generate=True,
                                output_scores=True, max_new_tokens=max_new_tokens)
        outputs.append(tokenizer.decode(result.sequences[0]).split(RESPONSE_MARKER)[1].strip())
    return outputs


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, a few prompts")
    parser.add_argument("--prompts", type=int, default=None, help="prompts for our evaluator (default 64; tiny 4)")
    parser.add_argument("--upstream-prompts", type=int, default=None,
                        help="of those, how many the upstream loop runs (default 16, ~8 s each on an H100; tiny 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="our evaluator's batch, greedy")
    parser.add_argument("--beam-batch-size", type=int, default=None, help="our batch with 4 beams (default: --batch-size)")
    parser.add_argument("--static-cache", action="store_true",
                        help="also time our greedy evaluator with eval.cache_implementation=static (compiled decoding)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (the paper's); tiny 8")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("ADAPTERS_LAB_DATA", REPO.parent / "shared" / "data")) / "llm_adapters")
    args = parser.parse_args(argv)
    n = args.prompts or (4 if args.tiny else 64)
    n_upstream = min(n, args.upstream_prompts or (2 if args.tiny else 16))
    max_new = args.max_new_tokens or (8 if args.tiny else 256)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    torch.manual_seed(0)

    tokenizer = build_tiny_tokenizer()
    prompts, source = load_prompts(args.data_dir, n)
    model, description = build_model(args.tiny, device, tokenizer)
    prompt_tokens = [len(tokenizer(p)["input_ids"]) for p in prompts]

    beam_batch = args.beam_batch_size or args.batch_size
    runs = [("ours", 4, beam_batch, "dynamic", prompts), ("ours", 1, args.batch_size, "dynamic", prompts),
            ("upstream", 4, 1, None, prompts[:n_upstream])]
    if args.static_cache:
        runs.append(("ours", 1, args.batch_size, "static", prompts))
    # Warm-up (kernels, allocator) on one short prompt per procedure, not timed.
    generate(model, tokenizer, prompts[:1], 1, 1, 2, device)
    upstream_generate(model, tokenizer, prompts[:1], 2, device)
    rows = []
    for procedure, beams, batch, cache, subset in runs:
        if procedure == "ours":
            if cache == "static":  # first call compiles the decoding step: not timed
                generate(model, tokenizer, subset[:batch], batch, beams, max_new, device, cache)
            seconds = timed(lambda: generate(model, tokenizer, subset, batch, beams, max_new, device, cache), device)
        else:
            seconds = timed(lambda: upstream_generate(model, tokenizer, subset, max_new, device), device)
        rate = len(subset) / seconds
        rows.append({"procedure": procedure, "num_beams": beams, "batch_size": batch, "kv_cache": cache or "none",
                     "examples": len(subset), "seconds": seconds, "examples_per_s": rate,
                     "math_suite_minutes": MATH_SUITE_QUESTIONS / rate / 60})
    upstream_rate = rows[2]["examples_per_s"]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": description, "prompts_source": source, "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "max_new_tokens": max_new, "math_suite_questions": MATH_SUITE_QUESTIONS, "rows": rows,
        "speedup_4beam": rows[0]["examples_per_s"] / upstream_rate,
        "speedup_greedy": rows[1]["examples_per_s"] / upstream_rate,
        "torch": torch.__version__,
    }
    write_json_atomic(args.out, result)
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [
        f"Device: {result['device']}; model: {result['model']}; prompts: {result['prompts_source']} "
        f"(mean {result['mean_prompt_tokens']:.0f} tokens); max new tokens {result['max_new_tokens']}.",
        "",
        "| procedure | beams | batch | KV cache | examples | seconds | examples/s | full math suite "
        f"({result['math_suite_questions']:,} q), min |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['procedure']} | {r['num_beams']} | {r['batch_size']} | {r['kv_cache']} "
                     f"| {r['examples']} | {r['seconds']:.2f} | {r['examples_per_s']:.3f} | {r['math_suite_minutes']:.1f} |")
    lines += ["", f"Speed-up over upstream: {result['speedup_4beam']:.1f}x with 4 beams, "
                  f"{result['speedup_greedy']:.1f}x greedy (dynamic cache)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
