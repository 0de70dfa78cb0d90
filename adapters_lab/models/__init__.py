"""Base models by kind: causal LMs (``causal_lm.py``) and, behind the same ``build_model``, image-text
models. ``from adapters_lab.models import build_model, ...`` is the public entry point."""

from adapters_lab.models.causal_lm import (
    CACHE_ARGUMENTS,
    build_model,
    build_tiny_model,
    build_tiny_tokenizer,
    cache_argument,
    call_cache,
    ensure_pad_token,
    torch_dtype,
)

__all__ = [
    "CACHE_ARGUMENTS",
    "build_model",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "cache_argument",
    "call_cache",
    "ensure_pad_token",
    "torch_dtype",
]
