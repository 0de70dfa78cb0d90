"""Time our decoder at several attention windows (``Decoder(window=...)``: the period of steps whose
slots a step attends, one CUDA graph per shape of the generated region), with and without the
compaction of dead beam slots between periods (``Decoder(compact=...)``), in one process on one
random-init model of LLaMA-7B's shape in bf16, on one batch of GSM8K test prompts (``--tiny``: a
tiny fp32 model on CPU, a smoke test). A smaller window reads fewer unfilled slots per step and
captures more graphs; compaction reads only the slots some running beam descends from.

Per decoding (greedy, 4 beams), window and compaction: the decoder's build (buffers, step-kernel
choice), a first batch (which captures the graphs), then one batch of ``--max-new-tokens`` steps
(median of ``--repeats``), the generated slots its last step read, and whether its tokens equal the
first configuration's (in float32 they must: what is attended does not change). Every decoder runs
its step attention on the kernel the first one chose.

    python scripts/bench_window.py --out window.json --windows 32 --compact on,off   # on a GPU
    python scripts/bench_window.py --tiny --out /tmp/window.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters_lab.decoding import Decoder, prompts_that_fit  # noqa: E402
from adapters_lab.evaluate import free_gpu_bytes, prompt_slots, release_memory  # noqa: E402
from adapters_lab.files import write_json_atomic  # noqa: E402
from adapters_lab.models import build_tiny_tokenizer  # noqa: E402
from scripts.bench_eval import build_model, load_prompts, timed  # noqa: E402


def one_window(model, tokenizer, enc, beams: int, max_new: int, window: int, compact: bool, repeats: int,
               device: torch.device, backend=None) -> tuple[dict, torch.Tensor, object]:
    """Build a decoder at ``window``, decode the batch once (capturing its graphs), then ``repeats`` timed
    times; its step attention on ``backend`` if given (the kernels tie, and a different pick rounds differently)."""
    slots = prompt_slots(enc["input_ids"].shape[1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    decoder = Decoder(model, enc["input_ids"].shape[0], slots, beams, max_new, tokenizer.eos_token_id,
                      tokenizer.pad_token_id, window=window, compact=compact)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build = time.perf_counter() - start
    decoder.step_backend = decoder.step_backend if backend is None else backend
    batches = []
    def decode():
        batches.append(decoder(enc["input_ids"], enc["attention_mask"]).cpu())

    first = timed(decode, device)
    times = sorted(timed(decode, device) for _ in range(repeats))
    tokens = batches[-1]
    result = {"window": window, "compact": compact, "graphs": len(decoder.graphs), "build_s": build,
              "first_batch_s": first, "batch_s": times[len(times) // 2],
              "generated_slots_last_step": decoder.slots.visible, "generated_slots_written": beams * max_new,
              "step_backend": getattr(decoder.step_backend, "name", None),
              "batches_agree": all(torch.equal(b, tokens) for b in batches)}  # the same decoder, the same batch
    backend = decoder.step_backend
    decoder = None  # its cache and graphs go before the next window's decoder is built
    release_memory(device)
    return result, tokens, backend


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, a few prompts")
    parser.add_argument("--beams", default="4,1", help="decodings to time, e.g. 4,1")
    parser.add_argument("--windows", default="32,16,8,64",
                        help="attention windows, in steps; the first is the reference")
    parser.add_argument("--compact", default="on", help="compaction of dead beam slots: on, off, or on,off")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per greedy batch at most")
    parser.add_argument("--beam-batch-size", type=int, default=128, help="prompts per 4-beam batch at most")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per window")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 256; tiny 8")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("ADAPTERS_LAB_DATA", REPO.parent / "shared" / "data")) / "llm_adapters")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    max_new = args.max_new_tokens or (8 if args.tiny else 256)
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "left"
    model, description = build_model(args.tiny, device, tokenizer)
    prompts, source = load_prompts(args.data_dir, 4 if args.tiny else max(args.batch_size, args.beam_batch_size))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": description,
              "prompts_source": source, "max_new_tokens": max_new, "torch": torch.__version__, "decodings": []}
    for beams in (int(b) for b in args.beams.split(",")):
        batch = min(len(prompts), args.batch_size if beams == 1 else args.beam_batch_size)
        enc = tokenizer(prompts[:batch], return_tensors="pt", padding=True)
        free = free_gpu_bytes(device)
        if free is not None:
            batch = min(batch, prompts_that_fit(model, prompt_slots(enc["input_ids"].shape[1]), beams, max_new, free))
            enc = tokenizer(prompts[:batch], return_tensors="pt", padding=True)
        row = {"num_beams": beams, "prompts": batch, "prompt_slots": prompt_slots(enc["input_ids"].shape[1]),
               "windows": []}
        reference = backend = None
        settings = [(int(w), c == "on") for w in args.windows.split(",") for c in args.compact.split(",")]
        for window, compact in settings:
            timing, tokens, backend = one_window(model, tokenizer, enc, beams, max_new, window, compact, args.repeats,
                                                 device, backend)
            reference = tokens if reference is None else reference
            timing["tokens_equal_first"] = bool(torch.equal(tokens, reference))
            timing["prompts_with_the_first_tokens"] = int((tokens == reference).all(dim=1).sum())
            row["windows"].append(timing)
            print(json.dumps({"num_beams": beams, **timing}), flush=True)
        result["decodings"].append(row)
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
