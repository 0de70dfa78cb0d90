"""The LLM-Adapters tables from our runs, with the paper's published numbers beside them.

    python scripts/make_table.py math_main --model llama7b --run   # run the sweep, then the table
    python scripts/make_table.py math_data_main --model llama7b --run   # the paper-era six-set table (math_data)
    python scripts/make_table.py all --model tiny_llama --run --smoke --check   # `make smoke-tables`

For each table (``conf/sweep/<table>.yaml``) it reads every job under the sweep folder (cell =
the job's ``experiment`` choice; value = ``metrics.json``, paper-protocol accuracy in %; a failed
job shows ``failed``) and writes ``<out>/<table>_<model>.{md,csv,tex}`` plus a PNG for placement and
capacity. ``--run`` runs the sweep first (finished cells are skipped by the pipeline; cells whose
adapter config does not exist yet are left out with a note). ``--smoke`` runs on a few
synthetic records per set with a few steps; ``--check`` exits 1 unless every cell of ours is filled.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_lab.data.arith import arith_splits  # noqa: E402
from adapters_lab.data.sources import COMMONSENSE_SETS, TRAIN_FILES  # noqa: E402
from adapters_lab.files import write_json_atomic, write_text_atomic  # noqa: E402
from adapters_lab.runs import METRICS_FILE  # noqa: E402
from adapters_lab.sweep import STATUS_FILE, available_cells  # noqa: E402

REPORT_COLUMNS = ("Train min", "Eval min", "Peak GiB", "Adapter MB")
PROTOCOLS = ("paper", "strict", "likelihood", "likelihood_norm")
TABLES = ("math_main", "math_data_main", "commonsense_main", "placement", "capacity")
IMAGE_TEXT_TABLES = ("mllm_main",)  # image-text models only (not in "all"): scripts/mllm_table.py
MATH_COLUMNS = ["gsm8k", "AQuA", "mawps", "SVAMP"]
MATH_DATA_COLUMNS = ["MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP"]  # the paper-era table
MAIN_COLUMNS = {"math_main": MATH_COLUMNS, "math_data_main": MATH_DATA_COLUMNS, "commonsense_main": COMMONSENSE_SETS}
DISPLAY = {"gsm8k": "GSM8K", "mawps": "MAWPS", "boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA",
           "hellaswag": "HellaSwag", "winogrande": "WinoGrande", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c",
           "openbookqa": "OBQA", "average": "Avg", "attn": "Attn", "mlp": "MLP", "both": "Both"}
METHODS = {"prefix": "Prefix", "series": "Series", "parallel": "Parallel", "lora": "LoRA"}
CAPACITY_WORD = {"r": "rank", "b": "bottleneck", "t": "virtual tokens"}
PAPER = json.loads((ROOT / "scripts" / "paper_numbers.json").read_text(encoding="utf-8"))

# A few steps on a few synthetic records per set: every code path of a real table, on CPU.
SMOKE_OVERRIDES = [
    "trainer.max_steps=2", "trainer.warmup_steps=0", "trainer.batch_size=2", "trainer.micro_batch_size=2",
    "dataset.val_set_size=2", "trainer.eval_every=1", "trainer.progress_bar=false",
    "eval.limit=2", "eval.num_beams=1", "eval.max_new_tokens=4", "eval.batch_size=8",
    "dataset.cutoff_len=128", "logger=none",
]
SWEEP_EXCLUDES = ["sweep", "experiment", "model", "logger", "hydra.sweep.dir", "paths.data_dir"]


@dataclass
class Table:
    name: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    ours: list[tuple[int, int]] = field(default_factory=list)  # (row, col) of every cell of ours
    notes: list[str] = field(default_factory=list)
    figure: dict = field(default_factory=dict)  # series name -> {x: value}


# ---------------------------------------------------------------- reading runs
def collect(sweep_dir: Path) -> dict[str, dict]:
    """Cell (experiment name) -> {"status", "metrics" or "error"} for every job under ``sweep_dir``."""
    cells: dict[str, dict] = {}
    for hydra_yaml in sorted(sweep_dir.rglob(".hydra/hydra.yaml")):
        job_dir = hydra_yaml.parent.parent
        cell = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.choices.experiment")
        if cell is None:
            continue
        if (job_dir / METRICS_FILE).is_file():
            cells[cell] = {"status": "finished", "metrics": json.loads((job_dir / METRICS_FILE).read_text())}
        elif (job_dir / STATUS_FILE).is_file():
            status = json.loads((job_dir / STATUS_FILE).read_text())
            cells.setdefault(cell, {"status": status["status"], "error": status.get("error")})
    return cells


def set_accuracy(metrics: dict, name: str, protocol: str = "paper") -> float | None:
    """One evaluation set's accuracy in % under ``protocol`` (paper, strict, likelihood,
    likelihood_norm), or None where the run has none."""
    result = metrics.get("eval", {}).get(name)
    if not isinstance(result, dict):
        return None
    value = result.get(f"accuracy_{protocol}", result.get("accuracy") if protocol == "paper" else None)
    return None if value is None else 100.0 * value


def mean_accuracy(metrics: dict, names: list[str] | None = None, protocol: str = "paper") -> float | None:
    """Mean accuracy (%) under ``protocol`` over ``names`` (default: every set the run evaluated)."""
    sets = names or [k for k, v in metrics.get("eval", {}).items() if isinstance(v, dict)]
    values = [set_accuracy(metrics, name, protocol) for name in sets]
    return sum(values) / len(values) if values and None not in values else None


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def cell_text(entry: dict | None, value: float | None) -> str:
    if entry is None:
        return ""
    return fmt(value) if entry["status"] == "finished" else "failed"


# ---------------------------------------------------------------- building tables
def paper_model(table: str, model: str) -> str | None:
    models = PAPER[table]["models"]
    return model if model in models else ("llama7b" if "llama7b" in models else None)


def main_table(table: str, model: str, cells: dict[str, dict], kept: list[str], protocol: str = "paper",
               report: bool = False) -> Table:
    columns = MAIN_COLUMNS[table]
    t = Table(table, ["Method"] + [DISPLAY.get(c, c) for c in columns] + ["Avg"])
    ref = paper_model(table, model)
    if ref != model:
        t.notes.append(f"No published numbers for {model}; the paper rows are {ref}'s.")
    for method, label in METHODS.items():
        if f"paper/{method}" not in kept:
            continue
        entry = cells.get(f"paper/{method}")
        metrics = entry.get("metrics", {}) if entry else {}
        row = [f"{label} (ours)"] + [cell_text(entry, set_accuracy(metrics, c, protocol)) for c in columns]
        row.append(cell_text(entry, mean_accuracy(metrics, columns, protocol)))
        t.ours += [(len(t.rows), j) for j in range(1, len(row))]
        t.rows.append(row + (report_cells(metrics) if report else []))
        published = PAPER[table]["models"].get(ref, {}).get(method, {})
        t.rows.append([f"{label} (paper, {ref})"] + [fmt(published.get(c)) for c in columns + ["average"]]
                      + [""] * len(REPORT_COLUMNS) * report)
    for name, published in PAPER[table].get("reference", {}).items():
        t.rows.append([f"{name} (paper)"] + [fmt(published.get(c)) for c in columns + ["average"]]
                      + [""] * len(REPORT_COLUMNS) * report)
    if report:
        t.header += list(REPORT_COLUMNS)
    return t


def report_cells(metrics: dict) -> list[str]:
    """Train and eval minutes, peak reserved GPU GiB and adapter MB from a run's ``report``."""
    got = metrics.get("report") or {}

    def number(value, scale: float, digits: int) -> str:
        return "" if value is None else f"{value / scale:.{digits}f}"

    return [number(got.get("train_seconds"), 60, 1), number(got.get("eval_seconds"), 60, 1),
            number(got.get("peak_reserved_gib"), 1, 1), number(got.get("adapter_bytes"), 1e6, 1)]


