"""A Triton kernel for the decoding step's masked few-query attention (the ``TRITON`` step kernel).

A decoding step attends a handful of query rows per key/value head (the beams of a prompt, times
the query heads sharing that key/value head) to the prompt's whole cache row, under a mask that
differs per beam. SDPA's kernels tile queries by 64 or more rows and read an additive mask beside
the keys; under 4 beams' masks its cuDNN kernel read the cache at 2.5 TB/s on an H200 where the
same read without a mask ran at 4.1 (docs/benchmarks.md). This kernel runs one program per
(prompt, key/value head): it loads the few queries once, streams the keys and values in blocks
of ``BLOCK`` slots with an online softmax, and reads the mask as one byte per query and slot.
Given a read window (``window``, device tensors: each prompt's first attended slot, a gap of slots no
query attends, and the end of the written slots), it reads only the slots inside it, skipping the gap:
not the current period's unwritten slots, a left-padded prompt's padding, nor the dead slots a prompt
carries after a compaction (up to the live count of the prompt with the most), which the mask covers
anyway. (Testing each block's mask and predicating its loads off instead ran 5% slower on a full
cache of the 7B shape: docs/benchmarks.md.)

The cache is read in place through its strides (a view of the decoder's cache, no copy). Queries
are padded to 16 rows for ``tl.dot``; a row that attends nothing gives zeros, not NaN.
``tests/test_step_attention_kernel.py`` runs it under Triton's CPU interpreter against SDPA.
"""

from __future__ import annotations

import torch

try:  # CUDA builds of torch ship triton; the CPU wheel does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 64  # key/value slots per iteration
WARPS, STAGES = 4, 3  # launch settings of the kernel (H200: see docs/benchmarks.md)


def available() -> bool:
    """Whether the kernel can run here (triton importable)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _few_query_attention(q, k, v, mask, out, slots, scale, read_from, gap_from, gap_to, read_until,
                             q_b, q_h, q_r, k_b, k_h, k_s, v_b, v_h, v_s, m_b, m_r, m_s, o_b, o_h, o_r,
                             kv_heads, queries, DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                             WINDOW: tl.constexpr):
        program = tl.program_id(0).to(tl.int64)  # offsets past 2**31 in large caches
        b, h = program // kv_heads, program % kv_heads
        rows, dims, cols = tl.arange(0, ROWS), tl.arange(0, DIM), tl.arange(0, BLOCK)
        real_row = rows < queries
        query = tl.load(q + b * q_b + h * q_h + rows[:, None] * q_r + dims[None, :], mask=real_row[:, None], other=0.0)
        best = tl.full((ROWS,), float("-inf"), tl.float32)
        total = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, DIM), tl.float32)
        lo, before_gap, after_gap, hi = 0, slots, slots, slots
        if WINDOW:  # the slots before ``lo``, in the gap and from ``hi`` on are masked for every query: not read
            lo = tl.load(read_from + b).to(tl.int32)
            before_gap = tl.load(gap_from + b).to(tl.int32) - lo
            after_gap = tl.load(gap_to).to(tl.int32)
            hi = tl.minimum(tl.load(read_until).to(tl.int32), slots)
        count = before_gap + hi - after_gap  # slots read: j < before_gap at lo + j, the rest after the gap
        for start in range(0, count, BLOCK):
            j = start + cols
            inside = j < count
            slot = tl.where(j < before_gap, lo + j, after_gap + j - before_gap)
            key = tl.load(k + b * k_b + h * k_h + slot[:, None] * k_s + dims[None, :], mask=inside[:, None], other=0.0)
            seen = tl.load(mask + b * m_b + rows[:, None] * m_r + slot[None, :] * m_s,
                           mask=real_row[:, None] & inside[None, :], other=0)
            scores = tl.dot(query, tl.trans(key)) * scale
            scores = tl.where(seen != 0, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)  # a row with nothing seen yet
            weights = tl.exp(scores - safe[:, None])
            rescale = tl.exp(best - safe)
            total = total * rescale + tl.sum(weights, 1)
            value = tl.load(v + b * v_b + h * v_h + slot[:, None] * v_s + dims[None, :], mask=inside[:, None], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(weights.to(value.dtype), value)
            best = new_best
        result = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        tl.store(out + b * o_b + h * o_h + rows[:, None] * o_r + dims[None, :], result.to(out.dtype.element_ty),
                 mask=real_row[:, None])


def few_query_attention_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                               scale: float, block: int = BLOCK, warps: int = WARPS, stages: int = STAGES,
                               window: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """``(b, kv_heads, rows, d)`` queries (the rows of a key/value head: its query heads' beams)
    against ``(b, kv_heads, slots, d)`` keys and values (any strides, last dimension contiguous)
    under a ``(b, 1, rows, slots)`` boolean mask (True: attend); ``(b, kv_heads, rows, d)`` out.
    ``window``: device tensors ``(read_from, gap_from, gap_to, read_until)``, the first two ``(b,)``,
    the others scalars: the mask is False for every query of prompt ``p`` before ``read_from[p]``, from
    ``gap_from[p]`` to ``gap_to`` and from ``read_until`` on; those slots are not read."""
    if triton is None:
        raise RuntimeError("the triton step kernel needs the triton package (CUDA builds of torch ship it)")
    batch, kv_heads, queries, dim = query.shape
    slots = key.shape[2]
    if dim & (dim - 1) or dim < 16 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise RuntimeError(f"the triton step kernel takes a power-of-two head dim >= 16 with unit stride; got {dim}, "
                           f"strides {key.stride(-1)} and {value.stride(-1)}")
    query = query if query.stride(-1) == 1 else query.contiguous()
    mask = mask.to(torch.bool)
    out = torch.empty_like(query)
    rows = max(16, triton.next_power_of_2(queries))
    read_from, gap_from, gap_to, read_until = window if window is not None else (mask,) * 4  # unused without
    _few_query_attention[(batch * kv_heads,)](
        query, key, value, mask, out, slots, scale, read_from, gap_from, gap_to, read_until,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask.stride(0), mask.stride(2), mask.stride(3),
        out.stride(0), out.stride(1), out.stride(2), kv_heads, queries,
        DIM=dim, ROWS=rows, BLOCK=block, WINDOW=window is not None, num_warps=warps, num_stages=stages)
    return out
