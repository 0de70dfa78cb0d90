"""Likelihood scoring (``eval.scoring=likelihood``): each option's summed log-probability equals a
hand computation on the tiny model, batching changes nothing, the predictions follow lm-evaluation-
harness's acc / acc_norm, and it reaches metrics and prediction lines beside generation."""

from __future__ import annotations

import json

import pytest
import torch

from adapters_lab import evaluate, likelihood
from adapters_lab.config import EvalConfig, Scoring, TinyModelConfig
from adapters_lab.data.prompts import eval_prompt
from adapters_lab.data.records import DataError
from adapters_lab.data.sources import check_scoring
from adapters_lab.models import build_tiny_model, build_tiny_tokenizer

CPU = torch.device("cpu")
ARC = [{"instruction": f"Please choose the correct answer to the question: {q}\n\nAnswer1: {a} Answer2: {b} "
                       f"Answer3: {c}\n\nAnswer format: answer1/answer2/answer3", "input": "", "answer": gold}
       for q, a, b, c, gold in [("Which is a gas?", "air", "rock", "wood", "answer1"),
                                ("What do plants need to grow?", "light", "salt", "noise", "answer1"),
                                ("Which animal can fly?", "dog", "bird", "fish", "answer2")]]
BOOLQ = [{"instruction": f"Please answer the following question with true or false, question: {q}?\n\n"
                         "Answer format: true/false", "input": "", "answer": gold}
         for q, gold in [("is the sky blue", "true"), ("do fish walk", "false")]]
AQUA = [{"instruction": "What is 2 + 2? Answer Choices: (A) 3 (B) 4 (C) 5 (D) 6", "input": "", "answer": "B"}]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(), tokenizer, torch.float32, "sdpa")
    return model.eval(), tokenizer


