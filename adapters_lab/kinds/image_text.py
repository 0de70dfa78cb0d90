"""The image-text kind: LLaVA / Qwen2-VL models, LLaVA conversation records with images, the
connector trained or frozen (its own optimiser group), generation with images and VQA-style scores."""

from __future__ import annotations

import logging
from pathlib import Path

from adapters_lab.adapters.base import AdapterConfigError
from adapters_lab.adapters.prefix import PrefixTuning
from adapters_lab.adapters.prompt import PromptTuning
from adapters_lab.config import Batching, Scoring
from adapters_lab.data.mllm import ImageTextCollator, tokenize_conversations
from adapters_lab.models.image_text import family_of
from adapters_lab.models.parts import count_by_part, parameter_groups, set_connector_trainable
from adapters_lab.multimodal.data import SHAPES, eval_file, load_image_text_data
from adapters_lab.multimodal.evaluate import evaluate_image_text_sets

log = logging.getLogger(__name__)


def refusal(adapter, family: str, model_name: str) -> str | None:
    """Why an adapter cannot train this image-text model, or None."""
    if isinstance(adapter, PromptTuning):
        return (f"model={model_name} adapter={adapter.name}: prompt tuning inserts input positions before the image "
                "tokens, which image-text models place from input_ids; not supported (prefix tuning is, on LLaVA)")
    if isinstance(adapter, PrefixTuning) and family == "qwen2_vl":
        return (f"model={model_name} adapter={adapter.name}: Qwen2-VL computes its multimodal rotary positions from "
                "the attention mask, which prefix tuning extends; not supported (LoRA, IA3 and adapters are)")
    return None


class ImageTextKind:
    name = "image_text"

    def check(self, adapter, cfg) -> None:
        """Refuse what cannot work with images in the sequence, before any weight loads."""
        reason = refusal(adapter, family_of(cfg.model), cfg.model.name)
        if reason:
            raise AdapterConfigError(reason)
        if cfg.eval.scoring != Scoring.generate:
            raise AdapterConfigError(f"eval.scoring={cfg.eval.scoring.value}: image-text models are scored on "
                                     "generated answers (eval.scoring=generate)")
        trainer = cfg.trainer
        for key, value, bad in (("batching", trainer.batching.value, trainer.batching == Batching.packed),
                                ("fused_loss", trainer.fused_loss, trainer.fused_loss),
                                ("attn_implementation", trainer.attn_implementation,
                                 trainer.attn_implementation == "varlen")):
            if bad and adapter.trains:
                raise AdapterConfigError(f"trainer.{key}={value}: not supported for image-text "
                                         f"model={cfg.model.name} (padded batches with images only)")

    def load_data(self, cfg, needs_train: bool):
        data = load_image_text_data(cfg.dataset, cfg.eval, cfg.paths, cfg.seed, needs_train)
        for source, dropped in data.text_only_dropped.items():
            log.warning("dataset %s (%s): images absent, %d records with an image dropped: this run uses the "
                        "text-only questions", cfg.dataset.name, source, dropped)
        return data

    def data_notes(self, data) -> dict:
        """Records dropped because their images are absent (the run used text-only questions)."""
        return {"text_only_dropped": data.text_only_dropped} if data.text_only_dropped else {}

    def data_files(self, cfg, needs_train: bool) -> list[Path]:
        """The record files a run reads (not the generated shapes, nor the images)."""
        ds = cfg.dataset
        files = [Path(ds.train).expanduser()] if needs_train and ds.train != SHAPES else []
        return files + [eval_file(name, ds, cfg.paths) for name in ds.eval_sets if name != SHAPES]

    def text_tokenizer(self, processor):
        return processor.tokenizer

    def describe(self, model, cfg) -> dict:
        """Connector trainable iff ``model.train_connector``; trainable and total parameters per part."""
        count = set_connector_trainable(model, cfg.model.train_connector)
        log.info("connector: %s parameters %s", f"{count:,}", "trained" if cfg.model.train_connector else "frozen")
        return {"params_by_part": count_by_part(model)}

    def features(self, records: list[dict], processor, ds, key: str):
        return tokenize_conversations(records, processor, ds.cutoff_len, ds.max_bad_record_share, key)

    def train_options(self, model, processor, cfg) -> dict:
        """The image-text collator and the optimiser groups (connector at ``trainer.connector_lr``)."""
        return {"collate": ImageTextCollator(processor, processor.tokenizer.pad_token_id),
                "param_groups": parameter_groups(model, cfg.trainer.lr, cfg.trainer.connector_lr)}

    def evaluate(self, model, processor, eval_sets: dict, cfg, device, predictions_dir: Path | None,
                 processes: int, rank: int) -> dict:
        return evaluate_image_text_sets(model, processor, eval_sets, cfg.eval, device, predictions_dir, processes,
                                        rank, cfg.dataset.prompt_suffix)
