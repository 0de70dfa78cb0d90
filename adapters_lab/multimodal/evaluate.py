"""Batched generation with images and the scoring of image-text evaluation sets.

Prompts are the model's conversation format up to the assistant's turn, left-padded with an
attention mask; the images of a batch go in as the model's image inputs. Generation is
transformers' ``generate`` (greedy, or beams with ``eval.num_beams``): the project's own decoder
takes text models only. Prompts are sorted by length so a batch pads little; each text is the same
as at batch size 1 (tests/test_mllm_eval.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
from transformers import GenerationConfig

from adapters_lab.config import EvalConfig
from adapters_lab.data.mllm import encode, generation_inputs, segments
from adapters_lab.evaluate import gathered
from adapters_lab.files import write_jsonl_atomic
from adapters_lab.multimodal.data import image_text_set
from adapters_lab.multimodal.metrics import score_answer

log = logging.getLogger(__name__)


def prompt_ids(records: list[dict], processor, suffix: str = "") -> list[list[int]]:
    return [encode(segments(r, processor, with_last_answer=False, suffix=suffix), processor.tokenizer)[0]
            for r in records]


@torch.no_grad()
def generate_image_text(model: nn.Module, processor, records: list[dict], batch_size: int, num_beams: int,
                        max_new_tokens: int, device: torch.device, suffix: str = "") -> list[str]:
    """The generated answers (new tokens, decoded without special tokens), in the order of ``records``."""
    was_training = model.training
    model.eval()
    tokenizer = processor.tokenizer
    ids = prompt_ids(records, processor, suffix)
    order = sorted(range(len(records)), key=lambda i: -len(ids[i]))
    config = GenerationConfig(do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens, use_cache=True,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id)
    outputs = [""] * len(records)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs = generation_inputs([ids[i] for i in chunk], [records[i]["image"] for i in chunk], processor)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        new = model.generate(**inputs, generation_config=config)[:, inputs["input_ids"].shape[1]:]
        for i, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
            outputs[i] = text
    model.train(was_training)
    return outputs


def score_image_text_set(name: str, records: list[dict], generated: list[str]) -> tuple[dict, list[dict]]:
    """The set's mean score as ``accuracy`` (VQA accuracy for VQA sets), and one prediction line per record."""
    set_kind, total, lines = image_text_set(name).kind, 0.0, []
    for record, text in zip(records, generated):
        kind = record.get("kind") or set_kind
        output = text.strip()
        prediction, value = score_answer(kind, output, record)
        total += value
        lines.append({"dataset": name, "id": record["id"], "kind": kind,
                      "question": record["conversations"][-2]["value"],
                      "has_image": record["image"] is not None, "generated": text, "output": output,
                      "prediction": prediction, "label": record["answer"], "answers": record.get("answers"),
                      "score": value, "correct": value == 1.0})
    n = len(records)
    return {"accuracy": total / n if n else 0.0, "correct": sum(line["correct"] for line in lines), "n": n}, lines


def evaluate_image_text_sets(model: nn.Module, processor, eval_sets: dict[str, list[dict]], cfg: EvalConfig,
                             device: torch.device, predictions_dir: Path | None, processes: int = 1, rank: int = 0,
                             suffix: str = "") -> dict:
    """Per set ``accuracy``, ``correct``, ``n``, ``seconds``; ``average`` over the sets; one predictions
    JSONL per set. Under several processes each generates every ``processes``-th record."""
    results: dict = {}
    for name, records in eval_sets.items():
        start = time.perf_counter()
        mine = list(range(rank, len(records), processes))
        budget = cfg.max_new_tokens or image_text_set(name).max_new_tokens
        texts = generate_image_text(model, processor, [records[i] for i in mine], cfg.batch_size, cfg.num_beams,
                                    budget, device, suffix)
        generated = gathered(mine, texts, len(records), processes)
        results[name], lines = score_image_text_set(name, records, generated)
        results[name]["seconds"] = time.perf_counter() - start
        if rank == 0:
            log.info("eval %s: accuracy %.4f (%d/%d) in %.1fs", name, results[name]["accuracy"],
                     results[name]["correct"], len(records), results[name]["seconds"])
        if predictions_dir is not None:
            write_jsonl_atomic(predictions_dir / f"{name}.jsonl", lines)
    if results:
        results["average"] = sum(r["accuracy"] for r in results.values()) / len(results)
    return results
