"""Triton kernels that move rows of the decoder's KV cache: a decoding step's cache write and the
compaction between periods (``generated_slots``), on a GPU.

- ``write_step``: a step's keys and values, one row per beam and key/value head, into their slots
  of one layer's K and V cache in one launch (a program per prompt and block of heads).
  ``index_copy_`` took two launches of about 10 us a layer for 4 MB each on an H200 (an element per
  thread; docs/benchmarks.md).
- ``compact``: every layer's K and V rows of each prompt's live slots moved to the front of its
  generated region, in order, in one launch: a program per (layer, prompt, key/value head) copies
  the slots ``order`` names block by block, in place. In place is safe for the live slots: the
  ``j``-th live slot sits at ``j`` or after it, and a block's writes all land before the slots the
  next blocks read. Slots past a prompt's live count (it carries dead ones up to the batch's
  ``kept``) get some slot's finite contents, never attended (the slot tables say they are dead).
  The gathers it replaces read each region three times, in 256 launches for the 7B shape.

``tests/test_slot_kernels.py`` runs both under Triton's CPU interpreter against ``index_copy_`` and
``torch.gather``, and a decoder using them choosing ``generate``'s tokens.
"""

from __future__ import annotations

import torch

try:  # CUDA builds of torch ship triton; the CPU wheel does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 32  # slots per iteration of the compaction
WRITE_ROWS = 32  # (head, beam) rows per program of a step's write


def available() -> bool:
    """Whether the kernels can run here (triton importable)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _write_step(key, value, keys, values, slots, heads, beams, s_r, s_h, vs_r, vs_h,
                    c_p, c_h, c_s, vc_p, vc_h, vc_s, DIM: tl.constexpr, BEAMS: tl.constexpr, HEADS: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)  # offsets past 2**31 in large caches
        i, dims = tl.arange(0, HEADS * BEAMS), tl.arange(0, DIM)
        h, beam = tl.program_id(1) * HEADS + i // BEAMS, i % BEAMS  # a row per (head, beam) of this block
        real = (beam < beams) & (h < heads)
        slot = tl.load(slots + beam, mask=real, other=0)
        row = p * beams + beam  # the source row of beam k of prompt p
        k = tl.load(key + row[:, None] * s_r + h[:, None] * s_h + dims[None, :], mask=real[:, None])
        v = tl.load(value + row[:, None] * vs_r + h[:, None] * vs_h + dims[None, :], mask=real[:, None])
        tl.store(keys + p * c_p + h[:, None] * c_h + slot[:, None] * c_s + dims[None, :], k.to(keys.dtype.element_ty),
                 mask=real[:, None])
        tl.store(values + p * vc_p + h[:, None] * vc_h + slot[:, None] * vc_s + dims[None, :],
                 v.to(values.dtype.element_ty), mask=real[:, None])

    @triton.jit
    def _compact(keys, values, order, first, kept, prompts, heads, o_p, c_l, c_p, c_h, c_s,
                 DIM: tl.constexpr, BLOCK: tl.constexpr):
        program = tl.program_id(0).to(tl.int64)  # a 7B cache has more than 2**31 elements
        h = program % heads
        p = (program // heads) % prompts
        layer = program // (heads * prompts)
        row = layer * c_l + p * c_p + h * c_h
        cols, dims = tl.arange(0, BLOCK), tl.arange(0, DIM)
        for start in range(0, kept, BLOCK):
            slot = start + cols
            inside = slot < kept
            source = tl.load(order + p * o_p + slot, mask=inside, other=0)
            src = row + (first + source)[:, None] * c_s + dims[None, :]
            dst = row + (first + slot)[:, None] * c_s + dims[None, :]
            k = tl.load(keys + src, mask=inside[:, None])
            v = tl.load(values + src, mask=inside[:, None])
            tl.store(keys + dst, k, mask=inside[:, None])
            tl.store(values + dst, v, mask=inside[:, None])


def write_step(key_states: torch.Tensor, value_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               slots: torch.Tensor) -> None:
    """``(prompts * beams, heads, 1, d)`` keys and values of one step (beam ``k`` of prompt ``p`` in
    row ``p * beams + k``) into slots ``slots[k]`` (``(beams,)``, on the device) of ``keys`` and
    ``values`` (``(prompts, heads, slots, d)``, any strides with the last one 1)."""
    rows, heads, q_len, dim = key_states.shape
    prompts, beams = keys.shape[0], slots.shape[0]
    if q_len != 1 or rows != prompts * beams or dim & (dim - 1) or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError(f"write_step takes one token per beam, a power-of-two head dim and unit strides; got "
                         f"{tuple(key_states.shape)} into {tuple(keys.shape)} at {beams} slots")
    key_states = key_states if key_states.stride(-1) == 1 else key_states.contiguous()
    value_states = value_states if value_states.stride(-1) == 1 else value_states.contiguous()
    padded = triton.next_power_of_2(beams)
    per_program = max(1, WRITE_ROWS // padded)  # heads a program writes: about WRITE_ROWS rows of d
    _write_step[(prompts, triton.cdiv(heads, per_program))](
        key_states, value_states, keys, values, slots, heads, beams,
        key_states.stride(0), key_states.stride(1), value_states.stride(0), value_states.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        DIM=dim, BEAMS=padded, HEADS=per_program, num_warps=4)


def compact(keys: torch.Tensor, values: torch.Tensor, order: torch.Tensor, first: int) -> None:
    """In every layer, prompt and head of ``keys`` and ``values`` (``(layers, prompts, heads, slots,
    d)``, the same strides), slot ``first + j`` gets slot ``first + order[p, j]`` for ``j`` below
    ``order.shape[1]``; ``order[p]`` lists prompt ``p``'s live slots first, ascending."""
    layers, prompts, heads, _, dim = keys.shape
    if keys.stride() != values.stride() or keys.stride(-1) != 1 or dim & (dim - 1):
        raise ValueError(f"compact takes K and V caches of one layout, unit stride, power-of-two head dim; got "
                         f"{keys.stride()} and {values.stride()}, d={dim}")
    order = order.contiguous()
    _compact[(layers * prompts * heads,)](
        keys, values, order, first, order.shape[1], prompts, heads, order.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        DIM=dim, BLOCK=BLOCK, num_warps=4, num_stages=1)
