"""The text kind: LLM-Adapters records, the upstream prompt templates, text generation."""

from __future__ import annotations

from pathlib import Path

from adapters_lab.data.sources import data_files, load_task_data
from adapters_lab.data.tokenize import tokenize_records
from adapters_lab.evaluate import evaluate_sets


class CausalLMKind:
    name = "causal_lm"

    def check(self, adapter, cfg) -> None:
        """Nothing beyond the adapter's and trainer's own checks."""

    def load_data(self, cfg, needs_train: bool):
        return load_task_data(cfg.dataset, cfg.eval, cfg.paths, cfg.seed, needs_train=needs_train)

    def data_notes(self, data) -> dict:
        """Extra data figures for metrics.json: none."""
        return {}

    def data_files(self, cfg, needs_train: bool) -> list[Path]:
        return data_files(cfg.dataset, cfg.paths, needs_train)

    def text_tokenizer(self, tokenizer):
        return tokenizer

    def describe(self, model, cfg) -> dict:
        """Extra parameter figures for metrics.json: none for a causal LM."""
        return {}

    def features(self, records: list[dict], tokenizer, ds, key: str):
        return tokenize_records(records, tokenizer, ds.cutoff_len, ds.train_on_inputs, ds.add_eos_token,
                                ds.max_bad_record_share, key)

    def train_options(self, model, tokenizer, cfg) -> dict:
        """Keyword arguments of ``train`` beyond the text defaults: none."""
        return {}

    def evaluate(self, model, tokenizer, eval_sets: dict, cfg, device, predictions_dir: Path | None,
                 processes: int, rank: int) -> dict:
        return evaluate_sets(model, tokenizer, eval_sets, cfg.eval, device, predictions_dir, processes, rank)
