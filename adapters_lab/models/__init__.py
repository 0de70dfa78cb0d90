"""Base models by kind: causal LMs (``causal_lm.py``) and, behind the same ``build_model``, image-text
models. ``from adapters_lab.models import build_model, ...`` is the public entry point."""

from adapters_lab.config import ModelConfig, ModelKind
from adapters_lab.models.causal_lm import (
    CACHE_ARGUMENTS,
    build_tiny_model,
    build_tiny_tokenizer,
    cache_argument,
    call_cache,
    ensure_pad_token,
    torch_dtype,
)
from adapters_lab.models.causal_lm import build_model as build_causal_lm
from adapters_lab.models.image_text import build_image_text


def build_model(cfg: ModelConfig, device=None) -> tuple:
    """(model, tokenizer) of a causal LM, or (model, processor) of an image-text model (``model.kind``)."""
    if cfg.kind == ModelKind.image_text:
        return build_image_text(cfg)
    return build_causal_lm(cfg, device)


__all__ = [
    "CACHE_ARGUMENTS",
    "build_causal_lm",
    "build_image_text",
    "build_model",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "cache_argument",
    "call_cache",
    "ensure_pad_token",
    "torch_dtype",
]
