"""Build the base model and tokenizer: a tiny random-init decoder with a locally trained
tokenizer (no download, the default), or a pretrained model from a local folder or the hub."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from adapters_lab.config import DType, ModelConfig, ModelInit, TinyModelConfig
from adapters_lab.data.arith import ITEMS, NAMES, TEMPLATES
from adapters_lab.data.prompts import eval_prompt, train_prompt
from adapters_lab.models.random_init import build_random_model

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# The KV cache argument of a model's forward: ``cache`` in newer transformers (seen in 5.24), ``past_key_values``
# in older ones (5.17); the newer ones still take the old name and rename it.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes the KV cache in this transformers version."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), "past_key_values")


def call_cache(kwargs: dict):
    """The KV cache a forward call was given, under either name, or None."""
    return next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)


TORCH_DTYPES = {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16, DType.float16: torch.float16}


def torch_dtype(dtype: DType) -> torch.dtype:
    """``model.dtype`` as a torch dtype."""
    return TORCH_DTYPES[dtype]


def _tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer learns its merges from: the prompt templates and arithmetic words."""
    words = " ".join(NAMES + ITEMS) + " " + " ".join(TEMPLATES.values())
    digits = " ".join(str(i) for i in range(200)) + " + - * = . , The answer is"
    return [train_prompt("question", "", "answer"), eval_prompt("question"), words, digits] * 4


def build_tiny_tokenizer(vocab_size: int = 384, extra_special_tokens: tuple[str, ...] = (),
                         corpus: list[str] | None = None, eos_token: str = "</s>") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (LLaMA-like: BOS prepended, EOS and PAD separate), built in ms.

    Byte-level, so any text (the real benchmark files too) encodes without unknown tokens.
    ``extra_special_tokens`` (an image token, chat markers) are kept whole; ``corpus`` replaces
    the text the merges are learnt from.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or _tokenizer_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=eos_token,
        pad_token="<pad>",
        extra_special_tokens=list(extra_special_tokens),
        padding_side="left",
        model_max_length=4096,
    )


def build_tiny_model(tiny: TinyModelConfig, tokenizer, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    config = AutoConfig.for_model(
        tiny.model_type,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        vocab_size=len(tokenizer),
        initializer_range=tiny.init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # With the usual std 0.02 a frozen random head bounds every logit near +-1 (hidden RMS is 1
    # after the final norm), so no adapter could push the loss far below ln(vocab). A wider head
    # lets the tiny model become confident, as a pretrained one is.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 2.0 / tiny.hidden_size**0.5)
    return model


def ensure_pad_token(tokenizer, model_name: str) -> None:
    """Generation pads on the left; a tokenizer without a pad token borrows unk (LLaMA
    upstream's choice, id 0) or, failing that, eos."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is not None:
        return
    fallback = "unk_token" if tokenizer.unk_token is not None else "eos_token"
    if getattr(tokenizer, fallback) is None:
        raise ValueError(f"model={model_name}: tokenizer has no pad, unk or eos token to pad with")
    log.warning("model=%s: tokenizer has no pad token; padding with its %s", model_name, fallback)
    tokenizer.pad_token = getattr(tokenizer, fallback)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a model config; ``tiny`` and ``init=random`` models are built without
    weight files (``device``: where a random-init paper model is built; the rest load on the CPU)."""
    dtype = torch_dtype(cfg.dtype)
    if cfg.tiny is not None:
        tokenizer = build_tiny_tokenizer(cfg.tiny.vocab_size)
        model = build_tiny_model(cfg.tiny, tokenizer, dtype, cfg.attn_implementation)
    elif cfg.init == ModelInit.random:  # the tokenizer of model.local_path if given, else the local one
        if cfg.local_path and not Path(cfg.local_path).is_dir():  # not a hub id either: nothing is downloaded
            raise ValueError(f"model={cfg.name}: model.local_path={cfg.local_path} is not a folder")
        tokenizer = AutoTokenizer.from_pretrained(cfg.local_path) if cfg.local_path else build_tiny_tokenizer()
        model = build_random_model(cfg.arch, cfg.name, tokenizer, dtype, cfg.attn_implementation, device)
    else:
        source = cfg.local_path or cfg.hub_id
        if cfg.local_path and not Path(cfg.local_path).is_dir():  # else transformers would take it for a hub id
            raise FileNotFoundError(f"model={cfg.name}: model.local_path={cfg.local_path} is not a folder")
        if not source:
            raise ValueError(f"model={cfg.name}: set model.local_path or model.hub_id")
        kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=cfg.attn_implementation, **kwargs
        )
    ensure_pad_token(tokenizer, cfg.name)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
