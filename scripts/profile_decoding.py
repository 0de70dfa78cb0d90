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
import functools
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


def run_batch(decoder: Decoder, enc, kernel_skips: bool = True) -> torch.Tensor:
    """One batch; ``kernel_skips`` false: the Triton step kernel reads every block, attended or not."""
    kernel = step_attention_kernel.few_query_attention_kernel
    if not kernel_skips:
        step_attention_kernel.few_query_attention_kernel = functools.partial(kernel, skip=False)
    try:
        return decoder(enc["input_ids"], enc["attention_mask"])
    finally:
        step_attention_kernel.few_query_attention_kernel = kernel


def phases(decoder: Decoder, enc, device, kernel_skips: bool = True) -> dict:
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
    run_batch(decoder, enc, kernel_skips)
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
        backend, norms, rotary, skip, moves = VARIANTS[name]
        try:
            decoder = Decoder(model, len(chunk), own, beams, 256, tokenizer.eos_token_id, tokenizer.pad_token_id)
            chosen = getattr(decoder.step_backend, "name", None)  # what the decoder picked by timing
            if device.type == "cuda" and backend is not None:
                decoder.step_backend = TRITON if backend == "triton" else SDPBackend.CUDNN_ATTENTION
            decoder.norms = decoder.norms if norms else []  # no fused norms: transformers' own
            decoder.rotary = decoder.rotary if rotary else []
            decoder.cache.write_kernel = decoder.slots.kernel = decoder.slots.kernel and moves
            first_phases = phases(decoder, enc, device, kernel_skips=skip)
            tokens = []
            batch = timed(lambda: tokens.append(run_batch(decoder, enc, skip).cpu()), device)
            reference = tokens[0] if reference is None else reference
            row[name] = {"first_batch_s": first_phases["total"], "first_batch_phases": first_phases,
                         "batch_s": batch, "graphs": len(decoder.graphs), "skips_blocks": skip,
                         "slot_kernels": decoder.slots.kernel,
                         "step_backend": getattr(decoder.step_backend, "name", None), "chosen_by_timing": chosen,
                         "fused_norms": bool(decoder.norms), "fused_rotary": bool(decoder.rotary),
                         "prompts_with_reference_tokens": int((tokens[0] == reference).all(1).sum())}
        except Exception as error:  # a variant that does not run: say why
            row[name] = {"error": repr(error)[:400]}
        print(json.dumps({"beams": beams, name: row[name]}), flush=True)
        decoder = None
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


# name: (step kernel: cudnn, triton, or None for the decoder's own timed pick; RMSNorms fused; rotary fused;
#        the Triton kernel skips unattended blocks; step writes and compactions by slot_kernels)
VARIANTS = {"before": ("cudnn", False, False, False, False), "triton_kernel": ("triton", False, False, False, False),
            "fused_norms": ("cudnn", True, False, False, False), "fused_rotary": ("cudnn", False, True, False, False),
            "without_rotary": (None, True, False, False, False), "with_rotary": (None, True, True, False, False),
            "skip_blocks": (None, True, True, True, False), "slot_kernels": (None, True, True, False, True),
            "decoder_default": (None, True, True, True, True)}
CONFIGS = ((64, 4, 3), (64, 4, 4), (32, 4, 4), (32, 2, 4))


def attended_blocks(mask: torch.Tensor, block: int = 64) -> int:
    """Blocks of ``block`` slots (all prompts) that some query of their prompt attends."""
    slots = mask.shape[-1]
    padded = torch.nn.functional.pad(mask.flatten(1, 2), (0, -slots % block))
    return int(padded.view(*padded.shape[:2], -1, block).any(-1).any(1).sum())


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
    rows, read = [], 2 * keys.numel() * keys.element_size()
    real_mask = decoder.step_mask(decoder.step - 2)  # the batch's last step, as the decoder ran it
    for skip in (False, True):  # that step's mask: every block read, or the attended ones only
        run = lambda: few_query_attention_kernel(query, keys, values, real_mask, dim**-0.5, skip=skip)  # noqa: E731
        ms = cuda_milliseconds(run, repeats=10)
        rows.append({"last_step_mask": True, "skip": skip, "ms_all_layers": ms * decoder.model.config.num_hidden_layers,
                     "kv_tb_per_s_if_all_read": read / ms / 1e9,
                     "attended_blocks": attended_blocks(real_mask), "blocks": -(-visible // 64) * prompts})
    for block, warps, stages in CONFIGS:
        try:
            run = lambda: few_query_attention_kernel(query, keys, values, mask, dim**-0.5, block, warps, stages)  # noqa: E731
            diff = float((run().float() - reference).abs().max())
            ms = cuda_milliseconds(run, repeats=10)
            rows.append({"block": block, "warps": warps, "stages": stages, "ms_all_layers": ms * decoder.model.config.num_hidden_layers,
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
