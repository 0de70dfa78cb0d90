"""The multimodal PEFT study's table (Zhou et al. 2024, main results): rows method x connector
(trained / frozen), columns the datasets found under a model's ``mllm_main`` sweep folder, our
accuracy % (VQA accuracy for VQA sets). ``scripts/make_table.py mllm_main`` builds it with this."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from adapters_lab.runs import METRICS_FILE
from adapters_lab.sweep import STATUS_FILE

METHODS = {"mllm/lora": "LoRA", "mllm/ia3": "IA3", "mllm/adapter": "Adapter", "mllm/prefix": "Prefix"}
ORDER = ["scienceqa", "vizwiz", "iconqa", "okvqa", "ocrvqa", "vqav2", "flickr30k", "shapes", "mllm_file"]
DISPLAY = {"scienceqa": "ScienceQA", "vizwiz": "VizWiz", "iconqa": "IconQA", "okvqa": "OKVQA", "ocrvqa": "OCRVQA",
           "vqav2": "VQAv2", "flickr30k": "Flickr30k", "shapes": "Shapes", "mllm_file": "File"}
# the smoke run: the embedded shapes task, prompts long enough for the image tokens
SMOKE = ["dataset=shapes", "dataset.cutoff_len=512", "trainer.precision=fp32", "dataset.shapes.num_train=8",
         "dataset.shapes.num_test=2"]


def collect_mllm(sweep_dir: Path) -> tuple[dict[tuple[str, bool], dict], list[str]]:
    """(experiment, train_connector) -> {dataset: accuracy or "failed"}, and the datasets seen."""
    cells: dict[tuple[str, bool], dict] = {}
    seen: set[str] = set()
    for hydra_yaml in sorted(sweep_dir.rglob(".hydra/hydra.yaml")):
        job = hydra_yaml.parent.parent
        experiment = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.choices.experiment")
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        key = (experiment, bool(OmegaConf.select(config, "model.train_connector")))
        sets = list(OmegaConf.select(config, "dataset.eval_sets") or [])
        seen.update(sets)
        if (job / METRICS_FILE).is_file():
            evaluated = json.loads((job / METRICS_FILE).read_text()).get("eval", {})
            cells.setdefault(key, {}).update({s: 100 * evaluated[s]["accuracy"] for s in sets if s in evaluated})
        elif (job / STATUS_FILE).is_file():
            cells.setdefault(key, {}).update({s: "failed" for s in sets})
    return cells, sorted(seen, key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER))


def mllm_table(model: str, sweep_dir: Path, table_class, fmt):
    """The study's layout as ``make_table.Table`` (``fmt`` formats a percentage)."""
    cells, sets = collect_mllm(sweep_dir)
    t = table_class("mllm_main", ["Method", "Connector"] + [DISPLAY.get(s, s) for s in sets] + ["Avg"])
    for experiment, label in METHODS.items():
        for connector in (True, False):
            entry = cells.get((experiment, connector))
            values = [entry.get(s) if entry else None for s in sets]
            numbers = [v for v in values if isinstance(v, float)]
            average = sum(numbers) / len(numbers) if numbers and len(numbers) == len(sets) else None
            row = [label, "trained" if connector else "frozen"]
            row += ["" if entry is None else v if isinstance(v, str) else fmt(v) for v in values] + [fmt(average)]
            t.ours += [(len(t.rows), j) for j in range(2, len(row) - 1)]
            t.rows.append(row)
    t.notes.append(f"{model}: the study's four methods on the language model, connector trained or frozen; "
                   "VQA sets show the standard VQA accuracy, the others accuracy %.")
    return t
