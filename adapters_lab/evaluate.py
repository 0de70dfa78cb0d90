"""Batched generation and scoring of evaluation sets.

Prompts are sorted by length and left-padded with an attention mask, generation uses the KV
cache and stops at EOS; decoding (beams, new tokens) follows the paper unless configured.
The text parsed is what follows the prompt's "### Response:" up to any further marker the
model writes, as upstream's ``output.split("### Response:")[1]``.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from accelerate.utils import broadcast_object_list, gather_object
from transformers import GenerationConfig

from adapters_lab import decoding, eval_progress, likelihood
from adapters_lab.answers import PROTOCOLS, score
from adapters_lab.config import EvalConfig
from adapters_lab.data.prompts import RESPONSE_MARKER, prompt_for
from adapters_lab.data.tasks import eval_task
from adapters_lab.files import write_jsonl_atomic

log = logging.getLogger(__name__)
# Prompt lengths are rounded up to this for our decoder, and a decoder built for longer prompts is
# reused while it has at most REUSE_SLOTS slots more than needed: rebuilding (a cache, its CUDA
# graph captures) costs more than that many masked slots, which the Triton step kernel does not even read.
PROMPT_SLOT_MULTIPLE = 32
REUSE_SLOTS = 96


def default_max_new_tokens(dataset: str) -> int:
    """The paper's budgets (data/tasks.py): 256 new tokens for math, 32 for commonsense and the synthetic set."""
    return eval_task(dataset).max_new_tokens


def response_text(generated: str) -> str:
    return generated.split(RESPONSE_MARKER)[0].strip()


@torch.no_grad()
def planned_batches(model: nn.Module, lengths: list[int], order: list[int], batch_size: int, num_beams: int,
                    max_new_tokens: int, free: int | None) -> list[list[int]]:
    """Batches of prompt indices (longest first); with ``free`` GPU bytes known, no more prompts per batch
    than the KV cache of its longest (first) prompt fits in memory."""
    prompts_fitting = None
    if free is not None:
        def prompts_fitting(index: int) -> int:
            slots = prompt_slots(max(1, lengths[index]))
            return decoding.prompts_that_fit(model, slots, num_beams, max_new_tokens, free)

        longest_fit = prompts_fitting(order[0]) if order else 0
        if order and longest_fit < min(batch_size, len(order)):
            log.info("eval: the longest prompts go %d per batch, not %d: the KV cache of %d prompts of %d tokens, "
                     "%d beams and %d new tokens fits in the GPU's free memory", longest_fit, batch_size,
                     longest_fit, lengths[order[0]], num_beams, max_new_tokens)
    return balanced_batches(order, batch_size, prompts_fitting)


