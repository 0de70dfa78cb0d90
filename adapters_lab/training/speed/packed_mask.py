"""Flex attention's block mask for packed rows, built by the trainer from the batch's position ids.

Left to transformers, a packed batch's mask starts with ``find_packed_sequence_indices``, whose
``if (...).all()`` reads a device tensor on the host every forward: on a GPU the host then waits
for everything queued before (the previous step's backward and optimiser step) before it queues
this forward, so host and device take turns instead of overlapping. Here the same mask (causal,
no attention across examples: a segment starts where the position ids do not go up by one) is
built on the device without a read and passed as the ``attention_mask``, which transformers takes
as is. On CUDA ``create_block_mask`` is compiled once; with one batch shape per run (paper_packed)
it is not compiled again.
"""

from __future__ import annotations

from functools import cache

import torch

FLEX = "flex_attention"


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per token, the index of its segment in its row: a new one wherever the positions do not go up by one."""
    before_first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=before_first, dim=-1) != 1).cumsum(-1)


@cache
def compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def packed_block_mask(position_ids: torch.Tensor):
    """The causal, per-segment ``BlockMask`` of packed rows of ``position_ids`` (no host read)."""
    from torch.nn.attention.flex_attention import create_block_mask

    documents = document_ids(position_ids)

    def same_segment_causal(batch, head, q, kv):
        return (documents[batch, q] == documents[batch, kv]) & (kv <= q)

    rows, length = position_ids.shape
    create = compiled_create_block_mask() if position_ids.device.type == "cuda" else create_block_mask
    return create(same_segment_causal, rows, None, length, length, device=position_ids.device)


def with_packed_block_mask(model, inputs: dict) -> dict:
    """``inputs`` with the block mask of its packed rows when ``model`` runs flex attention on a
    packed batch (position ids, no attention mask); else unchanged."""
    if getattr(model.config, "_attn_implementation", None) != FLEX or "position_ids" not in inputs \
            or inputs.get("attention_mask") is not None:
        return inputs
    return {**inputs, "attention_mask": packed_block_mask(inputs["position_ids"])}
