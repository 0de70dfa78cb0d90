"""Time our evaluator against LLM-Adapters' procedure on the same model and GSM8K prompts.

Upstream's ``evaluate.py`` generates one example at a time with 4 beams (here also without the
KV cache, as the issue describes it); ours (``adapters_lab/decoding.py``) batches length-sorted,
left-padded prompts over a grouped KV cache with CUDA-graphed steps. Both run in this one process
on one random-init model of LLaMA-7B's shape in bf16 (``--tiny``: a tiny fp32 model on CPU, a
few prompts, for a smoke test), fed the first prompts of ``dataset/gsm8k/test.json`` through the
paper's evaluation template. ``--suite`` also times our evaluator over the whole math suite (all
seven test sets, 4,314 questions) as ``evaluate_sets`` runs sets of one budget of new tokens: one
``generate`` over all their questions (a row per decoding: ``questions``, ``minutes``). ``--check``
compares our tokens with ``generate``'s and our CUDA-graphed steps with the same steps run eagerly.

A random-init model never emits EOS, so every answer runs to the full 256 new tokens: the
extrapolation to the full math suite is an upper bound for a trained model, which stops earlier.
The tokenizer is the project's local byte-level BPE (no download), whose prompts are somewhat
longer than LLaMA's; the mean prompt length is reported.

    python scripts/bench_eval.py --out bench_eval.json              # on a GPU
    python scripts/bench_eval.py --out suite.json --suite 1,4 --prompts 0   # the whole suite, both decodings
    python scripts/bench_eval.py --tiny --out /tmp/bench_eval.json  # CPU smoke test

Prints a Markdown table and writes the same figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
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
from adapters_lab.decoding import Decoder, attention_backend, prompts_that_fit, step_backends  # noqa: E402
from adapters_lab.evaluate import free_gpu_bytes, generate, release_memory  # noqa: E402
from adapters_lab.files import write_json_atomic  # noqa: E402
from adapters_lab.models import build_tiny_model, build_tiny_tokenizer  # noqa: E402

# Test-set sizes of the math suite (gsm8k, AQuA, SVAMP, MultiArith, AddSub, SingleEq, mawps).
MATH_SUITE = {"gsm8k": 1319, "AQuA": 254, "SVAMP": 1000, "MultiArith": 600, "AddSub": 395, "SingleEq": 508, "mawps": 238}
MATH_SUITE_QUESTIONS = sum(MATH_SUITE.values())
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
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def suite_prompts(data_dir: Path) -> dict[str, list[str]]:
    """Every question of the math suite under the paper's template, per set."""
    prompts = {}
    for name in MATH_SUITE:
        path = data_dir / "dataset" / name / "test.json"
        prompts[name] = [eval_prompt(r["instruction"], r.get("input", "")) for r in read_json_records(path, "--data-dir")]
    return prompts


def check_decoder(model, tokenizer, prompts: list[str], max_new: int, device: torch.device) -> dict:
    """Our tokens vs transformers' ``generate`` (greedy and 4 beams), and CUDA-graphed vs eager steps.
    For scale, how often ``generate`` agrees with itself batched vs one prompt at a time (greedy): in
    bf16 neither is batch-invariant, and a random model's near-flat logits flip on rounding."""
    batched = generate(model, tokenizer, prompts, len(prompts), 1, max_new, device, "transformers")
    one_by_one = generate(model, tokenizer, prompts, 1, 1, max_new, device, "transformers")
    result = {"generate_batched_vs_one_by_one_1_beam": sum(a == b for a, b in zip(batched, one_by_one)) / len(prompts)}
    for beams in (1, 4):
        ours = generate(model, tokenizer, prompts, len(prompts), beams, max_new, device, "adapters_lab")
        reference = generate(model, tokenizer, prompts, len(prompts), beams, max_new, device, "transformers")
        result[f"same_text_as_generate_{beams}_beams"] = sum(a == b for a, b in zip(ours, reference)) / len(prompts)
    if device.type == "cuda":
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        slots = enc["input_ids"].shape[1]
        tokens = {graphs: Decoder(model, len(prompts), slots, 4, max_new, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                  cuda_graphs=graphs)(enc["input_ids"], enc["attention_mask"]) for graphs in (False, True)}
        result["cuda_graphs_equal_eager_4_beams"] = bool(torch.equal(tokens[False], tokens[True]))
    return result


