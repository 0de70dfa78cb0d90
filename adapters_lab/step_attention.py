"""The decoding step's few-query attention and the choice of its kernel (SDPA's, or the Triton one of
``step_attention_kernel``), timed on the GPU."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from adapters_lab import step_attention_kernel

log = logging.getLogger(__name__)

# SDPA kernels that take the decoding step's masked few-query attention. Which is fastest depends on
# the mask: on an H200 the cuDNN kernel read the cache at 4.3 TB/s in greedy steps and at 2.7 TB/s
# under 4 beams' masks (scripts/bench_eval.py --step-profile), so a decoder times them on its own
# shapes when it is built and keeps the fastest (``fastest_step_backend``) of these and, for 16-bit
# caches, the Triton kernel (4.2 TB/s under the same masks on the H200: docs/benchmarks.md).
STEP_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


class _TritonKernel:
    """The step kernel of ``step_attention_kernel``, a candidate beside SDPA's backends."""

    name = "TRITON"

    def __repr__(self) -> str:
        return "TRITON"


TRITON = _TritonKernel()
_kernel_active = False  # set by ``attention_backend(TRITON)``; read when a step is run or captured
_kernel_window = None  # the read window ``attention_backend(TRITON, window)`` gives the kernel


def step_backends(dtype: torch.dtype) -> tuple:
    """The kernels a decoder on a GPU times for its steps: SDPA's, and the Triton kernel for 16-bit
    caches where triton is installed (in float32 its ``tl.dot`` would round through TF32)."""
    kernel = (TRITON,) if step_attention_kernel.available() and dtype in (torch.bfloat16, torch.float16) else ()
    return STEP_BACKENDS + kernel


def few_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """``(b, heads, q, d)`` queries, few of them, against ``(b, kv_heads, slots, d)`` keys and values
    with a ``(b, 1, q, slots)`` mask. The query heads sharing a key/value head (in order,
    ``h // (heads / kv_heads)``) become extra query rows of it, so the keys are read once and never
    repeated or copied; then SDPA, or the Triton kernel inside ``attention_backend(TRITON)``."""
    batch, heads, queries, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * queries, dim)
    if groups > 1:
        mask = mask[:, :, None].expand(batch, 1, groups, queries, slots).reshape(batch, 1, groups * queries, slots)
    if _kernel_active:
        out = step_attention_kernel.few_query_attention_kernel(grouped, key, value, mask, scale, window=_kernel_window)
    else:
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scale)
    return out.view(batch, heads, queries, dim)


def attention_backend(backend, window: tuple[torch.Tensor, ...] | None = None):
    """A context in which the step attention runs on ``backend``: an SDPA backend only, the Triton
    kernel (``TRITON``; ``window``: the slots it reads, ``step_attention_kernel``), or None (SDPA's own choice)."""
    if backend is TRITON:
        return _triton_active(window)
    return sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _triton_active(window):
    global _kernel_active, _kernel_window
    previous = _kernel_active, _kernel_window
    _kernel_active, _kernel_window = True, window
    try:
        yield
    finally:
        _kernel_active, _kernel_window = previous


def cuda_milliseconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def fastest_step_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                         scale: float, backends=STEP_BACKENDS,
                         timer: Callable[[Callable[[], object]], float] = cuda_milliseconds) -> SDPBackend | None:
    """The backend of ``backends`` under which ``few_query_attention`` runs fastest on these inputs;
    a backend that refuses them is skipped; None when none runs. The backends compute the same
    attention up to rounding: the choice changes the time, not what is computed."""
    best, best_time = None, math.inf
    for backend in backends:
        try:
            with attention_backend(backend):
                elapsed = timer(lambda: few_query_attention(query, key, value, mask, scale))
        except Exception as error:  # "No available kernel", the Triton kernel's limits or its compiler: skip it
            log.info("eval: step kernel %s skipped (%s)", getattr(backend, "name", backend), str(error)[:200])
            continue
        if elapsed < best_time:
            best, best_time = backend, elapsed
    return best


def time_step_backends(cache_shape: tuple[int, ...], heads: int, prompts: int, beams: int,
                       dtype: torch.dtype, device: torch.device | None = None) -> SDPBackend | None:
    """The fastest of ``step_backends(dtype)`` on random inputs of a step that sees every slot of a
    ``(layers, prompts, kv_heads, slots, head_dim)`` cache, for ``prompts`` prompts of ``beams`` beams."""
    _, _, kv_heads, slots, dim = cache_shape
    generator = torch.Generator(device=device or "cuda").manual_seed(0)
    randn_kwargs = dict(generator=generator, device=generator.device, dtype=dtype)
    query = torch.randn(prompts, heads, beams, dim, **randn_kwargs)
    key, value = (torch.randn(prompts, kv_heads, slots, dim, **randn_kwargs) for _ in range(2))
    mask = torch.rand(prompts, 1, beams, slots, generator=generator, device=generator.device) < 0.5
    mask[..., -1] = True  # no fully masked row
    backend = fastest_step_backend(query, key, value, mask, dim**-0.5, step_backends(dtype))
    log.info("eval: decoding-step attention by the %s kernel (timed on %d prompts x %d slots, %d beams)",
             getattr(backend, "name", "default"), prompts, slots, beams)
    return backend
