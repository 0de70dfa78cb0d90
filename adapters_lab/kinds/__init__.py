"""Model kinds: what differs between a causal LM run and an image-text run, behind one interface the
pipeline calls (config checks, data, tokens, the collator and optimiser groups, evaluation);
``build_model`` in ``adapters_lab.models`` builds each kind's model. A new kind is a new module here
with the same methods."""

from __future__ import annotations

from adapters_lab.config import ModelConfig, ModelKind
from adapters_lab.kinds.causal_lm import CausalLMKind
from adapters_lab.kinds.image_text import ImageTextKind

KINDS = {ModelKind.causal_lm: CausalLMKind, ModelKind.image_text: ImageTextKind}


def model_kind(cfg: ModelConfig):
    """The kind object of ``model.kind``."""
    return KINDS[cfg.kind]()
