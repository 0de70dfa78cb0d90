"""Every file under conf/ composes against the schemas; the paper's hyper-parameters are what the
sweeps run; typos fail at compose time."""

from __future__ import annotations

import importlib.util
from enum import Enum

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf

from adapters_lab.adapters.registry import adapter_class, schema
from adapters_lab.config import LoggerConfig
from adapters_lab.sweep import sweep_cells
from tests.conftest import CONF_DIR

GROUPS = ["model", "adapter", "dataset", "trainer", "eval", "logger", "paths", "experiment", "sweep",
          "hparams_search", "launcher"]
PLUGINS = {"optuna": "hydra_plugins.hydra_optuna_sweeper", "slurm": "hydra_plugins.hydra_submitit_launcher",
           "local": "hydra_plugins.hydra_joblib_launcher",  # Hydra plugins from the `sweeps` extra
           "gpus": "hydra_plugins.hydra_ray_launcher"}  # the `gpu-sweeps` extra


def compose_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def options(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONF_DIR / group).with_suffix("")) for p in (CONF_DIR / group).rglob("*.yaml"))


@pytest.mark.parametrize("group,name", [(g, n) for g in GROUPS for n in options(g)])
def test_every_conf_file_composes(group, name):
    plugin = PLUGINS.get(name) if group in ("hparams_search", "launcher") else None
    if plugin and importlib.util.find_spec(plugin) is None:
        pytest.skip(f"{plugin} not installed (pip install -e '.[sweeps]', or '.[gpu-sweeps]' for launcher=gpus)")
    cfg = compose_hydra([f"{group}={name}"])
    OmegaConf.to_container(cfg, resolve=False)  # the whole tree is valid against the schemas
    assert cfg.hydra.runtime.choices[group] == name
    if group == "experiment" and not name.startswith("demo"):  # demo_smollm2 pins the demo's real model
        assert cfg.model.name == "tiny_llama"  # experiments never pin a model: tables run any model


@pytest.mark.parametrize("sweep", options("sweep"))
def test_every_sweep_cell_composes_and_gets_its_run_dir(sweep):
    cells = sweep_cells(sweep)
    assert all((CONF_DIR / "experiment" / f"{cell}.yaml").is_file() for cell in cells)
    for cell in (cells[0], cells[-1]):  # every cell file composes in test_every_conf_file_composes
        cfg = compose_hydra([f"sweep={sweep}", f"experiment={cell}", "model=llama7b"])
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        assert cfg.logger.group == sweep
        assert cfg.hydra.sweep.dir.endswith(f"outputs/tables/runs/{sweep}/llama7b")
        subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
        assert subdir.startswith("${hydra:runtime.choices.experiment}/")


PAPER = {  # LLM-Adapters README / paper, LLaMA-7B
    "paper/lora": dict(name="lora", rank=32, alpha=64, modules=["q", "k", "v", "up", "down"], lr=3e-4, batch=16,
                       epochs=3),
    "paper/prefix": dict(name="prefix", num_virtual_tokens=10, lr=3e-2, batch=8, epochs=5),
    "paper/series": dict(name="adapterp", rank=256, modules=["up", "gate"], lr=3e-4, batch=16, epochs=3),
    "paper/parallel": dict(name="parallel", rank=256, modules=["up", "down"], lr=3e-4, batch=16, epochs=3),
}


@pytest.mark.parametrize("cell", sorted(PAPER))
def test_paper_hyperparameters(cell):
    want = PAPER[cell]
    cfg = compose_hydra([f"experiment={cell}"])
    assert cfg.adapter.name == want["name"]
    for key in ("rank", "alpha", "num_virtual_tokens"):
        if key in want:
            assert cfg.adapter[key] == want[key]
    if "modules" in want:
        assert list(cfg.adapter.placement.modules) == want["modules"]
    assert (cfg.trainer.lr, cfg.trainer.batch_size, cfg.trainer.micro_batch_size, cfg.trainer.epochs) == (
        want["lr"], want["batch"], 4, want["epochs"])
    assert cfg.dataset.cutoff_len == 256


def test_capacity_and_placement_cells_change_only_their_axis():
    base = compose_hydra(["experiment=paper/lora"])
    r8 = compose_hydra(["experiment=capacity/lora_r8"])
    assert (r8.adapter.rank, r8.adapter.alpha) == (8, 16)  # alpha = 2 * rank, as the paper's 32/64
    assert r8.trainer == base.trainer
    attn = compose_hydra(["experiment=placement/lora_attn"])
    assert list(attn.adapter.placement.modules) == ["q", "k", "v"] and attn.adapter.rank == 32
    mlp = compose_hydra(["experiment=placement/series_mlp"])
    assert str(mlp.adapter.placement.position) in ("after_mlp", "Position.after_mlp")


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None, reason="optuna sweeper")
def test_hparams_search_uses_optuna_over_lr_and_rank():
    cfg = compose_hydra(["hparams_search=optuna"])
    assert get_class(cfg.hydra.sweeper._target_).__name__ == "OptunaSweeper"
    assert cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {"trainer.lr", "adapter.rank"}
    assert cfg.optimized_metric == "eval/average"


@pytest.mark.parametrize("launcher,cls", [("slurm", "SlurmLauncher"), ("local", "JoblibLauncher"),
                                          ("gpus", "RayLauncher")])
def test_launchers_are_the_hydra_plugins(launcher, cls):
    if importlib.util.find_spec(PLUGINS[launcher]) is None:
        pytest.skip(f"{PLUGINS[launcher]} not installed")
    cfg = compose_hydra([f"launcher={launcher}", "hydra.launcher.partition=gpu"] if launcher == "slurm"
                        else [f"launcher={launcher}"])
    assert get_class(cfg.hydra.launcher._target_).__name__ == cls
    if launcher == "slurm":
        assert (cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.partition) == (1, "gpu")
        assert cfg.hydra.launcher.timeout_min > 0
    if launcher == "gpus":  # Ray runs each job as a task holding one GPU, on a Ray started on this machine
        assert (cfg.hydra.launcher.ray.remote.num_gpus, cfg.hydra.launcher.ray.init.address) == (1, None)


@pytest.mark.parametrize("override,needle", [
    ("adapter.rnak=4", "rnak"), ("trainer.lrr=1", "lrr"), ("model=nope", "nope"), ("adapter=nope", "nope"),
    ("dataset=nope", "nope"), ("sweep=nope", "nope"), ("launcher=nope", "nope"), ("trainer.lr=abc", "abc"),
])
def test_unknown_names_and_typos_fail_at_compose(override, needle):
    with pytest.raises(ConfigCompositionException, match=needle) as info:
        compose_hydra([override])
    assert needle in str(info.value) or needle in str(info.value.__cause__)



def leaves(node, prefix: str = "") -> dict:
    """Dotted key -> value of every non-mapping value in ``node`` (lists are one value)."""
    out = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(leaves(value, f"{path}."))
        else:
            out[path] = value
    return out


def plain(value):
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return value.value if isinstance(value, Enum) else value


def own_keys_and_parent(group: str, name: str):
    """(the keys a variant file sets itself, the config it inherits them onto); None for files with no parent."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
    entries = [e for e in raw.pop("defaults", []) if e != "_self_"]
    if group == "experiment":  # `# @package _global_`: the parent is what its defaults pull in
        overrides = []
        for entry in entries:
            if isinstance(entry, str) and entry.startswith("/experiment/"):
                overrides.append(f"experiment={entry.removeprefix('/experiment/')}")
            else:
                (key, value), = entry.items()
                overrides.append(f"{key.removeprefix('override /')}={value}")
        return leaves(raw), compose_hydra(overrides)
    siblings = [e for e in entries if isinstance(e, str) and not e.startswith("/")]
    if siblings:
        return leaves(raw), compose_hydra([f"{group}={siblings[-1]}"])[group]
    schemas = [e for e in entries if isinstance(e, str) and e.startswith("/schema/adapter/")]
    if schemas:
        return leaves(raw), schema(adapter_class(schemas[0].removeprefix("/schema/adapter/").split("@")[0]))
    if group in GROUP_SCHEMAS:
        return leaves(raw), OmegaConf.structured(GROUP_SCHEMAS[group])
    return None


GROUP_SCHEMAS = {"logger": LoggerConfig}  # groups whose files sit directly on their schema
VARIANTS = [(g, n) for g in ("adapter", "eval", "experiment", "logger") for n in options(g)
            if not (g == "experiment" and (n == "demo" or n.startswith("mllm/")))]


@pytest.mark.parametrize("group,name", VARIANTS)
def test_each_variant_holds_only_its_differences(group, name):
    found = own_keys_and_parent(group, name)
    if found is None:
        pytest.skip(f"{group}/{name} inherits nothing")
    own, parent = found
    same = [key for key, value in own.items()
            if OmegaConf.select(parent, key, throw_on_missing=False) is not None
            and plain(OmegaConf.select(parent, key)) == plain(value)]
    assert not same, f"{group}/{name}.yaml repeats what it inherits: {same}"
