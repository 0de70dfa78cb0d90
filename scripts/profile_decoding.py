"""Where a decoding batch of the math suite spends its time, on one random-init LLaMA-7B shape in bf16.

For one batch of the suite as the evaluator plans it (``--batch-index``, longest prompts first), per
decoding, in this one process: the batch under each of ``VARIANTS`` (the step-attention kernel, and
whether the decoder's RMSNorms and rotary embedding run fused), each in its own decoder and with
whether its tokens equal the first variant's; optionally the batch in a decoder of ``--reuse-slots``
prompt slots (the evaluator reuses a decoder with up to ``REUSE_SLOTS`` more); then the phases of a
batch timed with a synchronisation around each (prefill, steps, compactions), the kernels of one
eager step of the last period (time and launches per kernel) and the step attention's kernels on
that period's cache.

    python scripts/profile_decoding.py --out profile.json --variants before,decoder_default   # on a GPU
    python scripts/profile_decoding.py --tiny --out /tmp/profile.json                         # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters_lab import evaluate, step_attention_kernel  # noqa: E402
from adapters_lab.decoding import Decoder  # noqa: E402
from adapters_lab.files import write_json_atomic  # noqa: E402
from adapters_lab.models import build_tiny_tokenizer  # noqa: E402
from adapters_lab.step_attention import TRITON, cuda_milliseconds  # noqa: E402
from scripts.bench_eval import attention_bandwidth, build_model, suite_prompts, timed  # noqa: E402


def synced(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def run_batch(decoder: Decoder, enc, read_window: bool = True, gap: bool = True) -> torch.Tensor:
    """One batch; ``read_window`` false: the Triton step kernel reads every visible slot; ``gap`` false:
    it reads the dead slots a compaction left too."""
    kernel = step_attention_kernel.few_query_attention_kernel

    def fewer_skips(*args, window=None, **kwargs):
        if window is not None and not gap:  # a gap of none: from the gap's end, which every prompt has
            read_from, _, gap_to, read_until = window
            window = read_from, gap_to.expand(read_from.shape).contiguous(), gap_to, read_until
        return kernel(*args, window=window if read_window else None, **kwargs)

    if not (read_window and gap):
        step_attention_kernel.few_query_attention_kernel = fewer_skips
    try:
        return decoder(enc["input_ids"], enc["attention_mask"])
    finally:
        step_attention_kernel.few_query_attention_kernel = kernel


def phases(decoder: Decoder, enc, device, read_window: bool = True, gap: bool = True) -> dict:
    """One batch with a synchronisation around each phase: seconds of prefill, steps (graph
    captures included), compactions, and of the steps' warm-ups and captures of new graphs."""
    spent = {"prefill": 0.0, "steps": 0.0, "compaction": 0.0, "capture_warm_up": 0.0, "capture": 0.0}
    names = ("_prefill", "_run_step", "_warm_up_step", "_capture")
    originals = [getattr(decoder, n) for n in names] + [decoder.slots.next_period]

    def wrap(name, fn):
        def inner(*args, **kwargs):
            start = synced(device)
            out = fn(*args, **kwargs)
            spent[name] += synced(device) - start
            return out
        return inner

    for n, phase, fn in zip(names, ("prefill", "steps", "capture_warm_up", "capture"), originals):
        setattr(decoder, n, wrap(phase, fn))
    decoder.slots.next_period = wrap("compaction", originals[-1])
    start = synced(device)
    run_batch(decoder, enc, read_window, gap)
    spent["total"] = synced(device) - start
    for n in names:
        delattr(decoder, n)
    del decoder.slots.next_period
    return spent