def placement_table(model: str, cells: dict[str, dict], kept: list[str], protocol: str = "paper") -> Table:
    positions = ["attn", "mlp", "both"]
    t = Table("placement", ["Method"] + [DISPLAY[p] for p in positions])
    ref = paper_model("placement", model)
    t.notes.append(PAPER["placement"]["note"])
    for method in ("series", "parallel", "lora"):
        if not any(cell.startswith(f"placement/{method}_") for cell in kept):
            continue
        row, paper_row = [f"{METHODS[method]} (ours)"], [f"{METHODS[method]} (paper, {ref})"]
        ours_curve, paper_curve = {}, {}
        published = PAPER["placement"]["models"].get(ref, {}).get(method, {})
        for position in positions:
            entry = cells.get(f"placement/{method}_{position}")
            finished = entry and entry["status"] == "finished"
            value = mean_accuracy(entry["metrics"], protocol=protocol) if finished else None
            row.append(cell_text(entry, value))
            paper_row.append(fmt(published.get(position)))
            if value is not None:
                ours_curve[DISPLAY[position]] = value
            if position in published:
                paper_curve[DISPLAY[position]] = published[position]
        t.ours += [(len(t.rows), j) for j in range(1, len(row))]
        t.rows += [row, paper_row]
        t.figure[f"{METHODS[method]} (ours)"] = ours_curve
        if paper_curve:
            t.figure[f"{METHODS[method]} (paper)"] = paper_curve
    return t