def step_profile(model, tokenizer, prompt: str, args, max_new: int, device: torch.device) -> dict:
    """Milliseconds per decoding step (a replay of the last period's CUDA graph on a GPU, an eager
    step elsewhere) with the cache as full as the decoding left it, for greedy and 4 beams at their batch sizes, and the
    kernels taking the most time in one eager step."""
    tokenizer.padding_side = "left"
    enc = tokenizer([prompt], return_tensors="pt")
    slots = enc["input_ids"].shape[1]
    result = {}
    for beams, batch in ((1, args.batch_size), (4, args.beam_batch_size)):
        free = free_gpu_bytes(device)
        batch = min(batch, prompts_that_fit(model, slots, beams, max_new, free)) if free is not None else batch
        ids, mask = (t.expand(batch, -1) for t in (enc["input_ids"], enc["attention_mask"]))
        decoder = Decoder(model, batch, slots, beams, max_new, tokenizer.eos_token_id, tokenizer.pad_token_id)
        decoder(ids, mask)
        graph = decoder.graphs.get(decoder.slots.key)  # the last period's shape, as the decoding left it
        replay = graph.replay if graph is not None else decoder._step

        def last_step():  # the step counter advances on every step: back to the last one each time
            decoder.step.fill_(max_new - 1)
            replay()

        repeats = 20
        seconds = timed(lambda: [last_step() for _ in range(repeats)], device)
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            decoder.step.fill_(max_new - 1)
            decoder._step()  # eager, so the profiler sees each kernel
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=12)
        result[f"{beams}_beams"] = {"prompts": batch, "prompt_slots": slots,
                                    "attended_slots": decoder.first_generated + decoder.slots.visible,
                                    "ms_per_step": 1000 * seconds / repeats, "top_kernels": table.splitlines(),
                                    "attention": attention_bandwidth(decoder, device)}
        print(json.dumps({f"{beams}_beams": result[f"{beams}_beams"]}, indent=1), flush=True)
        del decoder, graph, replay, last_step  # the closures hold the decoder too
        release_memory(device)
    return result