def kernels(decoder: Decoder, device) -> list[dict]:
    """Every kernel of one eager step of the last period (as the batch left the cache): name, calls, microseconds."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    decoder.step.fill_(decoder.steps - 1)
    decoder._step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        decoder.step.fill_(decoder.steps - 1)
        decoder._step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if us > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"name": event.key[:160], "calls": event.count, "us": us})
    return sorted(rows, key=lambda r: -r["us"])


def one_variant(variant: dict, model, tokenizer, enc, beams: int, slots: int, device) -> tuple[dict, torch.Tensor]:
    """A decoder of ``variant``'s levers (``VARIANTS``): its first batch by phase, a second batch timed, its tokens."""
    variant = {**DEFAULT, **variant}
    prompts = enc["input_ids"].shape[0]
    decoder = Decoder(model, prompts, slots, beams, 256, tokenizer.eos_token_id, tokenizer.pad_token_id,
                      window=variant["period"], lanes=variant["lanes"])
    if decoder.lanes is not None:
        decoder.lanes.turns = variant["turns"]
    chosen = getattr(decoder.step_backend, "name", None)  # what the decoder picked by timing
    if device.type == "cuda" and variant["kernel"] is not None:
        decoder.step_backend = TRITON if variant["kernel"] == "triton" else SDPBackend.CUDNN_ATTENTION
    decoder.norms = decoder.norms if variant["norms"] else []  # no fused norms: transformers' own
    decoder.rotary = decoder.rotary if variant["rotary"] else []
    decoder.fused = decoder.fused if variant["fused_layers"] else ([], [])
    if beams > 1:
        decoder.beam_search.two_top_ks = variant["two_top_ks"]
    decoder.cache.write_kernel = decoder.slots.kernel = decoder.slots.kernel and variant["slot_kernels"]
    first = phases(decoder, enc, device, variant["read_window"], variant["gap"])
    tokens = []
    batch = timed(lambda: tokens.append(run_batch(decoder, enc, variant["read_window"], variant["gap"]).cpu()), device)
    levers = {name: variant[name] for name in ("read_window", "gap", "two_top_ks", "lanes", "turns")}
    return {"first_batch_s": first["total"], "first_batch_phases": first, "batch_s": batch,
            "graphs": len(decoder.graphs), "period": decoder.slots.period, "slot_kernels": decoder.slots.kernel,
            "step_backend": getattr(decoder.step_backend, "name", None), "chosen_by_timing": chosen,
            "fused_norms": bool(decoder.norms), "fused_rotary": bool(decoder.rotary),
            "fused_layers": bool(decoder.fused[0]), **levers}, tokens[0]


def one_decoding(model, tokenizer, questions, beams, batch_size, index, reuse_slots, variants, device) -> dict:
    lengths = [len(tokenizer(p)["input_ids"]) for p in questions]
    order = sorted(range(len(questions)), key=lambda i: -lengths[i])
    free = evaluate.free_gpu_bytes(device)
    batches = evaluate.planned_batches(model, lengths, order, batch_size, beams, 256, free)
    chunk = batches[index]
    enc = tokenizer([questions[i] for i in chunk], return_tensors="pt", padding=True)
    own = evaluate.prompt_slots(enc["input_ids"].shape[1])
    row = {"num_beams": beams, "batches": len(batches), "batch_index": index, "prompts": len(chunk),
           "prompt_slots": own, "batch_prompt_slots": [evaluate.prompt_slots(max(lengths[i] for i in b)) for b in batches]}
    reference = None
    for name in variants:
        try:
            row[name], tokens = one_variant(VARIANTS[name], model, tokenizer, enc, beams, own, device)
            reference = tokens if reference is None else reference
            row[name]["prompts_with_reference_tokens"] = int((tokens == reference).all(1).sum())
        except Exception as error:  # a variant that does not run: say why
            row[name] = {"error": repr(error)[:400]}
        print(json.dumps({"beams": beams, name: row[name]}), flush=True)
        evaluate.release_memory(device)
    if reuse_slots > own:  # the batch in a larger decoder, as the evaluator reuses one
        decoder = Decoder(model, len(chunk), reuse_slots, beams, 256, tokenizer.eos_token_id, tokenizer.pad_token_id)
        timed(lambda: decoder(enc["input_ids"], enc["attention_mask"]), device)
        row[f"decoder_{reuse_slots}"] = {"batch_s": timed(lambda: decoder(enc["input_ids"], enc["attention_mask"]), device)}
        decoder = None
        evaluate.release_memory(device)
    decoder = Decoder(model, len(chunk), own, beams, 256, tokenizer.eos_token_id, tokenizer.pad_token_id)
    decoder(enc["input_ids"], enc["attention_mask"])  # captures its graphs
    row["phases"] = phases(decoder, enc, device)
    row["kernels"] = kernels(decoder, device) if device.type == "cuda" else []
    row["attention"] = attention_bandwidth(decoder, device)
    row["kernel_configs"] = kernel_configs(decoder, device)
    print(json.dumps({"phases": row["phases"], "kernel_configs": row["kernel_configs"]}), flush=True)
    for k in row["kernels"][:30]:
        print(f"{k['us']:10.0f} us {k['calls']:5d}  {k['name'][:110]}")
    decoder = None
    evaluate.release_memory(device)
    return row


# The decoder's levers: the step kernel (cudnn, triton, or None for the decoder's own timed pick), RMSNorms
# fused, rotary fused, the Triton kernel given the read window and the gap in it, step writes and compactions by slot_kernels,
# the period in steps, the residual adds fused into the norms after them and SwiGLU's SiLU product (fused_layers), beam
# search's continuations by two small top-k's or generate's one,
# a step's layers as lanes of prompts on their own streams (step_lanes), their attentions
# taking turns or not. A variant names what differs from the decoder's default.
DEFAULT = {"kernel": None, "norms": True, "rotary": True, "read_window": True, "gap": True, "slot_kernels": True,
           "period": None, "fused_layers": True, "two_top_ks": True, "lanes": 1, "turns": True}