def generate(model: nn.Module, tokenizer, prompts: list[str], batch_size: int, num_beams: int,
             max_new_tokens: int, device: torch.device, decoder: str = "adapters_lab") -> list[str]:
    """Generated continuations (new tokens only, decoded), in the order of ``prompts``.

    ``decoder``: ``adapters_lab`` (``decoding.Decoder``, where ``decoding.supports`` the model)
    or ``transformers`` (``generate``); both give the same tokens. Our decoder takes at most as many
    prompts per batch as their KV cache fits in the GPU's free memory; a batch that runs out of GPU
    memory anyway is halved and retried."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    longest = max(lengths, default=0) + max_new_tokens
    our_decoder = decoder == "adapters_lab" and decoding.supports(model, longest)
    if decoder == "adapters_lab" and not our_decoder:
        log.info("eval: decoding with transformers' generate: our decoder takes llama, mistral and qwen2 models "
                 "without prompt tuning and with full attention over %d tokens (this is a %s model)",
                 longest, model.config.model_type)
    outputs: list[str] = [""] * len(prompts)
    free = free_gpu_bytes(device) if our_decoder else None
    pending = planned_batches(model, lengths, order, batch_size, num_beams, max_new_tokens, free)
    last = LastDecoder()  # the decoder of the last batch, reused while shapes fit
    progress = eval_progress.Progress("eval generate", len(prompts))
    while pending:
        chunk = pending.pop(0)
        try:
            if our_decoder:
                new_tokens = _decode(model, tokenizer, [prompts[i] for i in chunk], last, num_beams, max_new_tokens)
            else:
                new_tokens = _generate(model, tokenizer, [prompts[i] for i in chunk], num_beams, max_new_tokens,
                                       device)
        except torch.OutOfMemoryError as error:
            if len(chunk) == 1:
                raise
            new_tokens, reason = None, str(error).split(". ")[0]
        if new_tokens is None:
            # Not accelerate's find_executable_batch_size: it reruns every batch at the smaller size, where
            # only the failed chunk (the longest prompts) is split here and the finished ones are kept.
            # The KV cache of the longest prompts (they come first) did not fit: halve and go on. Out of
            # the except block, so the failed attempt's tensors (held by the traceback) are free.
            last.decoder = None
            release_memory(device)
            half = len(chunk) // 2
            log.warning("eval: out of memory at batch %d x %d beams (%s); retrying as two of %d and %d",
                        len(chunk), num_beams, reason, half, len(chunk) - half)
            pending[:0] = [chunk[:half], chunk[half:]]
            continue
        for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text
        progress.advance(len(chunk))
    if last.decoder is not None:
        last.decoder = None
        release_memory(device)
    model.train(was_training)
    return outputs


def prompt_slots(length: int) -> int:
    """A prompt length rounded up to ``PROMPT_SLOT_MULTIPLE``: the prompt slots of our decoder."""
    return PROMPT_SLOT_MULTIPLE * math.ceil(length / PROMPT_SLOT_MULTIPLE)


def balanced_batches(order: list[int], batch_size: int, prompts_fitting=None) -> list[list[int]]:
    """``order`` (longest prompt first) cut into batches of at most ``batch_size`` prompts, and at
    most ``prompts_fitting(first)`` where given (how many prompts as long as the batch's first fit in memory),
    each of the rest's average size under that cap: the fewest batches, of nearly one size. Our
    decoder fills a short batch up to the size it was built for, so 1,319 prompts at 256 go as
    6 x 220 rather than 5 x 256 + 39 padded to 256 with copies; and pooled sets whose longest
    prompts need smaller batches do not shrink the batches of the shorter ones."""
    batches, start = [], 0
    while start < len(order):
        cap = max(1, min(batch_size, prompts_fitting(order[start]) if prompts_fitting else batch_size))
        rest = len(order) - start
        size = math.ceil(rest / math.ceil(rest / cap))
        batches.append(order[start : start + size])
        start += size
    return batches


def free_gpu_bytes(device: torch.device) -> int | None:
    """GPU memory free for a decoder once unreferenced tensors are released; None off a GPU."""
    if device.type != "cuda":
        return None
    release_memory(device)
    return torch.cuda.mem_get_info(device)[0]


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _generate(model: nn.Module, tokenizer, prompts: list[str], num_beams: int, max_new_tokens: int,
              device: torch.device) -> torch.Tensor:
    config = GenerationConfig(
        do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    return model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1]:]


@dataclass
class LastDecoder:
    """The decoder built for the last batch (buffers, CUDA graphs), kept for the next one."""

    decoder: decoding.Decoder | None = None


def _decode(model: nn.Module, tokenizer, prompts: list[str], last: LastDecoder, num_beams: int,
            max_new_tokens: int) -> torch.Tensor:
    """Our decoder on one batch, reusing ``last.decoder`` (buffers, CUDA graphs) when the batch
    fits its shape: a shorter last batch is filled up with copies of its last prompt."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    slots = prompt_slots(enc["input_ids"].shape[1])
    decoder = last.decoder
    reusable = decoder is not None and decoder.prompts >= len(prompts) and slots <= decoder.prompt_slots
    if not reusable or decoder.prompt_slots - slots > REUSE_SLOTS:
        decoder = None  # free the old cache (and CUDA graph pool) before allocating the new one; a
        last.decoder = None  # finished decoder can linger in a reference cycle on a GPU, hence the collection
        release_memory(model.get_input_embeddings().weight.device)
        decoder = last.decoder = decoding.Decoder(model, len(prompts), slots, num_beams, max_new_tokens,
                                                  tokenizer.eos_token_id, tokenizer.pad_token_id)
    fill = decoder.prompts - len(prompts)
    ids, mask = (torch.cat([t, t[-1:].expand(fill, -1)]) for t in (enc["input_ids"], enc["attention_mask"]))
    return decoder(ids, mask)[: len(prompts)]


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


def gathered(indices: list[int], texts: list, total: int, processes: int) -> list:
    """Every process's items (``texts[j]`` belongs to prompt ``indices[j]``), in prompt order, on
    every process; with one process, ``texts`` as they are."""
    if processes == 1:
        return texts
    ordered: list = [""] * total
    for index, text in gather_object(list(zip(indices, texts))):
        ordered[index] = text
    return ordered


def evaluate_sets(model: nn.Module, tokenizer, eval_sets: dict[str, list[dict]], cfg: EvalConfig,
                  device: torch.device, predictions_dir: Path | None, processes: int = 1, rank: int = 0) -> dict:
    """Per set: ``accuracy`` (``eval.protocol``'s, or the likelihood's under ``eval.scoring=likelihood``),
    ``accuracy_paper`` and ``accuracy_strict`` when generating, ``accuracy_likelihood`` and
    ``accuracy_likelihood_norm`` when scoring likelihoods (fixed-answer sets); the averages over sets
    likewise; one predictions JSONL per set (where ``predictions_dir`` is given).

    Sets of one budget of new tokens are generated together, by one ``generate`` over all their
    prompts (fewer, fuller batches; in fp32 a prompt's text is the same in any batch). A set's ``seconds``
    is its share (by prompts) of its group's generation time plus its own scoring time;
    ``group_seconds`` is the group's whole generation time; ``likelihood_seconds`` its likelihood
    scoring time. Under several processes (``accelerate launch``) each takes every ``processes``-th
    prompt from ``rank`` on, and every process scores all of them."""
    protocol, scoring, template = cfg.protocol.value, cfg.scoring.value, cfg.prompt_template.value
    prompts = {name: [prompt_for(template, r["instruction"], r["input"]) for r in records]
               for name, records in eval_sets.items()}
    results: dict = {name: {} for name in eval_sets}
    lines = {name: [{"dataset": name, "prompt": prompt, "label": record["answer"]}
                    for record, prompt in zip(records, prompts[name])] for name, records in eval_sets.items()}
    model_hash = eval_progress.model_digest(model)
    keys = {name: eval_progress.set_key(model_hash, cfg, name, prompts[name], eval_sets[name]) for name in eval_sets}
    kept = {name: eval_progress.load_finished(predictions_dir, name, keys[name]) for name in eval_sets}
    if processes > 1:  # process 0 reads the run folder; the others skip the same sets
        kept = broadcast_object_list([kept])[0]
    for name in (n for n in eval_sets if kept[n] is not None):
        results[name], lines[name] = kept[name]["result"], kept[name]["lines"]
    todo = {name: records for name, records in eval_sets.items() if kept[name] is None}
    scores_likelihood = [n for n in todo if scoring in ("likelihood", "both") and likelihood.supports(n)]

    def finished(name: str) -> None:
        if rank == 0:
            log.info("eval %s: %s", name, summary(results[name], protocol))
        if predictions_dir is not None:
            write_jsonl_atomic(predictions_dir / f"{name}.jsonl", lines[name])
            eval_progress.save_finished(predictions_dir, name, keys[name], results[name], lines[name])

    if scoring in ("generate", "both"):
        generate_and_score(model, tokenizer, todo, prompts, cfg, device, results, lines, processes, rank,
                           done=lambda name: None if name in scores_likelihood else finished(name))
    for name in scores_likelihood:
        likelihood_and_score(model, tokenizer, name, eval_sets[name], prompts[name], cfg, device, results[name],
                             lines[name], processes, rank)
        finished(name)
    return with_averages(results)


def summary(result: dict, protocol: str) -> str:
    """One log line's worth of a set's result."""
    parts = []
    if "accuracy_paper" in result:
        parts.append(f"{protocol} {result[f'accuracy_{protocol}']:.4f} ({result['correct']}/{result['n']}; "
                     f"paper {result['accuracy_paper']:.4f}, strict {result['accuracy_strict']:.4f}) "
                     f"in {result['seconds']:.1f}s")
    if "accuracy_likelihood" in result:
        parts.append(f"likelihood {result['accuracy_likelihood']:.4f}, normalised "
                     f"{result['accuracy_likelihood_norm']:.4f} in {result['likelihood_seconds']:.1f}s")
    return "; ".join(parts) or "nothing scored"


def with_averages(results: dict) -> dict:
    """``average`` over every set's ``accuracy``; ``average_<p>`` over the sets that have ``accuracy_<p>``."""
    if not results:
        return results
    sets = list(results.values())
    averaged = dict(results, average=sum(r["accuracy"] for r in sets) / len(sets))
    for key in ("paper", "strict", "likelihood", "likelihood_norm"):
        values = [r[f"accuracy_{key}"] for r in sets if f"accuracy_{key}" in r]
        if values:
            averaged[f"average_{key}"] = sum(values) / len(values)
    return averaged


def generate_and_score(model: nn.Module, tokenizer, eval_sets: dict[str, list[dict]], prompts: dict[str, list[str]],
                       cfg: EvalConfig, device: torch.device, results: dict, lines: dict, processes: int,
                       rank: int, done=lambda name: None) -> None:
    """Generation and both parse protocols for every set, into ``results`` and ``lines`` per set;
    ``done(name)`` once a set is scored."""
    protocol = cfg.protocol.value
    for max_new, names in sets_by_budget(eval_sets, cfg).items():
        start = time.perf_counter()
        texts = generate_together(model, tokenizer, [prompts[name] for name in names], cfg, max_new, device,
                                  processes, rank)
        group_seconds = time.perf_counter() - start
        group_prompts = sum(len(prompts[name]) for name in names)
        for name, generated in zip(names, texts):
            start = time.perf_counter()
            result, scored = score_set(name, eval_sets[name], prompts[name], generated, protocol)
            share = group_seconds * len(generated) / group_prompts if group_prompts else 0.0
            results[name].update(result, seconds=share + time.perf_counter() - start, group_seconds=group_seconds)
            lines[name] = scored
            done(name)


def likelihood_and_score(model: nn.Module, tokenizer, name: str, records: list[dict], prompts: list[str],
                         cfg: EvalConfig, device: torch.device, result: dict, lines: list[dict], processes: int,
                         rank: int) -> None:
    """Likelihood accuracy (summed and per-character) of one fixed-answer set into ``result``; each
    prediction line gains its ``likelihood`` entry. Under several processes each scores a share."""
    start = time.perf_counter()
    mine = list(range(rank, len(records), processes))
    scored = likelihood.score_records(model, tokenizer, name, [records[i] for i in mine], [prompts[i] for i in mine],
                                      cfg.batch_size, device)
    scored = gathered(mine, scored, len(records), processes)
    n = len(records)
    result.update(accuracy_likelihood=sum(s["correct"] for s in scored) / n if n else 0.0,
                  accuracy_likelihood_norm=sum(s["correct_norm"] for s in scored) / n if n else 0.0,
                  likelihood_seconds=time.perf_counter() - start)
    if "accuracy" not in result:  # likelihood alone: it is the set's accuracy
        result.update(accuracy=result["accuracy_likelihood"], correct=sum(s["correct"] for s in scored), n=n)
    for line, entry in zip(lines, scored):
        line["likelihood"] = entry
        line.setdefault("prediction", entry["prediction"])
        line.setdefault("correct", entry["correct"])


def sets_by_budget(eval_sets: dict[str, list[dict]], cfg: EvalConfig) -> dict[int, list[str]]:
    """The sets' names grouped by their budget of new tokens, in the order the sets come."""
    groups: dict[int, list[str]] = {}
    for name in eval_sets:
        groups.setdefault(cfg.max_new_tokens or default_max_new_tokens(name), []).append(name)
    return groups


def generate_together(model: nn.Module, tokenizer, prompt_lists: list[list[str]], cfg: EvalConfig, max_new_tokens: int,
                      device: torch.device, processes: int = 1, rank: int = 0) -> list[list[str]]:
    """The texts of every list of prompts, from one ``generate`` over all of them: this process
    takes every ``processes``-th prompt from ``rank`` on (interleaved: each share spans every prompt
    length), and all processes' texts are gathered, then split back into the lists."""
    pooled = [prompt for prompts in prompt_lists for prompt in prompts]
    mine = list(range(rank, len(pooled), processes))
    texts = generate(model, tokenizer, [pooled[i] for i in mine], cfg.batch_size, cfg.num_beams, max_new_tokens,
                     device, cfg.decoder.value)
    generated = gathered(mine, texts, len(pooled), processes)
    ends = list(itertools.accumulate(len(prompts) for prompts in prompt_lists))
    return [generated[end - len(prompts):end] for prompts, end in zip(prompt_lists, ends)]
