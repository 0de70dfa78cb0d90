"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning", arXiv:2104.08691): ``num_virtual_tokens`` learned input embeddings prepended to every
sequence; the model itself is frozen.

``init=text`` starts from the embeddings of ``init_text`` tokenised and repeated or cut to
``num_virtual_tokens`` (the paper's vocabulary init; HF PEFT's ``TEXT``); ``init=random`` draws
from a normal with the word-embedding matrix's own standard deviation. The parameter is
``prompt_tuning.embedding.weight``, PEFT's ``prompt_embeddings`` when exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn as nn

from adapters_lab.adapters import virtual_tokens
from adapters_lab.adapters.base import Adapter, AdapterConfigError, InjectionReport, NoPlacement
from adapters_lab.adapters.placement import kv_shape

MODULE_NAME = "prompt_tuning"


class PromptInit(str, Enum):
    text = "text"
    random = "random"


class PromptEmbedding(virtual_tokens.VirtualTokenModule):
    def __init__(self, num_virtual_tokens: int, hidden: int, device: torch.device):
        super().__init__(num_virtual_tokens)
        self.embedding = nn.Embedding(num_virtual_tokens, hidden, device=device, dtype=torch.float32)


@dataclass
class PromptTuning(Adapter):
    placement: NoPlacement = field(default_factory=NoPlacement)
    num_virtual_tokens: int = 20
    init: PromptInit = PromptInit.text
    init_text: str = "Solve the math problem step by step and give the answer."

    def validate(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise AdapterConfigError(f"adapter.num_virtual_tokens={self.num_virtual_tokens}: must be positive")
        if self.init == PromptInit.text and not self.init_text.strip():
            raise AdapterConfigError("adapter.init_text: empty; give text or set adapter.init=random")

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens

    def prepare_load(self) -> None:
        self.init = PromptInit.random  # the saved embedding replaces any init; no tokenizer needed

    def init_token_ids(self, tokenizer: Any) -> list[int]:
        """``init_text``'s ids repeated, then cut, to ``num_virtual_tokens``."""
        ids = tokenizer(self.init_text)["input_ids"]
        return (ids * math.ceil(self.num_virtual_tokens / len(ids)))[: self.num_virtual_tokens]

    def inject(self, model: nn.Module, tokenizer: Any = None) -> InjectionReport:
        words = model.get_input_embeddings()
        prompt = PromptEmbedding(self.num_virtual_tokens, words.embedding_dim, words.weight.device)
        if not words.weight.is_meta:
            with torch.no_grad():
                if self.init == PromptInit.text:
                    if tokenizer is None:
                        raise AdapterConfigError("adapter.init=text needs the tokenizer passed to inject()")
                    ids = torch.tensor(self.init_token_ids(tokenizer), device=words.weight.device)
                    prompt.embedding.weight.copy_(words(ids).float())
                else:
                    nn.init.normal_(prompt.embedding.weight, std=words.weight.float().std().item())
        model.add_module(MODULE_NAME, prompt)

        def first_step(kwargs: dict, batch: int, packed: bool) -> None:
            embeds = kwargs.pop("inputs_embeds", None)
            if embeds is None:
                embeds = words(kwargs["input_ids"])
            kwargs["input_ids"] = None
            virtual = prompt.embedding.weight.unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)
            kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
            if kwargs.get("labels") is not None:
                labels = kwargs["labels"]
                kwargs["labels"] = torch.cat([labels.new_full((batch, self.num_virtual_tokens), -100), labels], 1)

        virtual_tokens.install(model, self.num_virtual_tokens, first_step, inserts_tokens=True)
        return InjectionReport(method=self.name, adapted=[f"{MODULE_NAME} ({self.num_virtual_tokens} tokens)"])

    def peft_export(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        num_layers, _, _ = kv_shape(model)
        text_config = model.config.get_text_config()
        config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": self.num_virtual_tokens,
                  "token_dim": model.get_input_embeddings().embedding_dim, "num_transformer_submodules": 1,
                  "num_attention_heads": text_config.num_attention_heads, "num_layers": num_layers,
                  "prompt_tuning_init": "RANDOM"}
        return {"prompt_embeddings": model.get_submodule(MODULE_NAME).embedding.weight}, config
