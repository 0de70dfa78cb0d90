"""Candidate kernels for the decoding step's masked few-query attention, timed on one GPU against
the SDPA kernel the decoder uses now, on LLaMA-7B's attention shape (32 heads of 128) and the
cache sizes of the math suite's batches (``scripts/bench_eval.py --step-profile`` measured them).

    python scripts/bench_step_attention.py --out step_attention.json

Each row: milliseconds for all 32 layers, key/value bytes read per second, and the largest
difference to the masked SDPA result (bf16). A GPU-only script; the decoder's own kernel choice
is made in ``adapters_lab/step_attention.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_lab.files import write_json_atomic  # noqa: E402
from adapters_lab.step_attention import attention_backend, cuda_milliseconds, few_query_attention  # noqa: E402

LAYERS, HEADS, DIM = 32, 32, 128
# (beams, prompts, prompt slots, generated slots visible): the suite's batches, last window (cache full)
CASES = [(4, 112, 186, 1024), (4, 112, 186, 512), (1, 256, 186, 256)]


def inputs(beams: int, prompts: int, prompt_slots: int, generated: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    slots = prompt_slots + generated
    query = torch.randn(prompts, HEADS, beams, DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
    key, value = (torch.randn(prompts, HEADS, slots, DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
                  for _ in range(2))
    mask = torch.zeros(prompts, 1, beams, slots, dtype=torch.bool, device="cuda")
    mask[..., 20:prompt_slots] = True  # left padding
    # Generated slot (step s, row r) seen by beam k iff r == (k + s) % beams: one slot per step, as an ancestry.
    step, row = (torch.arange(generated, device="cuda") // beams, torch.arange(generated, device="cuda") % beams)
    beam = torch.arange(beams, device="cuda").view(beams, 1)
    mask[:, 0, :, prompt_slots:] = row.view(1, -1) == (beam + step.view(1, -1)) % beams
    return query, key, value, mask


def flex_kernel(options: dict | None, mode: str | None):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False, mode=mode)

    def run(query, key, value, mask, scale):
        allowed = mask[:, 0]

        def masked(score, b, h, q, kv):
            return torch.where(allowed[b, q, kv], score, -float("inf"))

        return compiled(query, key, value, score_mod=masked, scale=scale, kernel_options=options)
    return run


def split_cudnn(prompt_slots: int):
    """Prompt slots and generated slots as two cuDNN calls, merged by their log-sum-exp."""
    def part(query, key, value, mask, scale):
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, -float("inf"))
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, bias, True, scale=scale)
        return out[0], out[1].reshape(*query.shape[:3], 1).float()

    def run(query, key, value, mask, scale):
        o1, l1 = part(query, key[:, :, :prompt_slots], value[:, :, :prompt_slots], mask[..., :prompt_slots], scale)
        o2, l2 = part(query, key[:, :, prompt_slots:], value[:, :, prompt_slots:], mask[..., prompt_slots:], scale)
        top = torch.maximum(l1, l2)
        w1, w2 = (l1 - top).exp(), (l2 - top).exp()
        return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(query.dtype)
    return run


def candidates(prompt_slots: int) -> dict:
    def sdpa(backend):
        def run(query, key, value, mask, scale):
            with attention_backend(backend):
                return few_query_attention(query, key, value, mask, scale)
        return run

    from torch.nn.attention import SDPBackend
    found = {"cudnn (now)": sdpa(SDPBackend.CUDNN_ATTENTION), "efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
             "unmasked (reference)": lambda q, k, v, m, s: F.scaled_dot_product_attention(q, k, v, scale=s),
             "split cudnn": split_cudnn(prompt_slots), "flex": flex_kernel(None, None)}
    for split in (1, 2, 4, 8, 16):
        found[f"flex SPLIT_KV={split}"] = flex_kernel({"SPLIT_KV": split}, None)
    for block_n, warps, stages in ((64, 4, 2), (128, 4, 2), (64, 8, 2), (128, 8, 3), (32, 4, 3)):
        found[f"flex BLOCK_N={block_n} warps={warps} stages={stages}"] = flex_kernel(
            {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}, None)
    found["flex max-autotune"] = flex_kernel(None, "max-autotune-no-cudagraphs")
    return found


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    for beams, prompts, prompt_slots, generated in CASES:
        query, key, value, mask = inputs(beams, prompts, prompt_slots, generated)
        scale, read = DIM**-0.5, 2 * key.numel() * key.element_size()
        reference = few_query_attention(query, key, value, mask, scale).float()
        case = {"beams": beams, "prompts": prompts, "prompt_slots": prompt_slots, "generated_slots": generated,
                "rows": {}}
        for name, kernel in candidates(prompt_slots).items():
            try:
                out = kernel(query, key, value, mask, scale)
                ms = cuda_milliseconds(lambda: kernel(query, key, value, mask, scale), repeats=7)
            except Exception as error:  # a candidate that does not take these inputs
                case["rows"][name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
                continue
            case["rows"][name] = {"ms_all_layers": ms * LAYERS, "kv_tb_per_s": read / ms / 1e9,
                                  "max_abs_diff": float((out.float() - reference).abs().max())}
            print(beams, prompts, prompt_slots, generated, name, json.dumps(case["rows"][name]), flush=True)
        result["cases"].append(case)
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
