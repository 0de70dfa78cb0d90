"""Shared machinery of prompt tuning and prefix tuning: ``num_virtual_tokens`` positions that sit
before every sequence, in the KV cache (prefix) or as input embeddings (prompt).

The model object is never replaced: a forward pre-hook on the causal LM rewrites the call's
arguments, so ``model(**batch).loss``, ``model.generate(...)`` and ``model.named_parameters()``
work unchanged. On every call the attention mask gains ``num_virtual_tokens`` ones in front and
``cache_position`` is dropped, so the model counts positions from the cache, which holds the
virtual tokens too. Position ids are rebuilt from that mask (``cumsum - 1``), so a left-padded
prompt gets the same positions as the unpadded one, in training and in every generation step.
With an all-ones mask this is exactly HF PEFT's layout (virtual tokens at 0..n-1).

Packed rows (several sequences a row, position ids restarting per sequence) are refused, except
where the caller says explicitly how the row is laid out: ``PACKED_ROWS=True`` among the call's
keywords (the trainer's ``trainer.batching=paper_packed`` path for prefix tuning) with a 4D
attention mask over the ``n`` prefix slots and then the row's tokens (every query sees all the
prefix slots and its own sequence's earlier tokens: ``training/speed/packed_mask.py``) and each
sequence's own position ids from 0. The hook then adds ``n`` to the position ids (each sequence's
tokens at n..n+L-1, as in a padded batch) and the method hands the prefix to the layers: through
the cache, or without it under the prefix attention (``prefix.py``'s docstring). Prompt tuning's
virtual tokens are input positions, one set per sequence, which a packed row cannot hold: refused
there too.

A caller that lays out the virtual tokens itself (our decoder writes the prefix into its own cache
and passes 4D masks) runs the model inside ``hooks_suspended(model)``, where the hooks do nothing.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

import torch
import torch.nn as nn

from adapters_lab.models import call_cache


class VirtualTokenModule(nn.Module):
    """The trainable module of a virtual-token method, added to the causal LM as a child; it holds
    ``num_virtual_tokens``, so code holding only the model (the decoder's ``supports``) can see them."""

    def __init__(self, num_virtual_tokens: int):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens


def count(model: nn.Module) -> int:
    """How many virtual tokens the model's injected methods put before every sequence."""
    return sum(m.num_virtual_tokens for m in model.children() if isinstance(m, VirtualTokenModule))


PACKED_ROWS = "virtual_tokens_packed_rows"  # a call keyword, removed by the hook: see the module docstring
SUSPENDED = "_virtual_tokens_suspended"  # a model attribute: True inside ``hooks_suspended``


@contextlib.contextmanager
def hooks_suspended(model: nn.Module) -> Iterator[nn.Module]:
    """Within: the hooks ``install`` put on ``model`` pass its calls and outputs through unchanged
    (the previous state comes back on exit, also after an error)."""
    previous = getattr(model, SUSPENDED, False)
    setattr(model, SUSPENDED, True)
    try:
        yield model
    finally:
        setattr(model, SUSPENDED, previous)


def is_first_step(kwargs: dict) -> bool:
    """No cache yet, or an empty one (``generate`` passes an empty cache to its first call)."""
    cache = call_cache(kwargs)
    return cache is None or cache.get_seq_length() == 0


def check_packed_rows(kwargs: dict, n: int, length: int, inserts_tokens: bool, takes_positions: bool) -> None:
    """One line for a ``PACKED_ROWS`` call the hook cannot lay out."""
    if inserts_tokens:
        raise ValueError("prompt tuning's virtual tokens are input positions before each sequence, and a packed row "
                         "holds several: use trainer.batching=padded")
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if not takes_positions or positions is None:
        raise ValueError("packed rows behind a prefix need position ids (each sequence's own, from 0)")
    if mask is None or len(mask.shape) != 4 or mask.shape[-1] != n + length:
        raise ValueError(f"packed rows behind a prefix need a 4D attention mask over {n} prefix slots + {length} "
                         f"tokens, not {None if mask is None else tuple(mask.shape)}")
    if not is_first_step(kwargs):
        raise ValueError("packed rows behind a prefix are training calls: no cache may be given")


def install(model: nn.Module, num_virtual_tokens: int, first_step: Callable[[dict, int, bool], None],
            inserts_tokens: bool) -> None:
    """Hook ``model`` so that ``first_step(kwargs, batch_size, packed)`` adds the virtual tokens on the first
    call of a sequence (``packed``: a ``PACKED_ROWS`` call). ``inserts_tokens``: they enter as input
    positions (prompt tuning), so the logits returned are cut back to the caller's length; otherwise
    they live only in the keys and values (prefix)."""
    n = num_virtual_tokens
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    call = {"length": 0}  # the caller's sequence length of the call in flight

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if getattr(module, SUSPENDED, False):
            return None  # the call as given
        if args:
            if len(args) > 1:
                raise TypeError(
                    "prompt/prefix tuning: pass model inputs as keywords (input_ids=..., attention_mask=...)"
                )
            kwargs = {"input_ids": args[0], **kwargs}
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        batch, length = tokens.shape[:2]
        packed = kwargs.pop(PACKED_ROWS, False)
        if packed:
            check_packed_rows(kwargs, n, length, inserts_tokens, takes_positions)
        first = is_first_step(kwargs)
        kwargs.pop("cache_position", None)
        mask = kwargs.get("attention_mask")
        if packed:  # the caller's 4D mask covers the prefix slots already
            kwargs["position_ids"] = kwargs["position_ids"] + n
        elif mask is not None:
            mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
            kwargs["attention_mask"] = mask
            if takes_positions:
                current = length + (n if first and inserts_tokens else 0)
                kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -current:]
        elif kwargs.get("position_ids") is not None:
            if first and bool((kwargs["position_ids"][:, 1:] <= kwargs["position_ids"][:, :-1]).any()):
                raise ValueError(
                    "prompt/prefix tuning puts virtual tokens before each sequence, and a packed row holds several "
                    "(position ids restart): use trainer.batching=padded, not trainer.batching=packed"
                )
            kwargs["position_ids"] = kwargs["position_ids"] + n if not inserts_tokens else None
        if first:
            first_step(kwargs, batch, packed)
        call["length"] = length
        return (), kwargs

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output):
        if getattr(module, SUSPENDED, False):
            return output
        length = call["length"]
        logits = getattr(output, "logits", None)
        if inserts_tokens and logits is not None and logits.shape[1] > length:
            output.logits = logits[:, -length:]
        return output

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.register_forward_hook(post_hook, with_kwargs=True)
