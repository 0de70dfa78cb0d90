"""The run report in metrics.json: hashes, sizes, versions and revisions equal what the files and
packages say, memory is None on CPU, and a real pipeline run carries it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from adapters_lab import pipeline, report
from adapters_lab.config import ModelInit


def test_percentile_is_nearest_rank():
    assert report.percentile(list(range(1, 101)), 0.99) == 99
    assert report.percentile(list(range(1, 201)), 0.99) == 198
    assert report.percentile([5, 1, 3], 0.99) == 5 and report.percentile([7], 0.99) == 7


def test_report_fields_from_files_and_packages(tmp_path, monkeypatch):
    data = tmp_path / "test.json"
    data.write_text('[{"instruction": "q"}]')
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"x" * 1234)
    (adapter / "adapter_config.json").write_text("{}")
    metrics = {"train": {"seconds": 3.5}, "params": {"trainable": 10, "total": 100},
               "eval": {"a": {"seconds": 1.0, "likelihood_seconds": 0.5}, "b": {"likelihood_seconds": 2.0},
                        "average": 0.5}}
    tiny = SimpleNamespace(tiny=object(), local_path=None, hub_id=None, revision=None)
    got = report.run_report(metrics, tiny, [data, tmp_path / "absent.json"], adapter,
                            report.MemorySampler(torch.device("cpu")))
    assert got["train_seconds"] == 3.5 and got["eval_seconds"] == 3.5
    assert got["peak_reserved_gib"] is None and got["p99_reserved_gib"] is None
    assert got["adapter_bytes"] == 1234 + 2
    assert got["params"] == {"trainable": 10, "total": 100}
    assert got["versions"]["torch"] == torch.__version__.split("+")[0] or got["versions"]["torch"] == torch.__version__
    assert set(report.PACKAGES) <= set(got["versions"])
    assert got["data_sha256"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    assert got["model_revision"] == "tiny (random init)"
    assert report.folder_bytes(tmp_path / "none") is None


def test_model_revision_hashes_local_files_and_reads_the_hub_cache(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    local = SimpleNamespace(tiny=None, init=ModelInit.pretrained, local_path=str(folder), hub_id=None, revision=None)
    first = report.model_revision(local)
    assert first.startswith("sha256:") and first == report.model_revision(local)
    (folder / "config.json").write_text('{"a": 1}')
    assert report.model_revision(local) != first  # contents count

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--name" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--name" / "refs" / "main").write_text(commit)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = SimpleNamespace(tiny=None, init=ModelInit.pretrained, local_path=None, hub_id="org/name", revision=None)
    assert report.model_revision(hub) == f"org/name@{commit}"
    assert report.model_revision(SimpleNamespace(**{**vars(hub), "hub_id": "org/absent"})) == "org/absent@main"
    random = SimpleNamespace(**{**vars(hub), "name": "llama7b", "init": ModelInit.random})
    assert report.model_revision(random) == "llama7b shape (random init)"


def test_a_run_writes_its_report(make_cfg):
    cfg = make_cfg("adapter=lora")
    pipeline.run(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    got = metrics["report"]
    assert got["train_seconds"] == metrics["train"]["seconds"] > 0
    assert got["eval_seconds"] > 0 and got["params"] == metrics["params"]
    files = sorted((Path(cfg.paths.output_dir) / "adapter").rglob("*"))
    assert got["adapter_bytes"] == sum(p.stat().st_size for p in files if p.is_file()) > 0
    assert got["data_sha256"] == {}  # the synthetic set reads no file


def test_data_files_are_the_files_a_run_reads(make_cfg):
    from adapters_lab.data.sources import data_files

    cfg = make_cfg("dataset=ARC-Easy")
    data_dir = Path(cfg.paths.data_dir)
    assert data_files(cfg.dataset, cfg.paths) == [data_dir / "dataset/ARC-Easy/train.json",
                                                   data_dir / "dataset/ARC-Easy/test.json"]
    assert data_files(cfg.dataset, cfg.paths, needs_train=False) == [data_dir / "dataset/ARC-Easy/test.json"]