def attention_bandwidth(decoder: Decoder, device: torch.device) -> dict:
    """One layer's decoding-step attention over the last period's cache: ours (the kernel the
    decoder chose), each kernel it chose from, and SDPA without the mask (``sdpa_unmasked``, a
    bandwidth reference, not a valid result): ms per step for all layers and key/value bytes read per second."""
    import torch.nn.functional as F

    from adapters_lab.decoding import few_query_attention

    keys, values = decoder.cache.keys[0], decoder.cache.values[0]
    visible = decoder.first_generated + decoder.slots.visible  # a prefix's slots, the prompt's, the generated
    keys, values = keys[:, :, :visible], values[:, :, :visible]
    prompts, kv_heads, _, dim = keys.shape
    heads = decoder.model.config.num_attention_heads
    query = torch.randn(prompts, heads, decoder.beams, dim, dtype=keys.dtype, device=device)
    mask = torch.ones(prompts, 1, decoder.beams, visible, dtype=torch.bool, device=device)
    mask[:, :, :, : decoder.first_generated] = decoder.prompt_mask[:, None, None]
    scale = dim**-0.5
    def attend(backend):
        with attention_backend(backend):
            return few_query_attention(query, keys, values, mask, scale)

    kernels = {"ours": lambda: attend(decoder.step_backend)}  # the kernel the decoder chose
    if device.type == "cuda":
        for backend in step_backends(keys.dtype):  # each candidate it chose from
            kernels[backend.name.lower()] = lambda backend=backend: attend(backend)
        kernels["sdpa_unmasked"] = lambda: F.scaled_dot_product_attention(query, keys, values, scale=scale,
                                                                          enable_gqa=heads != kv_heads)
    layers = decoder.model.config.num_hidden_layers
    read = 2 * keys.numel() * keys.element_size()
    result = {"chosen_backend": getattr(decoder.step_backend, "name", None)}
    reference = kernels["ours"]().float()
    for name, kernel in kernels.items():
        try:
            out = kernel()
        except Exception as error:  # a candidate kernel that does not take these inputs
            result[name] = {"error": str(error)[:300]}
            continue
        for _ in range(2):
            kernel()
        seconds = timed(lambda: [kernel() for _ in range(10)], device) / 10
        result[name] = {"ms_all_layers": 1000 * seconds * layers, "kv_gb_per_s": read / seconds / 1e9,
                        "max_abs_diff_to_ours": float((out.float() - reference).abs().max())}
    return result


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last ``timed`` began."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, a few prompts")
    parser.add_argument("--prompts", type=int, default=None,
                        help="GSM8K prompts for the side-by-side rows (default 64; tiny 4; 0: no side-by-side rows)")
    parser.add_argument("--upstream-prompts", type=int, default=None,
                        help="of those, how many the upstream loop runs (default 4, ~14 s each on an H100; tiny 2)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="our evaluator's batch (prompts), greedy, at most: fewer where their KV cache does not fit")
    parser.add_argument("--beam-batch-size", type=int, default=128, help="the same with 4 beams")
    parser.add_argument("--suite", default="", help="also time ours over the whole math suite: beams, e.g. 1,4")
    parser.add_argument("--check", type=int, default=0, help="compare our tokens with generate's on N prompts")
    parser.add_argument("--step-profile", action="store_true",
                        help="time one decoding step (greedy and 4 beams, at the batch sizes) and list its top kernels; "
                             "time --suite in another process (after the profile, an H200 run found its memory in use)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (the paper's); tiny 8")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("ADAPTERS_LAB_DATA", REPO.parent / "shared" / "data")) / "llm_adapters")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the evaluator logs its batch sizes
    n = (4 if args.tiny else 64) if args.prompts is None else args.prompts
    n_upstream = min(n, args.upstream_prompts or (2 if args.tiny else 4))
    max_new = args.max_new_tokens or (8 if args.tiny else 256)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    torch.manual_seed(0)

    tokenizer = build_tiny_tokenizer()
    prompts, source = load_prompts(args.data_dir, max(n, args.check, 1))
    model, description = build_model(args.tiny, device, tokenizer)
    prompt_tokens = [len(tokenizer(p)["input_ids"]) for p in prompts[: max(n, 1)]]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": description, "prompts_source": source, "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "max_new_tokens": max_new, "math_suite_questions": MATH_SUITE_QUESTIONS, "rows": [], "suite": [],
        "torch": torch.__version__,
    }
    # Warm-up (kernels, allocator) on one short prompt per procedure, not timed.
    generate(model, tokenizer, prompts[:1], 1, 1, 2, device)
    if args.check:
        result["check"] = check_decoder(model, tokenizer, prompts[: args.check], max_new, device)
        print(json.dumps(result["check"]))
    if n:
        upstream_generate(model, tokenizer, prompts[:1], 2, device)
        runs = [("ours", 4, args.beam_batch_size, prompts[:n]), ("ours", 1, args.batch_size, prompts[:n]),
                ("upstream", 4, 1, prompts[:n_upstream])]
        for procedure, beams, batch, subset in runs:
            if procedure == "ours":
                seconds = timed(lambda: generate(model, tokenizer, subset, batch, beams, max_new, device), device)
            else:
                seconds = timed(lambda: upstream_generate(model, tokenizer, subset, max_new, device), device)
            rate = len(subset) / seconds
            result["rows"].append({"procedure": procedure, "num_beams": beams, "batch_size": batch,
                                   "kv_cache": ("grouped, CUDA graphs" if device.type == "cuda" else "grouped")
                                   if procedure == "ours" else "none",
                                   "examples": len(subset), "seconds": seconds, "examples_per_s": rate,
                                   "math_suite_minutes": MATH_SUITE_QUESTIONS / rate / 60, "peak_gib": peak_gib(device)})
        upstream_rate = result["rows"][2]["examples_per_s"]
        result["speedup_4beam"] = result["rows"][0]["examples_per_s"] / upstream_rate
        result["speedup_greedy"] = result["rows"][1]["examples_per_s"] / upstream_rate
    if args.step_profile:
        result["step_profile"] = step_profile(model, tokenizer, prompts[0], args, max_new, device)
    if args.suite:
        questions = [prompt for prompts in suite_prompts(args.data_dir).values() for prompt in prompts]
        for beams in (int(b) for b in args.suite.split(",")):  # results written after each, so a cut-off run keeps them
            batch = args.batch_size if beams == 1 else args.beam_batch_size
            seconds = timed(lambda: generate(model, tokenizer, questions, batch, beams, max_new, device), device)
            result["suite"].append({"num_beams": beams, "batch_size": batch, "questions": len(questions),
                                    "minutes": seconds / 60, "peak_gib": peak_gib(device)})
            print(f"suite, {beams} beam(s), batch {batch}: {len(questions):,} questions in one generate, "
                  f"{seconds / 60:.2f} min", flush=True)
            write_json_atomic(args.out, result)
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
    if result["rows"]:
        lines += ["", f"Speed-up over upstream: {result['speedup_4beam']:.1f}x with 4 beams, "
                      f"{result['speedup_greedy']:.1f}x greedy."]
    for r in result["suite"]:
        lines.append(f"Whole math suite, ours, {r['num_beams']} beam(s), batch {r['batch_size']}: {r['questions']:,} "
                     f"questions in one generate, {r['minutes']:.2f} min.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