def capacity_table(model: str, cells: dict[str, dict], kept: list[str], protocol: str = "paper") -> Table:
    t = Table("capacity", ["Method", "Capacity", "Size", "Ours", "Paper"])
    t.notes.append(PAPER["capacity"]["note"])
    for cell in kept:
        method, size = cell.removeprefix("capacity/").rsplit("_", 1)
        word, number = CAPACITY_WORD[size[0]], int(size[1:])
        entry = cells.get(cell)
        value = mean_accuracy(entry["metrics"], protocol=protocol) if entry and entry["status"] == "finished" else None
        t.ours.append((len(t.rows), 3))
        t.rows.append([METHODS[method], word, str(number), cell_text(entry, value), ""])
        if value is not None:
            t.figure.setdefault(f"{METHODS[method]} ({word})", {})[number] = value
    return t


# ---------------------------------------------------------------- writing
def markdown(t: Table, title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(cell or "–" for cell in row) + " |" for row in t.rows]
    return "\n".join(lines + [""] + [f"- {note}" for note in t.notes]) + "\n"


def latex(t: Table, title: str) -> str:
    def esc(text: str) -> str:
        return text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")

    lines = [f"% {esc(title)}", "\\begin{tabular}{l" + "r" * (len(t.header) - 1) + "}", "\\toprule",
             " & ".join(esc(h) for h in t.header) + " \\\\", "\\midrule"]
    lines += [" & ".join(esc(cell) or "--" for cell in row) + " \\\\" for row in t.rows]
    return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"]) + "\n"


