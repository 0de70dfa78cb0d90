"""Batched generation equals one-at-a-time generation; sets of one budget are generated together
and each gets its own texts; both protocols reach metrics and prediction lines; the benchmark
script's smoke mode reports its table."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from adapters_lab import evaluate
from adapters_lab.config import EvalConfig, Protocol, TinyModelConfig
from adapters_lab.data.arith import arith_splits
from adapters_lab.data.prompts import eval_prompt
from adapters_lab.models import build_tiny_model, build_tiny_tokenizer
from tests.conftest import REPO

CPU = torch.device("cpu")
QUESTIONS = ["Tom has 3 apples.", "Ana has 12 pens and gets 7 more pens. How many pens does Ana have now?",
             "Mia", "Lee has 5 bags with 4 coins in each bag. How many coins does Lee have in all?",
             "Sam has 19 cards. Sam gives away 2 cards."]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(), tokenizer, torch.float32, "sdpa")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def test_batched_generation_equals_batch_size_one(tiny):
    model, tokenizer = tiny
    prompts = [eval_prompt(q) for q in QUESTIONS]
    lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) == len(prompts)  # every batch pads something
    for decoder in ("adapters_lab", "transformers"):
        for beams in (1, 4):  # greedy, and the paper's beam search
            one_by_one = evaluate.generate(model, tokenizer, prompts, 1, beams, 8, CPU, decoder)
            batched = evaluate.generate(model, tokenizer, prompts, 3, beams, 8, CPU, decoder)
            assert batched == one_by_one
            assert len(set(one_by_one)) > 1  # outputs depend on the prompt, so the comparison means something
    model.train()
    evaluate.generate(model, tokenizer, prompts[:1], 1, 1, 2, CPU)
    assert model.training  # generate restores the caller's train/eval mode


def test_out_of_memory_halves_the_batch_and_keeps_every_answer(tiny, monkeypatch, caplog):
    model, tokenizer = tiny
    prompts = [eval_prompt(q) for q in QUESTIONS]
    expected = evaluate.generate(model, tokenizer, prompts, 5, 1, 6, CPU, "transformers")
    real_generate, tried, generated = model.generate, [], []

    def generate_that_fits_two(**kwargs):
        tried.append(kwargs["input_ids"].shape[0])
        if tried[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        generated.append(tried[-1])
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", generate_that_fits_two)
    assert evaluate.generate(model, tokenizer, prompts, 5, 1, 6, CPU, "transformers") == expected
    assert tried == [5, 2, 3, 1, 2] and generated == [2, 1, 2]  # 5 -> 2+3, then 3 -> 1+2
    assert "out of memory at batch 5" in caplog.text


@pytest.mark.parametrize("n, cap, sizes", [(1319, 256, [220] * 5 + [219]), (600, 437, [300, 300]), (5, 5, [5]),
                                           (7, 3, [3, 2, 2]), (0, 4, [])])
def test_batches_are_balanced_and_keep_the_order(n, cap, sizes):
    order = list(range(n))[::-1]
    batches = evaluate.balanced_batches(order, cap)
    assert [len(b) for b in batches] == sizes
    assert [i for b in batches for i in b] == order


def test_batches_are_capped_by_what_their_longest_prompt_fits():
    lengths = [900] * 20 + [300] * 510  # pooled sets: a few long prompts, then many short ones
    order = list(range(len(lengths)))
    fits = lambda i: 20 if lengths[i] == 900 else 256  # noqa: E731
    sizes = [len(b) for b in evaluate.balanced_batches(order, 256, fits)]
    assert sizes == [20, 255, 255]  # the long prompts' cap does not shrink the short prompts' batches
    assert all(size <= fits(b[0]) for size, b in zip(sizes, evaluate.balanced_batches(order, 256, fits)))


@pytest.mark.parametrize("decoder", ["adapters_lab", "transformers"])
def test_generation_stops_at_eos(tiny, decoder):
    model, tokenizer = tiny
    bias = torch.full((len(tokenizer),), -1e4)
    bias[tokenizer.eos_token_id] = 1e4  # the model can only say EOS
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(bias)
    prompts = [eval_prompt("Q?"), eval_prompt("A longer question?")]
    calls = {}
    hook = model.register_forward_hook(lambda *_: calls.__setitem__(beams, calls.get(beams, 0) + 1))
    try:
        outputs = {}
        for beams in (1, 4):
            outputs[beams] = evaluate.generate(model, tokenizer, prompts, 2, beams, 16, CPU, decoder)
    finally:
        hook.remove()
        del head.bias
        head.register_parameter("bias", None)
    assert outputs == {1: ["", ""], 4: ["", ""]}
    assert calls[1] == 1  # greedy: one forward pass, both rows ended at the first token
    assert calls[4] < 16  # beam search stops once every beam has finished, well before the budget


def test_scores_both_protocols_into_metrics_and_lines(tmp_path, monkeypatch):
    records = [{"instruction": "A train ... Answer Choices: (A) 1 (B) 2", "input": "", "answer": "B"},
               {"instruction": "Another ... Answer Choices: (A) 1 (B) 2", "input": "", "answer": "A"}]
    continuations = {0: "A train moves. The answer is (B).### Response: (A)", 1: "Answer is (A)"}

    def canned(model, tokenizer, prompts, *args):
        return [continuations[i] for i in range(len(prompts))]

    monkeypatch.setattr(evaluate, "generate", canned)
    cfg = EvalConfig(protocol=Protocol.strict)
    metrics = evaluate.evaluate_sets(None, None, {"AQuA": records}, cfg, CPU, tmp_path)
    # paper: first capital A-E -> "A" (wrong) for the first, "A" (right) for the second.
    # strict: "(B)" (right), then "A" after "Answer is" (right); text after a second marker is ignored.
    assert metrics["AQuA"]["accuracy_paper"] == 0.5
    assert metrics["AQuA"]["accuracy_strict"] == 1.0
    assert metrics["AQuA"]["accuracy"] == 1.0 and metrics["AQuA"]["n"] == 2
    assert metrics["average"] == 1.0 and metrics["average_paper"] == 0.5
    lines = [json.loads(x) for x in (tmp_path / "AQuA.jsonl").read_text().splitlines()]
    assert lines[0]["output"] == "A train moves. The answer is (B)."
    assert lines[0]["paper"] == {"prediction": "A", "correct": False}
    assert lines[0]["strict"] == {"prediction": "B", "correct": True}
    assert lines[0]["correct"] is True and lines[0]["prediction"] == "B"


def test_sets_of_one_budget_share_one_generate_and_get_their_own_texts(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    questions = arith_splits(0, 11, 20, seed=5)[1]
    eval_sets = {"gsm8k": questions[:4], "AddSub": questions[4:7], "SVAMP": questions[7:]}
    budgets = {"gsm8k": 6, "AddSub": 4, "SVAMP": 6}
    monkeypatch.setattr(evaluate, "default_max_new_tokens", budgets.get)
    real_generate, calls = evaluate.generate, []

    def spy(model, tokenizer, prompts, batch_size, num_beams, max_new_tokens, *args):
        calls.append((len(prompts), max_new_tokens))
        return real_generate(model, tokenizer, prompts, batch_size, num_beams, max_new_tokens, *args)

    monkeypatch.setattr(evaluate, "generate", spy)
    cfg = EvalConfig(batch_size=3, num_beams=1)  # batches of 3 mix gsm8k's and SVAMP's prompts
    metrics = evaluate.evaluate_sets(model, tokenizer, eval_sets, cfg, CPU, tmp_path)
    assert calls == [(8, 6), (3, 4)]  # gsm8k and SVAMP together, AddSub alone
    assert list(metrics) == ["gsm8k", "AddSub", "SVAMP", "average", "average_paper", "average_strict"]
    texts = set()
    for name, records in eval_sets.items():
        prompts = [eval_prompt(r["instruction"], r["input"]) for r in records]
        alone = real_generate(model, tokenizer, prompts, 1, 1, budgets[name], CPU)  # this set, one prompt at a time
        texts.update(alone)
        lines = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert [line["prompt"] for line in lines] == prompts and [line["generated"] for line in lines] == alone
        assert metrics[name] == {**evaluate.score_set(name, records, prompts, alone, "paper")[0],
                                 "seconds": metrics[name]["seconds"], "group_seconds": metrics[name]["group_seconds"]}
    assert len(texts) > 1  # texts depend on the prompt, so a mis-split would show
    gsm8k, svamp = metrics["gsm8k"], metrics["SVAMP"]
    assert gsm8k["group_seconds"] == svamp["group_seconds"] > 0
    assert gsm8k["seconds"] + svamp["seconds"] >= gsm8k["group_seconds"]  # shares of the group's time, plus scoring


def test_default_budgets_follow_the_paper():
    assert evaluate.default_max_new_tokens("gsm8k") == 256
    assert evaluate.default_max_new_tokens("AQuA") == 256
    assert evaluate.default_max_new_tokens("boolq") == 32
    assert EvalConfig().num_beams == 4


def load_bench_eval():
    spec = importlib.util.spec_from_file_location("bench_eval", REPO / "scripts" / "bench_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_eval_suite_times_one_generate_over_every_set(tmp_path, capsys, monkeypatch):
    bench = load_bench_eval()
    for i, name in enumerate(bench.MATH_SUITE):  # i + 1 questions in each set
        (tmp_path / "dataset" / name).mkdir(parents=True)
        records = [{"instruction": f"{name} question {j}?", "answer": "1"} for j in range(i + 1)]
        (tmp_path / "dataset" / name / "test.json").write_text(json.dumps(records))
    real_generate, calls = bench.generate, []

    def spy(model, tokenizer, prompts, *args):
        calls.append(len(prompts))
        return real_generate(model, tokenizer, prompts, *args)

    monkeypatch.setattr(bench, "generate", spy)
    result = bench.main(["--tiny", "--out", str(tmp_path / "suite.json"), "--prompts", "0", "--suite", "1,4",
                         "--max-new-tokens", "2", "--data-dir", str(tmp_path)])
    assert calls[1:] == [28, 28]  # after the warm-up: all 1 + 2 + ... + 7 questions at once, per decoding
    assert [(r["num_beams"], r["questions"]) for r in result["suite"]] == [(1, 28), (4, 28)]
    assert all(r["minutes"] > 0 for r in result["suite"])
    assert "Whole math suite, ours, 4 beam(s), batch 128: 28 questions in one generate" in capsys.readouterr().out


def test_bench_eval_tiny_prints_and_writes_its_table(tmp_path, capsys):
    bench = load_bench_eval()
    out = tmp_path / "bench.json"
    result = bench.main(["--tiny", "--out", str(out), "--prompts", "3", "--upstream-prompts", "1",
                         "--max-new-tokens", "3", "--data-dir", str(tmp_path / "absent"), "--check", "3",
                         "--step-profile", "--batch-size", "2", "--beam-batch-size", "2"])
    for beams, profile in ((1, result["step_profile"]["1_beams"]), (4, result["step_profile"]["4_beams"])):
        assert profile["attended_slots"] == profile["prompt_slots"] + beams * 3 and profile["ms_per_step"] > 0
        assert any("aten::mm" in line for line in profile["top_kernels"])  # the projections are in the profile
        assert set(profile["attention"]) == {"ours", "chosen_backend"}
        assert profile["attention"]["ours"]["kv_gb_per_s"] > 0
        assert profile["attention"]["chosen_backend"] is None  # a CPU decoder leaves the kernel to SDPA
    # fp32 on the CPU: our decoder gives generate's exact texts, greedy and with beams
    assert result["check"]["same_text_as_generate_1_beams"] == result["check"]["same_text_as_generate_4_beams"] == 1.0
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {(r["procedure"], r["num_beams"]): r for r in result["rows"]}
    assert set(rows) == {("ours", 4), ("ours", 1), ("upstream", 4)}
    assert rows[("upstream", 4)]["batch_size"] == 1 and rows[("upstream", 4)]["kv_cache"] == "none"
    assert rows[("ours", 4)]["examples"] == 3 and rows[("upstream", 4)]["examples"] == 1
    for r in rows.values():
        assert r["examples_per_s"] == pytest.approx(r["examples"] / r["seconds"])
        assert r["math_suite_minutes"] == pytest.approx(result["math_suite_questions"] / r["examples_per_s"] / 60)
    speedup = rows[("ours", 4)]["examples_per_s"] / rows[("upstream", 4)]["examples_per_s"]
    assert result["speedup_4beam"] == pytest.approx(speedup)
    table = capsys.readouterr().out
    assert "| procedure | beams | batch | KV cache |" in table and table.count("\n| ours |") == 2
    assert "Speed-up over upstream" in table


def test_progress_lines_per_batch(tiny, caplog):
    model, tokenizer = tiny
    prompts = [eval_prompt(q) for q in QUESTIONS]
    with caplog.at_level("INFO", logger="adapters_lab.eval_progress"):
        evaluate.generate(model, tokenizer, prompts, 2, 1, 2, CPU, "transformers")
    lines = [r.getMessage() for r in caplog.records if r.name == "adapters_lab.eval_progress"]
    assert [line.split(",")[0] for line in lines] == ["eval generate: 2/5 examples", "eval generate: 4/5 examples",
                                                       "eval generate: 5/5 examples"]
    assert all("/s, ETA" in line for line in lines) and lines[-1].endswith("ETA 0s")


def test_a_killed_evaluation_resumes_at_the_next_unfinished_set(tiny, tmp_path, monkeypatch):
    """Sets are kept as they finish; a rerun reuses them (same model, settings, data) and generates only
    the rest; the metrics and prediction lines equal an uninterrupted run's."""
    model, tokenizer = tiny
    questions = arith_splits(0, 6, 20, seed=3)[1]
    eval_sets = {"gsm8k": questions[:3], "AddSub": questions[3:]}
    monkeypatch.setattr(evaluate, "default_max_new_tokens", {"gsm8k": 4, "AddSub": 3}.get)  # two groups
    real_generate, calls = evaluate.generate, []

    def spy(model, tokenizer, prompts, *args):
        calls.append(len(prompts))
        if kill["at"] == len(calls):
            raise KeyboardInterrupt  # the process dies here
        return real_generate(model, tokenizer, prompts, *args)

    kill = {"at": None}
    monkeypatch.setattr(evaluate, "generate", spy)
    cfg = EvalConfig(batch_size=4, num_beams=1)
    whole = evaluate.evaluate_sets(model, tokenizer, eval_sets, cfg, CPU, tmp_path / "whole")
    kill["at"], calls[:] = 2, []
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_sets(model, tokenizer, eval_sets, cfg, CPU, tmp_path / "killed")
    assert (tmp_path / "killed" / "partial" / "gsm8k.json").is_file()
    assert not (tmp_path / "killed" / "partial" / "AddSub.json").exists()
    kill["at"], calls[:] = None, []
    resumed = evaluate.evaluate_sets(model, tokenizer, eval_sets, cfg, CPU, tmp_path / "killed")
    assert calls == [3]  # AddSub only
    for name in eval_sets:
        assert {k: v for k, v in resumed[name].items() if "seconds" not in k} == \
               {k: v for k, v in whole[name].items() if "seconds" not in k}
        assert (tmp_path / "killed" / f"{name}.jsonl").read_text() == (tmp_path / "whole" / f"{name}.jsonl").read_text()
    calls[:] = []  # other settings: nothing is reused
    evaluate.evaluate_sets(model, tokenizer, eval_sets, EvalConfig(batch_size=4, num_beams=2), CPU, tmp_path / "other")
    evaluate.evaluate_sets(model, tokenizer, eval_sets, cfg, CPU, tmp_path / "other")
    assert calls == [3, 3, 3, 3]
    calls[:] = []  # other trainable weights (another adapter): nothing is reused
    evaluate.evaluate_sets(model, tokenizer, eval_sets, cfg, CPU, tmp_path / "killed")
    assert calls == []
    param = next(p for p in model.parameters() if p.requires_grad)
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(1e-3)
        try:
            evaluate.evaluate_sets(model, tokenizer, eval_sets, cfg, CPU, tmp_path / "killed")
        finally:
            param.copy_(saved)
    assert calls == [3, 3]
