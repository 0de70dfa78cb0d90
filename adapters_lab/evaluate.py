"""Batched generation and scoring of evaluation sets.

Prompts are sorted by length and left-padded with an attention mask, generation uses the KV
cache and stops at EOS; decoding (beams, new tokens) follows the paper unless configured.
The text parsed is what follows the prompt's "### Response:" up to any further marker the
model writes, as upstream's ``output.split("### Response:")[1]``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
from transformers import GenerationConfig

from adapters_lab.answers import PROTOCOLS, answer_kind, score
from adapters_lab.config import EvalConfig, KVCache
from adapters_lab.data.prompts import RESPONSE_MARKER, eval_prompt
from adapters_lab.files import write_jsonl_atomic

log = logging.getLogger(__name__)


def default_max_new_tokens(dataset: str) -> int:
    """The paper's budgets: 256 new tokens for math, 32 for commonsense (and the synthetic set)."""
    return 256 if answer_kind(dataset) in ("number", "letter") and dataset != "arith" else 32


def response_text(generated: str) -> str:
    return generated.split(RESPONSE_MARKER)[0].strip()


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], batch_size: int, num_beams: int,
             max_new_tokens: int, device: torch.device, cache_implementation: str = "dynamic") -> list[str]:
    """Generated continuations (new tokens only, decoded), in the order of ``prompts``."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    config = GenerationConfig(
        do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, cache_implementation=cache_implementation,
    )
    pad_multiple = 64 if cache_implementation == "static" else None
    outputs: list[str] = [""] * len(prompts)
    pending = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    while pending:
        chunk = pending.pop(0)
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                        pad_to_multiple_of=pad_multiple).to(device)
        try:
            sequences = model.generate(**enc, generation_config=config)
        except torch.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            # The KV cache of the longest prompts (they come first) did not fit: halve and go on.
            del enc
            if device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(chunk) // 2
            log.warning("eval: out of memory at batch %d x %d beams; retrying as two of %d and %d",
                        len(chunk), num_beams, half, len(chunk) - half)
            pending[:0] = [chunk[:half], chunk[half:]]
            continue
        new_tokens = sequences[:, enc["input_ids"].shape[1]:]
        for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text
    model.train(was_training)
    return outputs


def score_set(name: str, records: list[dict], prompts: list[str], generated: list[str],
              protocol: str) -> tuple[dict, list[dict]]:
    """Accuracy under both protocols (``accuracy`` is ``protocol``'s) and one prediction line
    per example carrying both parses."""
    lines, correct = [], {p: 0 for p in PROTOCOLS}
    for record, prompt, text in zip(records, prompts, generated):
        output = response_text(text)
        verdicts = score(name, output, record["answer"], prompt)
        for p in PROTOCOLS:
            correct[p] += verdicts[p]["correct"]
        lines.append({"dataset": name, "prompt": prompt, "generated": text, "output": output,
                      "label": record["answer"], **verdicts,
                      "prediction": verdicts[protocol]["prediction"], "correct": verdicts[protocol]["correct"]})
    n = len(records)
    result = {f"accuracy_{p}": correct[p] / n if n else 0.0 for p in PROTOCOLS}
    return {"accuracy": result[f"accuracy_{protocol}"], **result, "correct": correct[protocol], "n": n}, lines


def evaluate_sets(model: nn.Module, tokenizer, eval_sets: dict[str, list[dict]], cfg: EvalConfig,
                  device: torch.device, predictions_dir: Path | None) -> dict:
    """Per set: ``accuracy`` (``eval.protocol``), ``accuracy_paper``, ``accuracy_strict``; the
    averages over sets likewise; one predictions JSONL per set."""
    protocol = str(getattr(cfg.protocol, "value", cfg.protocol))
    results: dict = {}
    for name, records in eval_sets.items():
        prompts = [eval_prompt(r["instruction"], r["input"]) for r in records]
        max_new = cfg.max_new_tokens or default_max_new_tokens(name)
        start = time.perf_counter()
        generated = generate(model, tokenizer, prompts, cfg.batch_size, cfg.num_beams, max_new, device,
                             KVCache(cfg.cache_implementation).value)
        results[name], lines = score_set(name, records, prompts, generated, protocol)
        results[name]["seconds"] = time.perf_counter() - start
        log.info("eval %s: accuracy %.4f (%s, %d/%d; paper %.4f, strict %.4f) in %.1fs", name,
                 results[name]["accuracy"], protocol, results[name]["correct"], len(records),
                 results[name]["accuracy_paper"], results[name]["accuracy_strict"], results[name]["seconds"])
        if predictions_dir is not None:
            write_jsonl_atomic(predictions_dir / f"{name}.jsonl", lines)
    if results:
        sets = list(results.values())
        results["average"] = sum(r["accuracy"] for r in sets) / len(sets)
        for p in PROTOCOLS:
            results[f"average_{p}"] = sum(r[f"accuracy_{p}"] for r in sets) / len(sets)
    return results