def hand_loglik(model, tokenizer, prompt: str, text: str) -> float:
    """log p(text | prompt): one unpadded sequence, each response token's log-softmax read one by one."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for k, token in enumerate(answer_ids):
        position = len(prompt_ids) + k - 1  # the logits that predict response token k
        total += (logits[position, token] - torch.logsumexp(logits[position], dim=0)).item()
    return total


@pytest.mark.parametrize("dataset, records", [("ARC-Easy", ARC), ("boolq", BOOLQ), ("AQuA", AQUA)])
def test_logliks_equal_a_hand_computation_and_batch_size_one(tiny, dataset, records):
    model, tokenizer = tiny
    prompts = [eval_prompt(r["instruction"]) for r in records]
    batched = likelihood.score_records(model, tokenizer, dataset, records, prompts, 5, CPU)
    alone = likelihood.score_records(model, tokenizer, dataset, records, prompts, 1, CPU)
    for record, prompt, got, one in zip(records, prompts, batched, alone):
        options = list(got["loglik"])
        assert options == likelihood.options(dataset, prompt) and len(options) > 1
        for option in options:
            text = likelihood.response(dataset, option)
            assert got["loglik"][option] == pytest.approx(hand_loglik(model, tokenizer, prompt, text), abs=1e-4)
            assert got["loglik"][option] == pytest.approx(one["loglik"][option], abs=1e-5)
        best = max(options, key=got["loglik"].get)
        best_norm = max(options, key=lambda o: got["loglik"][o] / len(likelihood.response(dataset, o)))
        assert (got["prediction"], got["prediction_norm"]) == (best, best_norm)
        assert got["correct"] == (best == record["answer"]) and got["correct_norm"] == (best_norm == record["answer"])
    values = {round(v, 6) for s in batched for v in s["loglik"].values()}
    assert len(values) > 2  # log-likelihoods differ by option, so the comparisons mean something


def test_options_come_from_the_record():
    assert likelihood.options("ARC-Easy", ARC[0]["instruction"]) == ["answer1", "answer2", "answer3"]
    assert likelihood.options("boolq", BOOLQ[0]["instruction"]) == ["true", "false"]
    assert likelihood.options("AQuA", AQUA[0]["instruction"]) == ["A", "B", "C", "D"]
    assert likelihood.options("piqa", "no format line") == ["solution1", "solution2"]
    assert likelihood.response("social_i_qa", "answer3") == "the correct answer is answer3"
    assert likelihood.response("mathqa", "C") == "The answer is (C)."
    assert not likelihood.supports("gsm8k") and likelihood.supports("mathqa") and likelihood.supports("winogrande")


def test_out_of_memory_shrinks_the_batch_and_keeps_every_score(tiny, monkeypatch):
    model, tokenizer = tiny
    prompts = [eval_prompt(r["instruction"]) for r in ARC]
    expected = likelihood.score_records(model, tokenizer, "ARC-Easy", ARC, prompts, 1, CPU)
    real, sizes = likelihood._batch_logprobs, []

    def fits_two(model, tokenizer, rows, device):
        sizes.append(len(rows))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate (simulated)")
        return real(model, tokenizer, rows, device)

    monkeypatch.setattr(likelihood, "_batch_logprobs", fits_two)
    got = likelihood.score_records(model, tokenizer, "ARC-Easy", ARC, prompts, 8, CPU)
    assert sizes[0] == 8 and sizes == sorted(sizes, reverse=True)  # shrunk until it fits, never grown back
    assert sum(s for s in sizes if s <= 2) == 9  # 3 records x 3 options, each row scored once
    for a, b in zip(got, expected):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-5)


def test_likelihood_alone_and_beside_generation_in_metrics_and_lines(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    sets = {"ARC-Easy": ARC, "boolq": BOOLQ}
    prompts = {n: [eval_prompt(r["instruction"]) for r in rs] for n, rs in sets.items()}
    expected = {n: likelihood.score_records(model, tokenizer, n, rs, prompts[n], 4, CPU) for n, rs in sets.items()}
    alone = evaluate.evaluate_sets(model, tokenizer, sets, EvalConfig(scoring=Scoring.likelihood, batch_size=4), CPU,
                                   tmp_path / "alone")
    for name, scored in expected.items():
        acc = sum(s["correct"] for s in scored) / len(scored)
        assert alone[name]["accuracy"] == alone[name]["accuracy_likelihood"] == acc
        assert alone[name]["accuracy_likelihood_norm"] == sum(s["correct_norm"] for s in scored) / len(scored)
        assert "accuracy_paper" not in alone[name]
        lines = [json.loads(x) for x in (tmp_path / "alone" / f"{name}.jsonl").read_text().splitlines()]
        assert [line["likelihood"]["prediction"] for line in lines] == [s["prediction"] for s in scored]
        assert [line["correct"] for line in lines] == [s["correct"] for s in scored]
    assert alone["average_likelihood"] == alone["average"]

    monkeypatch.setattr(evaluate, "generate",
                        lambda model, tok, prompts, *a: ["the correct answer is true"] * len(prompts))
    both = evaluate.evaluate_sets(model, tokenizer, {**sets, "gsm8k": [{"instruction": "1+1?", "input": "",
                                                                          "answer": "2"}]},
                                  EvalConfig(scoring=Scoring.both, batch_size=4), CPU, tmp_path / "both")
    assert both["boolq"]["accuracy"] == both["boolq"]["accuracy_paper"] == 0.5  # generation's, as eval.protocol says
    assert both["boolq"]["accuracy_likelihood"] == alone["boolq"]["accuracy_likelihood"]
    assert "accuracy_likelihood" not in both["gsm8k"] and "average_likelihood" in both
    line = json.loads((tmp_path / "both" / "boolq.jsonl").read_text().splitlines()[0])
    assert line["paper"]["prediction"] == "true" and line["likelihood"]["loglik"].keys() == {"true", "false"}


def test_likelihood_alone_refuses_free_number_sets():
    check_scoring(EvalConfig(scoring=Scoring.likelihood), ["boolq", "AQuA"])
    check_scoring(EvalConfig(scoring=Scoring.both), ["boolq", "gsm8k"])
    with pytest.raises(DataError, match=r"eval.scoring=likelihood: \['gsm8k'\] have free-number answers"):
        check_scoring(EvalConfig(scoring=Scoring.likelihood), ["boolq", "gsm8k"])