NONE_NEW = {"read_window": False, "gap": False, "slot_kernels": False, "period": 32, "fused_layers": False,
            "two_top_ks": False}  # the decoder at 9b7ca8c
VARIANTS = {"before": {"kernel": "cudnn", "norms": False, "rotary": False, **NONE_NEW},
            "triton_kernel": {"kernel": "triton", "norms": False, "rotary": False, **NONE_NEW},
            "fused_norms": {"kernel": "cudnn", "rotary": False, **NONE_NEW},
            "fused_rotary": {"kernel": "cudnn", "norms": False, **NONE_NEW},
            "without_rotary": {"rotary": False, **NONE_NEW}, "with_rotary": NONE_NEW,
            "read_window": {"slot_kernels": False}, "slot_kernels": {"read_window": False}, "no_gap": {"gap": False},
            "no_fused_layers": {"fused_layers": False}, "one_top_k": {"two_top_ks": False},
            "period_8": {"period": 8}, "period_16": {"period": 16}, "period_32": {"period": 32}, "period_64": {"period": 64},
            "lanes_2": {"lanes": 2}, "lanes_2_free": {"lanes": 2, "turns": False}, "lanes_4": {"lanes": 4},
            "decoder_default": {}}
CONFIGS = ((64, 4, 3), (64, 4, 4), (32, 4, 4), (32, 2, 4))


def kernel_configs(decoder: Decoder, device) -> list[dict]:
    """The Triton step kernel at each (block, warps, stages) on one layer of the last period's cache."""
    from adapters_lab.step_attention_kernel import few_query_attention_kernel
    if device.type != "cuda":
        return []
    visible = decoder.first_generated + decoder.slots.visible
    keys, values = decoder.cache.keys[0, :, :, :visible], decoder.cache.values[0, :, :, :visible]
    prompts, heads, _, dim = keys.shape
    query = torch.randn(prompts, heads, decoder.beams, dim, dtype=keys.dtype, device=device)
    mask = torch.rand(prompts, 1, decoder.beams, visible, device=device) < 0.5
    mask[..., 0] = True
    reference = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask).float()
    rows, read, layers = [], 2 * keys.numel() * keys.element_size(), decoder.model.config.num_hidden_layers
    # The last period's cache as a step halfway through the period sees it: with the read window, and without.
    mid_mask, half = decoder.step_mask(decoder.step - 2).clone(), visible - decoder.slots.segment // 2
    mid_mask[..., half:] = False
    window = (decoder.read_from, decoder.slots.gap_from, decoder.slots.gap_to, torch.tensor(half, dtype=torch.int32, device=device))
    for given in (None, window):
        ms = cuda_milliseconds(lambda: few_query_attention_kernel(query, keys, values, mid_mask, dim**-0.5, window=given), 10)
        rows.append({"mid_period_step": True, "read_window": given is not None, "ms_all_layers": ms * layers,
                     "slots_in_window": int((half - decoder.read_from - (decoder.slots.gap_to - decoder.slots.gap_from)).sum()),
                     "slots": visible * prompts})
    for block, warps, stages in CONFIGS:
        try:
            run = lambda: few_query_attention_kernel(query, keys, values, mask, dim**-0.5, block, warps, stages)  # noqa: E731
            diff = float((run().float() - reference).abs().max())
            ms = cuda_milliseconds(run, repeats=10)
            rows.append({"block": block, "warps": warps, "stages": stages, "ms_all_layers": ms * layers,
                         "kv_tb_per_s": read / ms / 1e9, "max_abs_diff_to_sdpa": diff})
        except Exception as error:
            rows.append({"block": block, "warps": warps, "stages": stages, "error": repr(error)[:300]})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--beams", default="4,1")
    parser.add_argument("--batch-index", type=int, default=12)
    parser.add_argument("--reuse-slots", type=int, default=0, help="also time the batch in a decoder of this many prompt slots")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="of " + ", ".join(VARIANTS))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, a few prompts")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("ADAPTERS_LAB_DATA", REPO.parent / "shared" / "data")) / "llm_adapters")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "left"
    model, description = build_model(args.tiny, device, tokenizer)
    questions = [p for ps in suite_prompts(args.data_dir).values() for p in ps]
    questions = questions[:: 200] if args.tiny else questions
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": description, "torch": torch.__version__,
              "decodings": []}
    for beams in (int(b) for b in args.beams.split(",")):
        batch_size = (128 if beams > 1 else 256) if not args.tiny else 8
        index = args.batch_index if beams > 1 else args.batch_index // 2
        result["decodings"].append(one_decoding(model, tokenizer, questions, beams, batch_size, index,
                                                args.reuse_slots, args.variants.split(","), device))
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
