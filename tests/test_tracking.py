"""W&B tracking, run offline with the network blocked: the run's files and the keys it logged."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import pytest

from adapters_lab.pipeline import run
from adapters_lab.tracking import PREDICTION_COLUMNS, NullTracker, flatten, make_tracker

LOG_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) records


def wandb_records(path: Path) -> list:
    """Every protobuf record of an offline run's ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pos, chunk = path.read_bytes(), [], 7, b""  # 7-byte ":W&B" file header
    while pos + 7 <= len(data):
        left = LOG_BLOCK - pos % LOG_BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # block padding
            pos += left - 7
            continue
        chunk, pos = chunk + data[pos:pos + length], pos + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def finished_records(path: Path, timeout: float = 60.0) -> dict[str, list]:
    """The run file's records by kind, once W&B's service has written the run's ``exit`` record:
    ``finish()`` can return before the service has flushed the file (seen with wandb 0.31)."""
    deadline = time.monotonic() + timeout
    while True:
        by_kind: dict[str, list] = {}
        try:
            for record in wandb_records(path):
                by_kind.setdefault(record.WhichOneof("record_type"), []).append(record)
        except Exception:  # a record still being written
            if time.monotonic() > deadline:
                raise
        if "exit" in by_kind or time.monotonic() > deadline:
            return by_kind
        time.sleep(0.5)


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture
def no_network(monkeypatch):
    """Any non-local connection from this process fails; W&B's service is pointed at a dead port."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family != socket.AF_UNIX and host not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"test blocked a network connection to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    for var in ("WANDB_API_KEY", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")


def test_offline_run_logs_config_curves_eval_and_predictions(make_cfg, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key: mode auto means offline
    cfg = make_cfg("logger=wandb", "logger.mode=auto", "logger.group=unit-sweep", "logger.project=lab-test",
                   "eval.limit=3", "trainer.log_every=1")
    run(cfg)

    out = tmp_path / "run"
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # offline: nothing was sent
    by_kind = finished_records(run_file)

    (run_record,) = [r.run for r in by_kind["run"]]
    assert (run_record.project, run_record.run_group, run_record.job_type) == ("lab-test", "unit-sweep", "lora")
    assert run_record.display_name == "tiny_llama-lora-arith"
    config_keys = {item.key for item in run_record.config.update}
    assert {"model", "adapter", "dataset", "trainer", "eval", "seed"} <= config_keys
    adapter_config = json.loads(next(i.value_json for i in run_record.config.update if i.key == "adapter"))
    assert adapter_config["rank"] == cfg.adapter.rank  # resolved config, not interpolations

    history_keys = {item_key(item) for r in by_kind["history"] for item in r.history.item}
    assert {"train/loss", "train/lr", "val/loss"} <= history_keys
    losses = [json.loads(i.value_json) for r in by_kind["history"] for i in r.history.item if item_key(i) == "train/loss"]
    assert len(losses) == cfg.trainer.max_steps  # one curve point per step with log_every=1

    summary = {item_key(item): json.loads(item.value_json)
               for r in by_kind["summary"] for item in r.summary.update}
    metrics = flatten(json.loads((out / "metrics.json").read_text()))
    for key in ("eval/arith/accuracy", "eval/arith/accuracy_paper", "eval/arith/accuracy_strict",
                "eval/average", "params/trainable", "train/tokens_per_second"):
        assert summary[key] == pytest.approx(metrics[key]), key
    assert "train/peak_memory_gib" in summary

    (table_file,) = (out / "wandb").glob("offline-run-*/files/media/table/eval/predictions_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(PREDICTION_COLUMNS)
    assert len(table["data"]) == 3 and {row[0] for row in table["data"]} == {"arith"}
    written = [json.loads(line) for line in (out / "predictions" / "arith.jsonl").read_text().splitlines()]
    assert [row[4] for row in table["data"]] == [str(line["prediction"]) for line in written]


def test_disabled_and_none_write_nothing(tmp_path, make_cfg, no_network):
    cfg = make_cfg("logger=wandb", "logger.mode=disabled")
    tracker = make_tracker(cfg.logger, {"a": 1}, str(tmp_path), "name")
    tracker.log({"x": 1.0}, step=1)
    tracker.summary({"y": 2})
    tracker.finish()
    assert not (tmp_path / "wandb").exists()
    assert isinstance(make_tracker(make_cfg("logger=none").logger, {}, str(tmp_path), "n"), NullTracker)
    assert isinstance(make_tracker(cfg.logger, {}, str(tmp_path), "n", is_main=False), NullTracker)


@pytest.mark.parametrize("overrides,group", [
    (["sweep=placement"], "placement"), (["experiment=paper/lora"], "paper/lora"), ([], None),
])
def test_default_group_is_the_sweep_or_experiment(overrides, group):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from adapters_lab.tracking import default_group
    from conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert default_group() == group
    finally:
        HydraConfig.instance().cfg = None
