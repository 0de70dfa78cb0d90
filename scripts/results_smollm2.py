"""docs/results-smollm2.md from the SmolLM2 study's runs (scripts/study_smollm2.py): every number is read
from a run's metrics.json (and config.yaml for what the run was); a cell without a run shows "–".

    python scripts/results_smollm2.py                                       # docs/study_smollm2/*.tar.gz -> docs/results-smollm2.md
    python scripts/results_smollm2.py outputs/study_smollm2                 # a study folder
    python scripts/results_smollm2.py a.tar.gz b.tar.gz                     # several study calls, in order (later runs win)
    python scripts/results_smollm2.py study_smollm2.tar.gz --out /tmp/r.md  # the study's --export archive
    python scripts/results_smollm2.py --template                            # the layout alone, no runs

Accuracies are in %: the mean over seeds, with (min–max) where there are several. "Beats zero-shot"
means its mean is above zero-shot's by more than the spread: the largest max−min range of its own
seeds, zero-shot's and LoRA's (the families run with one seed have no range of their own).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["none", "lora", "dora", "ia3", "adapterh", "adapterp", "parallel", "prefix", "prompt"]
LABELS = {"none": "zero-shot", "lora": "LoRA", "dora": "DoRA", "ia3": "IA3", "adapterh": "AdapterH",
          "adapterp": "AdapterP", "parallel": "Parallel", "prefix": "Prefix", "prompt": "Prompt"}
MATH = ["MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP", "mawps"]  # the paper's column order
COMMONSENSE = ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"]
SHORT = {"gsm8k": "GSM8K", "mawps": "MAWPS", "boolq": "BoolQ", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c",
         "openbookqa": "OBQA"}
PROTOCOLS = {"paper": "accuracy_paper", "strict": "accuracy_strict", "likelihood": "accuracy_likelihood",
             "likelihood, per character": "accuracy_likelihood_norm"}
DASH = "–"
TUNING = ROOT / "docs" / "study_smollm2" / "tuning" / "lr_demo_cpu.tar.gz"  # make tune-smollm2


def load_runs(source: Path) -> tuple[list[dict], dict]:
    """Every run under ``source`` (a folder, or the study's tar.gz): config, metrics, sample predictions."""
    if source.suffix == ".gz":
        tmp = Path(tempfile.mkdtemp(prefix="results_smollm2."))
        with tarfile.open(source) as tar:
            tar.extractall(tmp, filter="data")
        source = tmp
    runs = []
    for path in sorted(source.rglob("metrics.json")):
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
        samples = {}
        for folder in ("predictions_head", "predictions"):
            for file in sorted((path.parent / folder).glob("*.jsonl")):
                samples.setdefault(file.stem, [json.loads(line) for line in file.read_text().splitlines()[:3]])
        runs.append({"dir": path.parent, "config": config, "metrics": json.loads(path.read_text()),
                     "samples": samples, "dataset": config["dataset"]["name"], "method": config["adapter"]["name"],
                     "seed": config["seed"]})
    study = next(iter(sorted(source.rglob("study.json"))), None)
    return runs, (json.loads(study.read_text()) if study else {})


def load_all(sources: list[Path]) -> tuple[list[dict], list[dict]]:
    """The runs of several study calls (later sources win for the same dataset, method and seed: a call that
    resumes a study exports every run so far) and each call's study.json, in order."""
    runs, studies = {}, []
    for source in sources:
        found, study = load_runs(source)
        runs.update({(r["dataset"], r["method"], r["seed"]): r for r in found})
        if study:
            studies.append({**study, "source": source.name})
    return list(runs.values()), studies


def scores(runs: list[dict], dataset: str, method: str, eval_set: str, key: str) -> list[float]:
    return [100 * r["metrics"]["eval"][eval_set][key] for r in runs
            if r["dataset"] == dataset and r["method"] == method
            and key in r["metrics"].get("eval", {}).get(eval_set, {})]


def cell(values: list[float]) -> str:
    if not values:
        return DASH
    mean = statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ({min(values):.1f}–{max(values):.1f}, {len(values)} seeds)"


def spread(values: list[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else 0.0


def verdict(runs, dataset, method, eval_set, key) -> str:
    own, zero, lora = (scores(runs, dataset, m, eval_set, key) for m in (method, "none", "lora"))
    if not own or not zero:
        return DASH
    gap = statistics.fmean(own) - statistics.fmean(zero)
    bar = max(spread(own), spread(zero), spread(lora))
    return f"{gap:+.1f} vs spread {bar:.1f}: {'yes' if gap > bar else 'no'}"


def protocols_present(runs: list[dict], template: bool) -> list[str]:
    if template:
        return ["paper", "strict"]
    return [name for name, key in PROTOCOLS.items()
            if any(key in s for r in runs for s in r["metrics"].get("eval", {}).values() if isinstance(s, dict))]


def arith_section(runs, protocols) -> list[str]:
    n = next((r["metrics"]["eval"]["arith"]["n"] for r in runs if r["dataset"] == "arith"), DASH)
    lines = [f"## (a) arith: synthetic arithmetic, held-out test split ({n} problems)", "",
             "| method | " + " | ".join(protocols) + " | beats zero-shot (paper) | trainable params |",
             "| --- |" + " ---: |" * (len(protocols) + 2)]
    for method in METHODS:
        params = next((f"{r['metrics']['params']['trainable']:,}" for r in runs
                       if r["dataset"] == "arith" and r["method"] == method), DASH)
        cells = [cell(scores(runs, "arith", method, "arith", PROTOCOLS[p])) for p in protocols]
        beats = DASH if method == "none" else verdict(runs, "arith", method, "arith", PROTOCOLS["paper"])
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {beats} | {params} |")
    return lines + [""]


def suite_table(runs, protocol: str, columns: list[str], trained_on) -> list[str]:
    """One protocol: a row per method, a column per evaluation set, and their average."""
    key = PROTOCOLS[protocol]
    header = "| method | " + " | ".join(SHORT.get(c, c) for c in columns) + " | Avg |"
    lines = [f"{protocol}:", "", header, "| --- |" + " ---: |" * (len(columns) + 1)]
    for method in METHODS:
        per_set = [scores(runs, trained_on(c), method, c, key) for c in columns]
        means = [statistics.fmean(v) for v in per_set if v]
        avg = f"{statistics.fmean(means):.1f}" if len(means) == len(columns) else DASH
        lines.append(f"| {LABELS[method]} | " + " | ".join(cell(v) for v in per_set) + f" | {avg} |")
    return lines + [""]


def majority(data_root: Path, name: str) -> tuple[float, str, int] | None:
    """(share in %, answer, test size) of the most common answer of a commonsense test set."""
    path = data_root / "llm_adapters" / "dataset" / name / "test.json"
    if not path.is_file():
        return None
    answers = [r["answer"] for r in json.loads(path.read_text())]
    top = max(set(answers), key=answers.count)
    return 100 * answers.count(top) / len(answers), top, len(answers)


def chance_section(runs, data_root: Path, protocols: list[str]) -> list[str]:
    """Each commonsense set's best fine-tuned score (any family, any protocol) against always giving its
    majority answer, with the binomial standard error of that share on the test size."""
    lines = ["## Commonsense against the majority class", "",
             "Beating zero-shot is not learning the task: a model that always gives the majority answer scores the "
             "share below. The best cell is the maximum over every family and protocol (many comparisons, so it "
             "leans high); \"above chance\" needs it more than 2 standard errors above the majority share.", "",
             "| set | majority answer | majority % | 2 x s.e. | best fine-tuned % (family, protocol) | LoRA likelihood % "
             "| above chance |", "| --- | --- | ---: | ---: | --- | ---: | --- |"]
    for name in COMMONSENSE:
        facts = majority(data_root, name)
        cells = [(statistics.fmean(v), m, p) for m in METHODS if m != "none" for p in protocols
                 if (v := scores(runs, name, m, name, PROTOCOLS[p]))]
        if facts is None or not cells:
            lines.append(f"| {SHORT[name]} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} |")
            continue
        share, answer, n = facts
        se2 = 200 * (share / 100 * (1 - share / 100) / n) ** 0.5
        best, method, protocol = max(cells)
        lora = scores(runs, name, "lora", name, PROTOCOLS["likelihood"])
        lines.append(f"| {SHORT[name]} | {answer} | {share:.1f} | {se2:.1f} | {best:.1f} ({LABELS[method]}, {protocol}) "
                     f"| {cell(lora)} | {'yes' if best - share > se2 else 'no'} |")
    return lines + [""]


def summary(runs, data_root: Path) -> list[str]:
    """Where LoRA's mean clears zero-shot by more than the spread (paper protocol), and, for the commonsense
    sets, whether any fine-tuned cell clears the majority class (``chance_section``)."""
    def gap(dataset, eval_set):
        own, zero = (scores(runs, dataset, m, eval_set, PROTOCOLS["paper"]) for m in ("lora", "none"))
        return statistics.fmean(own) - statistics.fmean(zero) if own and zero else None

    pairs = [("arith", "arith")] + [("math_data", m) for m in MATH]
    learned = [f"{SHORT.get(e, e)} {g:+.1f}" for d, e in pairs if (g := gap(d, e)) is not None
               and g > 0 and "yes" in verdict(runs, d, "lora", e, PROTOCOLS["paper"])]
    flat = [SHORT.get(e, e) for d, e in pairs if gap(d, e) is not None and SHORT.get(e, e) not in
            {x.split(" ")[0] for x in learned}]
    at_chance = [row.split(" | ")[0].strip("| ") for row in chance_section(runs, data_root, list(PROTOCOLS))
                 if row.endswith("| no |")]
    return ["## Summary", "",
            f"- LoRA clearly beats zero-shot (paper protocol, LoRA minus zero-shot in points): {', '.join(learned) or DASH}.",
            f"- No clear gain: {', '.join(flat) or DASH}.",
            f"- Commonsense sets where no family and no protocol clears the majority class: {', '.join(at_chance) or DASH}"
            " (the generation gains over zero-shot there are the answer format, not the answers).", ""]


def tuning_section(archive: Path) -> list[str]:
    """The learning-rate sweep of the demo's recipe (LoRA, arith, 12 steps, 2 CPU cores), from its runs'
    metrics.json in ``archive`` (``make tune-smollm2``)."""
    if not archive.is_file():
        return []
    runs, _ = load_runs(archive)
    lines = ["## A small tuning sweep: the learning rate", "",
             f"LoRA with the demo's recipe (`experiment=demo_smollm2`: arith, 12 optimiser steps, warm-up 10, response-only "
             f"loss, greedy), one seed, 2 CPU cores shared with other work (so the seconds are long), learning rate swept; "
             f"runs in `{archive.name}`.", "",
             "| lr | held-out accuracy (paper) | correct | train s |", "| ---: | ---: | ---: | ---: |"]
    for run in sorted(runs, key=lambda r: r["config"]["trainer"]["lr"]):
        score = run["metrics"]["eval"]["arith"]
        lines.append(f"| {run['config']['trainer']['lr']:g} | {100 * score['accuracy_paper']:.1f} | "
                     f"{score['correct']}/{score['n']} | {run['metrics']['train']['seconds']:.0f} |")
    return lines + [""]


def chance_row(data_root: Path) -> str:
    """Majority-class share of each commonsense test set (the score of always giving one answer)."""
    cells = []
    for name in COMMONSENSE:
        path = data_root / "llm_adapters" / "dataset" / name / "test.json"
        if not path.is_file():
            cells.append(DASH)
            continue
        answers = [r["answer"] for r in json.loads(path.read_text())]
        top = max(set(answers), key=answers.count)
        cells.append(f"{100 * answers.count(top) / len(answers):.1f} ({top})")
    return "Majority class of each test set: " + ", ".join(f"{SHORT[n]} {c}" for n, c in zip(COMMONSENSE, cells)) + "."


def learning_section(runs, protocols) -> list[str]:
    lines = ["## Where it learns and where it stays at zero-shot", "",
             "LoRA against zero-shot, per set and protocol (mean gap in points; spread as defined above):", "",
             "| trained on | evaluated on | " + " | ".join(protocols) + " |",
             "| --- | --- |" + " --- |" * len(protocols)]
    pairs = [("arith", "arith")] + [(c, c) for c in COMMONSENSE] + [("math_data", m) for m in MATH]
    for dataset, eval_set in pairs:
        cells = [verdict(runs, dataset, "lora", eval_set, PROTOCOLS[p]) for p in protocols]
        lines.append(f"| {dataset} | {SHORT.get(eval_set, eval_set)} | " + " | ".join(cells) + " |")
    return lines + [""]


def timing_section(runs) -> list[str]:
    lines = ["## Runs: wall time and throughput", "",
             "| trained on | method | seed | steps | train s | train tokens/s | eval s (all sets) | peak GiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(runs, key=lambda r: (r["dataset"], order.get(r["method"], 99), r["seed"])):
        train, metrics = r["metrics"].get("train"), r["metrics"]
        eval_s = sum(s.get("seconds", 0.0) for s in metrics.get("eval", {}).values() if isinstance(s, dict))
        peak = metrics.get("peak_memory_gib")
        steps, secs, tps = (train["steps"], f"{train['seconds']:.1f}", f"{train['tokens_per_second']:,.0f}") \
            if train else (DASH, DASH, DASH)
        lines.append(f"| {r['dataset']} | {LABELS.get(r['method'], r['method'])} | {r['seed']} | {steps} | {secs} | "
                     f"{tps} | {eval_s:.1f} | {f'{peak:.1f}' if peak else DASH} |")
    return lines + [""]


def question(prompt: str) -> str:
    text = prompt.split("### Instruction:")[-1].split("### Response:")[0]
    return " ".join(text.split())[:160]


def samples_section(runs) -> list[str]:
    lines = ["## Sample outputs (seed 1, the first predictions of each set)", ""]
    for dataset, eval_set in [("arith", "arith"), ("ARC-Easy", "ARC-Easy"), ("boolq", "boolq"), ("math_data", "gsm8k")]:
        for method in ("none", "lora"):
            run = next((r for r in runs if r["dataset"] == dataset and r["method"] == method and r["seed"] == 1), None)
            for record in (run["samples"].get(eval_set, [])[:2] if run else []):
                said = " ".join(str(record.get("generated", "")).split())[:200]
                lines.append(f"- {eval_set}, {LABELS[method]}: {question(record.get('prompt', ''))!r} -> {said!r} "
                             f"(label {record.get('label')}, {'correct' if record.get('correct') else 'wrong'})")
    return (lines if len(lines) > 2 else lines + [DASH]) + [""]


def header(runs, studies: list[dict], template: bool) -> list[str]:
    lines = ["# SmolLM2-135M-Instruct: every adapter family against zero-shot", ""]
    if template:
        return lines + ["No runs yet: this is the layout `scripts/results_smollm2.py` writes. Run the study on a GPU",
                        "(`make study-smollm2`, or `scripts/study_smollm2.py` as its docstring says), then",
                        "`make results-smollm2` (or `python scripts/results_smollm2.py <study dir or archive>`).", ""]
    names = ", ".join(f"`{s['source']}`" for s in studies)
    lines += [f"Generated by `scripts/results_smollm2.py` from the metrics.json of {len(runs)} runs in {names or DASH}.",
              ""]
    for study in studies:
        lines += [f"Study call started {study.get('started', DASH)} on {study.get('device', DASH)} (commit "
                  f"{study.get('commit', DASH)}, torch {study.get('torch', DASH)}, transformers "
                  f"{study.get('transformers', DASH)}), budget {study.get('budget_s', DASH)} s, "
                  f"{study.get('seconds', 0):.0f} s used, {study.get('parallel', 1)} sweep(s) at a time."
                  f"{' TINY random-init model: plumbing only, not results.' if study.get('tiny') else ''}", "",
                  "| sweep | status | seconds |", "| --- | --- | ---: |"]
        lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} |" for s in study.get("sweeps", [])]
        lines.append("")
    return lines


def settings_section(runs) -> list[str]:
    lines = ["## Settings, and what differs from the paper", ""]
    seen = {}
    for r in runs:
        c = r["config"]
        seen.setdefault(r["dataset"], (c["trainer"]["max_steps"], c["trainer"]["warmup_steps"], c["trainer"]["batching"],
                                       c["eval"]["num_beams"], c["eval"]["limit"], c["dataset"]["train_on_inputs"]))
    lrs = {r["method"]: r["config"]["trainer"]["lr"] for r in runs if r["method"] != "none"}
    for dataset, (steps, warm, batching, beams, limit, inputs) in sorted(seen.items()):
        lines.append(f"- {dataset}: {steps} optimiser steps (paper: 3 epochs), warm-up {warm} steps (paper: 100), "
                     f"batching {batching}, {beams} beam(s) (paper: 4), eval limit {limit or 'none'}, "
                     f"train_on_inputs={inputs} (paper: true)")
    if lrs:
        lines.append("- learning rates (paper: 3e-4 for LoRA and the bottleneck adapters): "
                     + ", ".join(f"{LABELS.get(m, m)} {lr:g}" for m, lr in sorted(lrs.items())))
    return lines + [""]


def render(runs, studies: list[dict], data_root: Path, template: bool) -> str:
    protocols = protocols_present(runs, template)
    lines = header(runs, studies, template) + ([] if template else summary(runs, data_root))
    lines += arith_section(runs, protocols)
    lines += ["## (b) math_data, evaluated on the math suite", ""]
    for p in protocols:
        lines += suite_table(runs, p, MATH, lambda _: "math_data")
    lines += ["## (c) commonsense: each set's train split, evaluated on its test set", "", chance_row(data_root), ""]
    for p in protocols:
        lines += suite_table(runs, p, COMMONSENSE, lambda name: name)
    lines += learning_section(runs, protocols) + chance_section(runs, data_root, protocols) + settings_section(runs)
    lines += tuning_section(TUNING) + timing_section(runs) + samples_section(runs)
    lines += ["Regenerate: `make study-smollm2` (GPU) then `make results-smollm2`; "
              "definitions in `scripts/results_smollm2.py`'s docstring.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", type=Path, default=sorted((ROOT / "docs" / "study_smollm2").glob("*.tar.gz")),
                        help="study folders or archives, in the order of the calls (default: docs/study_smollm2/)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results-smollm2.md")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--template", action="store_true", help="write the layout with no runs")
    args = parser.parse_args()
    runs, studies = ([], []) if args.template else load_all(args.sources)
    if not runs and not args.template:
        raise SystemExit(f"error: no metrics.json under {', '.join(map(str, args.sources)) or 'docs/study_smollm2/'}")
    args.out.write_text(render(runs, studies, args.data_root, args.template))
    print(f"wrote {args.out} from {len(runs)} runs")


if __name__ == "__main__":
    main()
