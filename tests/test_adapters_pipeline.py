"""Every ``conf/adapter/*.yaml`` runs end to end through the one pipeline (``python run.py
model=tiny_llama adapter=NAME trainer.max_steps=5``, in-process and shrunk), so a new adapter
cannot be added untested; the run reports what it adapted and its parameter counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adapters_lab.pipeline import run

ADAPTERS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "adapter").glob("*.yaml"))


def test_the_glob_sees_every_family():
    assert {"lora", "dora", "ia3", "series", "parallel", "adapterh", "adapterp", "prefix", "prompt",
            "none"} <= set(ADAPTERS)


@pytest.mark.parametrize("name", ADAPTERS)
def test_run_py_works_for_every_adapter(make_cfg, tmp_path, name):
    cfg = make_cfg("model=tiny_llama", f"adapter={name}", "trainer.max_steps=5", "eval.limit=2")
    run(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    params = metrics["params"]
    assert 0 <= params["trainable"] < params["total"]
    assert metrics["adapter"]["summary"].startswith(f"{name}:")
    assert set(metrics["eval"]) >= {"average"}
    if name == "none":
        assert params["trainable"] == 0 and "train" not in metrics
    else:
        assert params["trainable"] > 0 and metrics["adapter"]["modules"] > 0
        assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
        assert all(math.isfinite(v) for k, v in metrics["train"].items() if "loss" in k and isinstance(v, float))
