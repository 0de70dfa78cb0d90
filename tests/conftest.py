"""Shared fixtures: compose the real configs (shrunk for CPU), tiny models, the data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("ADAPTERS_LAB_ROOT", str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from adapters_lab.config import register_configs  # noqa: E402

register_configs()

# Overrides that make any composed run CPU-sized: a few steps, greedy, short generations.
FAST = [
    "trainer.max_steps=3",
    "trainer.batch_size=4",
    "trainer.micro_batch_size=2",
    "dataset.val_set_size=4",
    "trainer.warmup_steps=1",
    "trainer.progress_bar=false",
    "trainer.device=cpu",
    "dataset.arith.num_train=24",
    "dataset.arith.num_test=4",
    "eval.num_beams=1",
    "eval.max_new_tokens=8",
    "eval.batch_size=4",
    "logger=none",
]


def compose_config(overrides: list[str] = (), output_dir: Path | None = None, fast: bool = True) -> DictConfig:
    """The real ``conf/config.yaml`` composed with ``overrides`` (after the FAST ones)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*(FAST if fast else []), *overrides])
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, fast: bool = True) -> DictConfig:
        return compose_config(list(overrides), tmp_path / "run", fast=fast)

    return _make


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "llm_adapters").is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA
