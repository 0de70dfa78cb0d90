"""Batched greedy and beam-search decoding over a grouped KV cache, CUDA-graphed on a GPU.

It computes what transformers' ``generate`` computes with ``do_sample=False``: greedy, or beam
search with length penalty 1 and ``early_stopping=False``, the decoding LLM-Adapters'
``evaluate.py`` runs (Hu et al., 2023); ``tests/test_decoding.py`` checks the tokens against
``generate``. What differs is the cost (the evaluation-time targets: docs/benchmarks.md):

- One KV cache tensor per K and V, ``(layers, prompts, kv_heads, slots, head_dim)``: each prompt
  is stored once, right-aligned to slot ``first_generated`` (``prompt_slots``, after a prefix's
  slots if any), then the generated tokens as ``generated_slots.GeneratedSlots`` lays them out:
  by step and beam within a period of ``window`` steps, the slots no running beam descends from
  dropped between periods. Beams never copy or reorder the cache: each beam keeps its ancestry
  (which beam row holds its token of step ``s``) and attends through a mask, the ``beams``
  queries of one prompt together (``grouped_attention``). A prompt's keys are
  read once per step for all its beams, not once per beam, and in their own dtype (by SDPA's
  memory-efficient kernel, the query heads of a key/value head folded into its query rows).
- A decoding step (the model's forward for one token per beam, token selection, bookkeeping) has
  no host synchronisation; on a GPU it is captured as a CUDA graph per shape of the generated
  region (the slots carried over and the period's slots; attention reads no further), the first
  step of a shape run eagerly and then captured, and replayed. The host checks for completion
  after the first token and every ``check_every`` steps, and compacts the cache between periods.
- On a GPU the step attention runs on the fastest, timed at build, of SDPA's kernels and a Triton
  kernel (``step_attention_kernel``), a step's cache writes and the compactions are Triton kernels
  too (``slot_kernels``); in every forward of ours each RMSNorm is one kernel
  (``fused_norms``) and, on a GPU, the rotary embedding one for queries and one for keys (``fused_rotary``),
  each residual add with the norm after it one and SwiGLU's SiLU and product one (``fused_layers``).
- Prefix tuning (``adapters/prefix.py``): its ``n`` keys and values per layer fill the first ``n``
  slots of every prompt's row, written at each batch's prefill; every mask covers them, and position
  ids count real tokens after them, as the virtual-token hook does for ``generate``. The hook itself
  is suspended around our calls (``virtual_tokens.hooks_suspended``): it would rewrite our 4D mask.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from transformers import AttentionInterface, Cache

from adapters_lab import fused_layers, fused_norms, fused_rotary, slot_kernels, step_lanes
from adapters_lab.adapters import virtual_tokens
from adapters_lab.adapters.prefix import PrefixEncoder
from adapters_lab.beam_search import BeamSearch
from adapters_lab.generated_slots import GeneratedSlots
from adapters_lab.models import cache_argument
from adapters_lab.step_attention import (  # noqa: F401
    STEP_BACKENDS,
    attention_backend,
    cuda_milliseconds,
    fastest_step_backend,
    few_query_attention,
    step_backends,
    time_step_backends,
)

log = logging.getLogger(__name__)

ATTENTION = "adapters_lab_grouped"
PREFILL_TOKENS = 8192  # prompt tokens per prefill forward
WORKSPACE_BYTES = 3 * 2**30  # GPU memory kept beside a decoder's cache (prefill activations, graph pool)
# Steps a period (``window``), where the step attention reads only written slots: under beam search a
# shorter period drops dead slots sooner (16: 0.98x the batch time of 32 on the H200); greedy never
# compacts, so a longer one only captures fewer CUDA graphs (docs/benchmarks.md).
BEAM_PERIOD, GREEDY_PERIOD = 16, 64


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """Attention where the ``beams`` query rows of a prompt share one key/value row: queries
    ``(prompts * beams, heads, 1, d)`` against keys ``(prompts, kv_heads, slots, d)``, the beams of a
    prompt as one block of queries, ``attention_mask`` ``(prompts, 1, beams or q_len, slots)``
    (True: attend). A prefill (many queries per prompt) goes through SDPA; a decoding step through
    ``few_query_attention``."""
    rows, heads, q_len, dim = query.shape
    prompts = key.shape[0]
    beams = rows // prompts
    scale = dim**-0.5 if scaling is None else scaling
    if q_len > 1:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale,
                                             enable_gqa=key.shape[1] != heads)
        return out.transpose(1, 2).contiguous(), None
    query = query.view(prompts, beams, heads, dim).transpose(1, 2)  # (prompts, heads, beams, d)
    with step_lanes.turn(module):  # under ``Decoder(lanes=n)``, the lanes' attentions take turns
        out = few_query_attention(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).reshape(rows, 1, heads, dim), None


def supports(model: nn.Module, max_length: int) -> bool:
    """Models whose attention goes through transformers' attention interface with a 4D mask as
    given, whose sliding window (if any) covers ``max_length`` tokens and the prefix, with no virtual
    tokens but a prefix-tuning prefix: the others use ``generate``."""
    config = model.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    prefix = prefix_tokens(model)
    # Prompt tuning's virtual tokens are input embeddings run through every layer, not cache entries.
    only_prefix = virtual_tokens.count(model) == prefix
    return (config.model_type in {"llama", "mistral", "qwen2"} and (window is None or window >= max_length + prefix)
            and getattr(model, "_supports_attention_backend", False) and only_prefix)


def cache_prefix(model: nn.Module) -> PrefixEncoder | None:
    """The model's prefix-tuning encoder (keys and values for the cache's first slots), or None."""
    return next((m for m in model.children() if isinstance(m, PrefixEncoder)), None)


def prefix_tokens(model: nn.Module) -> int:
    """How many cache slots before every prompt the model's prefix (if any) takes."""
    prefix = cache_prefix(model)
    return prefix.num_virtual_tokens if prefix is not None else 0


def cache_shape(model: nn.Module, prompts: int, slots: int) -> tuple[int, ...]:
    """``(layers, prompts, kv_heads, slots, head_dim)``: the shape of the K (and of the V) cache."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, prompts, kv_heads, slots, head_dim


def prompts_that_fit(model: nn.Module, prompt_slots: int, beams: int, max_new_tokens: int, free_bytes: int) -> int:
    """How many prompts of ``prompt_slots`` tokens one decoder can take in ``free_bytes`` of GPU
    memory: their KV cache and float32 logits (four copies per beam), after ``WORKSPACE_BYTES``
    for the prefill's activations and the CUDA graphs' pool. At least one."""
    embed = model.get_input_embeddings().weight
    slots = prefix_tokens(model) + prompt_slots + beams * max_new_tokens
    per_prompt = 2 * math.prod(cache_shape(model, 1, slots)) * embed.element_size()
    per_prompt += 4 * beams * embed.shape[0] * 4
    return max(1, (free_bytes - WORKSPACE_BYTES) // per_prompt)


class SlotCache(Cache):
    """The grouped KV cache (module docstring). ``write_slots`` (a device tensor) says where the
    call's keys go, ``visible`` how many leading slots attention reads, ``prompts`` which prompts
    the call is about (all, or a chunk of them during prefill); ``write_kernel``: a step's writes by
    ``slot_kernels.write_step`` (one launch for K and V) rather than two ``index_copy_``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_kernel: bool = False):
        super().__init__(layers=[])
        self.keys, self.values, self.write_kernel = keys, values, write_kernel
        self.write_slots = torch.zeros(1, dtype=torch.long, device=keys.device)
        self.visible = keys.shape[3]
        self.prompts = slice(None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx, self.prompts], self.values[layer_idx, self.prompts]
        prompts = keys.shape[0]
        rows, heads, q_len, dim = key_states.shape
        if self.write_kernel and q_len == 1:
            slot_kernels.write_step(key_states, value_states, keys, values, self.write_slots)
            return keys[:, :, : self.visible], values[:, :, : self.visible]
        if rows != prompts:  # one token per beam: (prompts * beams, h, 1, d) -> (prompts, h, beams, d)
            key_states = key_states.view(prompts, rows // prompts, heads, dim).transpose(1, 2)
            value_states = value_states.view(prompts, rows // prompts, heads, dim).transpose(1, 2)
        keys.index_copy_(2, self.write_slots, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_slots, value_states.to(values.dtype))
        return keys[:, :, : self.visible], values[:, :, : self.visible]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.visible


class Decoder:
    """Decodes batches of ``prompts`` left-padded prompts of at most ``prompt_slots`` tokens,
    ``beams`` beams each (1: greedy), ``max_new_tokens`` steps; buffers and CUDA graphs are built
    once and reused for every batch of the same shape. A row of the cache holds the model's prefix
    (``prefix_slots``, none without prefix tuning), the prompt right-aligned to slot
    ``first_generated``, then the generated tokens. ``lanes`` > 1 runs a step's layers as that many
    groups of prompts on their own CUDA streams (``step_lanes``: an experiment, off by default)."""

    def __init__(self, model: nn.Module, prompts: int, prompt_slots: int, beams: int, max_new_tokens: int,
                 eos_token_id: int, pad_token_id: int, window: int | None = None, check_every: int = 8,
                 cuda_graphs: bool | None = None, compact: bool = True, lanes: int = 1):
        self.model, self.prompts, self.prompt_slots, self.beams = model, prompts, prompt_slots, beams
        self.steps, self.pad = max_new_tokens, pad_token_id
        self.eos = -1 if eos_token_id is None else eos_token_id  # none: sequences run to the budget
        self.check_every = check_every
        self.cache_argument = cache_argument(model)
        AttentionInterface.register(ATTENTION, grouped_attention)  # on first use, not at import
        embed = model.get_input_embeddings().weight
        self.device, dtype = embed.device, embed.dtype
        self.prefix = cache_prefix(model)
        self.norms = fused_norms.rms_norms(model)  # each one kernel in our forwards
        rotary_kernel_here = self.device.type == "cuda" and fused_rotary.available()
        self.rotary = fused_rotary.rotary_modules(model) if rotary_kernel_here else []  # one kernel for q, one for k
        # On a GPU each residual add and the norm after it one kernel, SwiGLU's SiLU and product one.
        fuse = rotary_kernel_here and fused_layers.kernels_agree(self.device, dtype, embed.shape[1])
        self.fused = fused_layers.fusable(model) if fuse else ([], [])
        slot_kernels_here = self.device.type == "cuda" and slot_kernels.available()  # cache writes, compaction
        self.prefix_slots = prefix_tokens(model)
        self.first_generated = self.prefix_slots + prompt_slots  # the slot of beam 0's first token
        shape = cache_shape(model, prompts, self.first_generated + beams * max_new_tokens)
        # Zeros, not empty: masked slots still enter q.k, and garbage could hold NaN.
        self.cache = SlotCache(torch.zeros(shape, dtype=dtype, device=self.device),
                               torch.zeros(shape, dtype=dtype, device=self.device), write_kernel=slot_kernels_here)
        rows, index_kwargs = prompts * beams, dict(dtype=torch.long, device=self.device)
        self.rows = rows
        self.step = torch.zeros((), **index_kwargs)  # index of the token being chosen
        self.tokens = torch.zeros(rows, **index_kwargs)  # last chosen token per beam row
        self.next_position = torch.zeros(rows, **index_kwargs)  # position id of the first generated token
        self.prompt_mask = torch.zeros(prompts, self.first_generated, dtype=torch.bool, device=self.device)
        # The slots a step's Triton attention reads: from each prompt's first attended one to the last written,
        # less the dead slots a compaction left before the period's (``slots.gap_from``, ``gap_to``).
        self.read_from = torch.zeros(prompts, dtype=torch.int32, device=self.device)
        self.read_until = torch.zeros((), dtype=torch.int32, device=self.device)
        self.ancestry = torch.zeros(prompts, beams, max_new_tokens, **index_kwargs)  # row holding step s of beam k
        self.own_row = torch.arange(beams, **index_kwargs).view(1, beams, 1)
        self.sequences = torch.zeros(prompts, beams, max_new_tokens, **index_kwargs)  # running beams' tokens
        self.scores = torch.zeros(prompts, beams, dtype=torch.float32, device=self.device)
        self.done = torch.zeros((), dtype=torch.bool, device=self.device)
        if beams > 1:
            self.beam_search = BeamSearch(prompts, beams, max_new_tokens, self.eos, self.device)
        else:
            self.unfinished = torch.zeros(rows, dtype=torch.bool, device=self.device)
        window = window or (BEAM_PERIOD if beams > 1 else GREEDY_PERIOD)
        self.slots = GeneratedSlots(prompts, beams, max_new_tokens, window, self.first_generated, self.device,
                                    compact=compact, kernel=slot_kernels_here)
        self.step_backend = self._choose_step_backend()
        self.lanes = (step_lanes.Lanes(step_lanes.decoder_layers(model), prompts, beams, lanes, self.device)
                      if lanes > 1 else None)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # by the generated region's shape
        self.graph_pool = None
        self.use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs

    # -- one batch --------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The chosen continuation of each prompt, ``(prompts, max_new_tokens)``, padded after EOS
        with the pad token (``generate``'s output without the prompt)."""
        self._prefill(input_ids.to(self.device), attention_mask.to(self.device))
        for t in range(1, self.steps):
            if (t == 1 or t % self.check_every == 0) and bool(self.done):
                break
            if self.slots.period_over(t - 1):
                self.slots.next_period(self.cache.keys, self.cache.values, self.ancestry)
            self._run_step()
        best = self.beam_search.finished[:, 0] if self.beams > 1 else self.sequences[:, 0]
        return best.clone()

    def _run_step(self) -> None:
        """One step: the CUDA graph of this shape if captured; else eagerly, then (on a GPU) captured."""
        graph = self.graphs.get(self.slots.key)
        if graph is not None:
            graph.replay()
            return
        if not self.use_graphs:
            self._step()
            return
        self._warm_up_step()
        try:
            self.graphs[self.slots.key] = self._capture()
        except RuntimeError as error:  # e.g. a module that synchronises with the host: run steps eagerly
            if isinstance(error, torch.OutOfMemoryError):
                raise
            log.warning("eval: decoding steps run without CUDA graphs (capture failed: %s)", str(error)[:200])
            self.use_graphs = False

    def _reset(self) -> None:
        self.step.zero_()
        self.done.zero_()
        self.sequences.fill_(self.pad)
        self.ancestry.zero_()
        self.scores.zero_()
        self.slots.reset()
        if self.beams > 1:
            self.beam_search.reset(self.pad, self.scores)
        else:
            self.unfinished.fill_(True)

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._reset()
        batch, length = input_ids.shape
        if batch != self.prompts or length > self.prompt_slots:
            raise ValueError(f"decoder built for {self.prompts} prompts of <= {self.prompt_slots} tokens, "
                             f"got {batch} x {length}")
        real, n, end = attention_mask.bool(), self.prefix_slots, self.first_generated
        self.prompt_mask.zero_()
        self.prompt_mask[:, :n] = True
        self.prompt_mask[:, end - length:] = real
        self.read_from.copy_(self.prompt_mask.int().argmax(1))  # the first True: the prefix's, or the prompt's
        # Position ids as the virtual-token hook makes them: the mask gains n ones in front, cumsum - 1.
        with_prefix = torch.cat([real.new_ones(batch, n), real], dim=1)
        positions = (with_prefix.long().cumsum(-1) - 1).clamp(min=0)[:, n:]
        self.next_position.copy_((positions[:, -1] + 1).repeat_interleave(self.beams))
        # Causal over the prompt's real tokens and the prefix; a padding query attends to itself (no empty rows).
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        mask = (causal & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=self.device)
        full = torch.zeros(batch, 1, length, end, dtype=torch.bool, device=self.device)
        full[:, 0, :, :n] = True
        full[:, 0, :, end - length:] = mask
        self._write_prefix()
        self.cache.write_slots = torch.arange(end - length, end, device=self.device)
        self.cache.visible = end
        chunk, logits = max(1, PREFILL_TOKENS // length), []
        for start in range(0, batch, chunk):  # bounded activations, whatever the batch
            rows = self.cache.prompts = slice(start, start + chunk)
            logits.append(self._forward(input_ids[rows], positions[rows], full[rows]))
        self.cache.prompts = slice(None)
        self._select(torch.cat(logits).repeat_interleave(self.beams, dim=0))

    def _write_prefix(self) -> None:
        """The prefix's keys and values, the same for every prompt, into the first ``prefix_slots`` slots."""
        if self.prefix is None:
            return
        prefixes = self.prefix().to(self.cache.keys.dtype)  # (layers * 2, kv_heads, n, head_dim): k0, v0, k1, ...
        n = self.prefix_slots
        self.cache.keys[:, :, :, :n] = prefixes[0::2, None]
        self.cache.values[:, :, :, :n] = prefixes[1::2, None]

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        previous = self.model.config._attn_implementation
        AttentionInterface.register(ATTENTION, grouped_attention)  # registered when a decoder is first built
        self.model.config._attn_implementation = ATTENTION
        try:
            # The prefix is in our cache and masks already; norms, rotary, adds and SwiGLU run fused.
            with (virtual_tokens.hooks_suspended(self.model), fused_norms.fused(self.norms),
                  fused_rotary.fused(self.rotary), fused_layers.fused(*self.fused)):
                out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                                 use_cache=True, logits_to_keep=1, **{self.cache_argument: self.cache})
        finally:
            self.model.config._attn_implementation = previous
        return out.logits[:, -1].float()

    def _choose_step_backend(self) -> SDPBackend | None:
        """On a GPU, the fastest step kernel on random inputs of this decoder's largest step
        (``step_attention.time_step_backends``); elsewhere None (SDPA's own pick)."""
        if self.device.type != "cuda":
            return None
        heads = self.model.config.get_text_config().num_attention_heads
        keys = self.cache.keys
        return time_step_backends(keys.shape, heads, min(self.prompts, 32), self.beams, keys.dtype, self.device)

    def _step(self) -> None:
        """Feed the tokens chosen at step t-1 (their slots: ``self.slots``), choose step t."""
        beams = self.beams
        previous = self.step - 1
        self.cache.write_slots = self.slots.write_slots(previous)
        self.cache.visible = self.first_generated + self.slots.visible
        self.read_until.copy_(self.cache.write_slots[-1] + 1)  # the period's later slots are unwritten
        self.ancestry.index_copy_(2, previous.view(1), self.own_row.expand(self.prompts, beams, 1))
        positions = (self.next_position + previous).view(-1, 1)
        window = self.read_from, self.slots.gap_from, self.slots.gap_to, self.read_until
        lanes = self.lanes.running(self.cache, self.step_backend, window) if self.lanes else contextlib.nullcontext()
        with attention_backend(self.step_backend, window), lanes:  # the kernel chosen at build time (GPU only)
            logits = self._forward(self.tokens.view(-1, 1), positions, self.step_mask(previous))
        self._select(logits)

    def step_mask(self, previous: torch.Tensor) -> torch.Tensor:
        """``(prompts, 1, beams, visible slots)``: what each beam attends at the step after ``previous``,
        the prompt's real slots and its ancestors' written ones."""
        own = self.slots.mask(self.ancestry, previous)
        return torch.cat([self.prompt_mask[:, None, :].expand(-1, self.beams, -1), own], dim=-1)[:, None]

    def _select(self, logits: torch.Tensor) -> None:
        if self.beams == 1:
            self._select_greedy(logits)
        else:
            self._select_beams(logits)
        self.step += 1

    def _select_greedy(self, logits: torch.Tensor) -> None:
        chosen = torch.where(self.unfinished, logits.argmax(-1), self.pad)
        self.sequences.view(self.rows, -1).index_copy_(1, self.step.view(1), chosen.view(-1, 1))
        self.unfinished &= chosen != self.eos
        self.done.copy_(~self.unfinished.any())
        self.tokens.copy_(chosen)

    def _select_beams(self, logits: torch.Tensor) -> None:
        self.beam_search.select(logits, self.step, self.sequences, self.scores, self.ancestry, self.done, self.tokens)

    def _warm_up_step(self) -> None:
        """This step for real, on a side stream on a GPU: the capture's warm-up (allocator, lazy init)."""
        if self.device.type != "cuda":
            self._step()
            return
        current, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._step()
        current.wait_stream(side)
        torch.cuda.synchronize(self.device)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """The step of the current shape as a CUDA graph; captured kernels do not run, so the
        decoding's state is as the last step left it. Graphs share one memory pool (one replays at a time)."""
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.graph_pool):
            self._step()
        self.graph_pool = graph.pool()
        return graph
