"""Flex attention's block mask for packed rows, built by the trainer from the batch's position ids.

Left to transformers, a packed batch's mask starts with ``find_packed_sequence_indices``, whose
``if (...).all()`` reads a device tensor on the host every forward: on a GPU the host then waits
for everything queued before (the previous step's backward and optimiser step) before it queues
this forward, so host and device take turns instead of overlapping. Here the same mask (causal,
no attention across examples: a segment starts where the position ids do not go up by one) is
built on the device without a read and passed as the ``attention_mask``, which transformers takes
as is. On CUDA ``create_block_mask`` is compiled once; with one batch shape per run (paper_packed)
it is not compiled again.

With a prefix (prefix tuning's ``n`` keys and values pre-filled into the cache) the keys are the
``n`` prefix slots, then the row's tokens: every query also sees all ``n`` prefix slots, as each
padded sequence does (``prefix``: the key offset). transformers takes a 4D mask as given, also with
a cache (``masking_utils._preprocess_mask_arguments`` returns it before reading the cache's sizes),
so the same layout goes to SDPA (boolean), eager (additive) and flex attention (``BlockMask``), and
under the prefix attention (``adapters/prefix.py``) to the attention it wraps, in that one's form.
"""

from __future__ import annotations

from functools import cache

import torch

from adapters_lab.adapters.base import PREFIX_PACKED_ATTENTION
from adapters_lab.adapters.prefix import base_attention

FLEX = "flex_attention"


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per token, the index of its segment in its row: a new one wherever the positions do not go up by one."""
    before_first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=before_first, dim=-1) != 1).cumsum(-1)


@cache
def compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def packed_block_mask(position_ids: torch.Tensor, prefix: int = 0):
    """The causal, per-segment ``BlockMask`` of packed rows of ``position_ids`` (no host read), over
    ``prefix`` slots every query sees, then the row's tokens."""
    from torch.nn.attention.flex_attention import create_block_mask

    documents = document_ids(position_ids)

    def same_segment_causal(batch, head, q, kv):
        return (documents[batch, q] == documents[batch, kv]) & (kv <= q)

    def prefix_or_same_segment_causal(batch, head, q, kv):
        token = kv - prefix  # negative: a prefix slot
        return (token < 0) | ((documents[batch, q] == documents[batch, token.clamp(min=0)]) & (token <= q))

    rows, length = position_ids.shape
    create = compiled_create_block_mask() if position_ids.device.type == "cuda" else create_block_mask
    mask_mod = prefix_or_same_segment_causal if prefix else same_segment_causal
    return create(mask_mod, rows, None, length, prefix + length, device=position_ids.device)


def packed_dense_mask(position_ids: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """The same attention as a boolean ``(rows, 1, T, prefix + T)`` tensor (True: attended)."""
    documents = document_ids(position_ids)
    at = torch.arange(position_ids.shape[1], device=position_ids.device)
    own = (documents[:, :, None] == documents[:, None, :]) & (at[:, None] >= at[None, :])
    return torch.cat([own.new_ones(*own.shape[:2], prefix), own], dim=-1)[:, None]


def packed_prefix_mask(model, position_ids: torch.Tensor, prefix: int):
    """The 4D mask of packed rows behind ``prefix`` cache slots, in the form ``model``'s attention
    takes: a ``BlockMask`` (flex attention), boolean (SDPA) or additive (eager, the model's dtype)."""
    implementation = base_attention(getattr(model.config, "_attn_implementation", None))
    if implementation not in PREFIX_PACKED_ATTENTION:
        raise ValueError(f"trainer.attn_implementation={implementation}: packed rows behind a prefix need an "
                         f"explicit 4D mask, which this attention does not take; use one of "
                         f"{', '.join(PREFIX_PACKED_ATTENTION)}")
    if implementation == FLEX:
        return packed_block_mask(position_ids, prefix)
    dense = packed_dense_mask(position_ids, prefix)
    if implementation == "sdpa":
        return dense
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(dense.shape, dtype=dtype, device=dense.device).masked_fill(~dense, torch.finfo(dtype).min)


def with_packed_block_mask(model, inputs: dict) -> dict:
    """``inputs`` with the block mask of its packed rows when ``model`` runs flex attention on a
    packed batch (position ids, no attention mask); else unchanged."""
    if getattr(model.config, "_attn_implementation", None) != FLEX or "position_ids" not in inputs \
            or inputs.get("attention_mask") is not None:
        return inputs
    return {**inputs, "attention_mask": packed_block_mask(inputs["position_ids"])}
