"""Tiny LoRA models, token examples and trainer settings shared by the trainer tests."""

from __future__ import annotations

import random

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from adapters_lab.adapters.base import Placement, freeze
from adapters_lab.adapters.lora import LoRA
from adapters_lab.config import TrainerConfig
from adapters_lab.data.tokenize import IGNORE_INDEX
from adapters_lab.tracking import NullTracker
from adapters_lab.training.loop import train
from adapters_lab.training.settings import check_trainer_config, make_accelerator

VOCAB = 97
PAD = 0


def tiny_lora_model(seed: int = 0, dropout: float = 0.0, layers: int = 2, intermediate: int = 76,
                    dtype: torch.dtype = torch.float32, dora: bool = False) -> nn.Module:
    """A random LLaMA (odd sizes; float32 unless ``dtype``) with LoRA (or DoRA) on q,k,v,up,down and
    non-zero B, so the adapters change the outputs from the first step."""
    config = LlamaConfig(hidden_size=48, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=3, num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    freeze(model)
    LoRA(_target_="adapters_lab.adapters.lora.LoRA", name="lora", rank=4, alpha=8.0, dropout=dropout, use_dora=dora,
         placement=Placement(modules=["q", "k", "v", "up", "down"])).inject(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return model


def token_examples(count: int, seed: int = 0, shortest: int = 3, longest: int = 20) -> list[dict]:
    """Random sequences; about a third have their first tokens masked, as prompts are when
    ``train_on_inputs`` is false."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        ids = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(shortest, longest) - 1)]
        labels = list(ids)
        if rng.random() < 0.35:
            cut = rng.randint(1, len(ids) - 1)
            labels[:cut] = [IGNORE_INDEX] * cut
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def trainer_cfg(**overrides) -> TrainerConfig:
    base = dict(max_steps=6, batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=1, device="cpu",
                progress_bar=False, log_every=2, eval_every=0, checkpoint_every=0, precision="fp32")
    return TrainerConfig(**{**base, **overrides})


def run(cfg: TrainerConfig, examples: list[dict], seed: int = 0, checkpoint_dir=None, model=None, tracker=None,
        val: list[dict] | None = None, dropout: float = 0.0):
    """Train a fresh tiny model (the same one for the same seed); returns (model, result)."""
    torch.manual_seed(seed)
    model = model if model is not None else tiny_lora_model(seed, dropout=dropout)
    result = train(model, examples, val or [], PAD, check_trainer_config(cfg), make_accelerator(cfg), tracker or NullTracker(), seed,
                   checkpoint_dir=checkpoint_dir)
    return model, result


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