def csv_text(t: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(t.header)
    writer.writerows(t.rows)
    return buffer.getvalue()


def plot(t: Table, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in t.figure.items():
        xs = list(points)
        style = dict(marker="o", linestyle="--" if "paper" in name else "-")
        if t.name == "capacity":
            ax.plot(xs, [points[x] for x in xs], label=name, **style)
        else:
            ax.plot([str(x) for x in xs], [points[x] for x in xs], label=name, **style)
    if t.name == "capacity":
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank / bottleneck / virtual tokens")
    else:
        ax.set_xlabel("placement")
    ax.set_ylabel("accuracy (%), mean over sets")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_table(t: Table, model: str, out_dir: Path) -> list[Path]:
    title = (f"Multimodal PEFT study table, {model} (ours); accuracy %" if t.name in IMAGE_TEXT_TABLES
             else f"LLM-Adapters {t.name} table, {model} (ours) beside the paper; accuracy %")
    stem = out_dir / f"{t.name}_{model}"
    paths = [stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".tex")]
    for path, text in zip(paths, (markdown(t, title), csv_text(t), latex(t, title))):
        write_text_atomic(path, text)
    if t.name in ("placement", "capacity"):
        paths.append(stem.with_suffix(".png"))
        plot(t, title, paths[-1])
    return paths


def build(table: str, model: str, sweep_dir: Path, protocol: str = "paper", report: bool = False) -> Table:
    """Rows for every cell whose adapter config exists (see ``adapters_lab.sweep.available_cells``),
    accuracies under ``protocol``; ``report``: the main tables gain time, memory and size columns."""
    if table in IMAGE_TEXT_TABLES:
        from scripts.mllm_table import mllm_table

        return mllm_table(model, sweep_dir, Table, fmt)
    cells, kept = collect(sweep_dir), available_cells(table)[0]
    if table == "placement":
        t = placement_table(model, cells, kept, protocol)
    elif table == "capacity":
        t = capacity_table(model, cells, kept, protocol)
    else:
        t = main_table(table, model, cells, kept, protocol, report)
    if protocol != "paper":
        t.notes.append(f"Our cells are {protocol} accuracies (the paper's rows use its own generation protocol).")
    return t


def missing_cells(t: Table) -> list[str]:
    return [f"{t.rows[i][0]} / {t.header[j]}" for i, j in t.ours if t.rows[i][j] in ("", "failed")]


# ---------------------------------------------------------------- running
def write_smoke_data(data_dir: Path, per_set: int = 4) -> None:
    """A tiny LLM-Adapters layout: training files and a few test records per set, answers of each set's type."""
    train, test = arith_splits(64, per_set, 20, 7)
    for source in ("math_10k", "math_data"):
        write_json_atomic(data_dir / TRAIN_FILES[source], train)
    for name in dict.fromkeys(MATH_COLUMNS + MATH_DATA_COLUMNS):
        records = [dict(r) for r in test]
        if name == "AQuA":
            for r in records:
                r["instruction"] += f" Answer Choices: (A){r['answer']} (B)0"
                r["answer"] = "A"
        write_json_atomic(data_dir / "dataset" / name / "test.json", records)
    labels = {"boolq": ["true", "false"], "piqa": ["solution1", "solution2"], "winogrande": ["option1", "option2"],
              "hellaswag": ["ending1", "ending2", "ending3", "ending4"]}
    commonsense = []
    for name in COMMONSENSE_SETS:
        answers = labels.get(name, ["answer1", "answer2", "answer3", "answer4"])
        records = [{"instruction": f"{name} question {i}: pick one of {', '.join(answers)}.", "input": "",
                    "output": f"the correct answer is {answers[i % len(answers)]}", "answer": answers[i % len(answers)]}
                   for i in range(per_set)]
        write_json_atomic(data_dir / "dataset" / name / "test.json", records)
        commonsense += records * 2
    write_json_atomic(data_dir / TRAIN_FILES["commonsense_170k"], commonsense)


def run_sweep(table: str, model: str, sweep_dir: Path, extra: list[str], smoke: bool = False) -> int:
    cells, missing = available_cells(table)
    if missing:
        print(f"{table}: leaving out {len(missing)} cells whose adapter config does not exist yet: "
              f"{', '.join(missing)}")
    if not cells:
        return 0
    command = [sys.executable, str(ROOT / "run.py"), f"sweep={table}", f"model={model}",
               f"experiment={','.join(cells)}", f"hydra.sweep.dir={sweep_dir}", *extra]
    print("+", " ".join(command), flush=True)
    # Tiny models run faster on one thread than with threads fighting over a few cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if smoke else None
    return subprocess.call(command, cwd=ROOT, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", choices=TABLES + IMAGE_TEXT_TABLES + ("all",))
    parser.add_argument("--model", default="llama7b")
    parser.add_argument("--run", action="store_true", help="run the sweep first (finished cells are skipped)")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic data and a few steps (CPU)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every cell of ours is filled")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="paper",
                        help="which accuracy our cells show (likelihood needs runs with eval.scoring=likelihood|both)")
    parser.add_argument("--report", action="store_true",
                        help="main tables: train and eval minutes, peak reserved GPU memory and adapter size per row")
    parser.add_argument("--runs-dir", type=Path, default=None, help="sweep folders (default outputs/tables/runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "tables")
    parser.add_argument("overrides", nargs="*", default=[], help="extra Hydra overrides after --")
    args, extra = parser.parse_known_args(argv)
    tables = list(TABLES) if "all" in args.tables else args.tables
    from scripts.mllm_table import SMOKE as MLLM_SMOKE
    args.out = args.out.resolve()  # the sweep runs in the repository root
    runs_dir = (args.runs_dir or args.out / "runs").resolve()
    overrides = list(args.overrides) + extra
    if args.smoke:
        data_dir = args.out / "smoke_data"
        write_smoke_data(data_dir)
        excludes = ",".join(SWEEP_EXCLUDES + [o.split("=", 1)[0] for o in SMOKE_OVERRIDES])
        image_text = [*MLLM_SMOKE] if set(tables) <= set(IMAGE_TEXT_TABLES) else []
        overrides = [*SMOKE_OVERRIDES, *image_text, f"paths.data_dir={data_dir}",
                     f"hydra.job.config.override_dirname.exclude_keys=[{excludes}]", *overrides]
    incomplete, failed_sweeps = [], []
    for table in tables:
        sweep_dir = runs_dir / table / args.model
        if args.run:
            code = run_sweep(table, args.model, sweep_dir, overrides, args.smoke)
            if code:
                failed_sweeps.append(table)
                print(f"{table}: the sweep exited with {code}; failed jobs are listed in {sweep_dir}/sweep_summary.md")
                for error in sweep_errors(sweep_dir):
                    print(f"  {error}")
        t = build(table, args.model, sweep_dir, args.protocol, args.report)
        for path in write_table(t, args.model, args.out):
            print(f"wrote {path}")
        if missing_cells(t):
            incomplete.append(f"{table}: {', '.join(missing_cells(t))}")
    if incomplete:
        print("cells without a finished run:\n  " + "\n  ".join(incomplete))
    return 1 if failed_sweeps or (incomplete and args.check) else 0


def sweep_errors(sweep_dir: Path) -> list[str]:
    """The distinct first lines of the failed jobs' errors in a sweep's summary."""
    try:
        jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    except (OSError, ValueError, KeyError):
        return []
    return list(dict.fromkeys(job["error"].splitlines()[0] for job in jobs if job.get("error")))


if __name__ == "__main__":
    raise SystemExit(main())
