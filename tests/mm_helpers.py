"""Tiny image-text models and batches for the multimodal tests (built from conf/model, no download)."""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import OmegaConf

from adapters_lab.config import ModelConfig
from tests.conftest import CONF_DIR

TINY = ("tiny_llava", "tiny_qwen2vl")


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run many times faster on one thread on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_config(name: str, **overrides) -> ModelConfig:
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"),
                           overrides)
    return OmegaConf.to_object(node)


@functools.lru_cache(maxsize=None)
def _processor(name: str):
    from adapters_lab.models.image_text import build_image_text

    return build_image_text(model_config(name))[1]


def build(name: str, seed: int = 0):
    """(model, processor) with seeded random weights (the processor is built once per model)."""
    from adapters_lab.models.image_text import build_image_text

    torch.manual_seed(seed)
    model, _ = build_image_text(model_config(name))
    return model, _processor(name)


def shapes(name: str, num: int, kinds=("colour", "shape", "count", "position"), seed: int = 1, split: str = "train"):
    from adapters_lab.data.shapes import shapes_records

    return shapes_records(num, list(kinds), model_config(name).tiny.vision.image_size, seed, split)


def batch(name: str, processor, records):
    from adapters_lab.data.mllm import ImageTextCollator, tokenize_conversations

    features = tokenize_conversations(records, processor, 512, 0.0, "test")
    return ImageTextCollator(processor, processor.tokenizer.pad_token_id)(features.examples)
