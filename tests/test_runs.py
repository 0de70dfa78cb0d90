"""A run folder belongs to one config: finished results reused only by the same fingerprint, resume
refused with other settings, an exclusive lock naming its holder, overwrite that replaces results only
once the new run has finished, result files readable by the group."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adapters_lab import pipeline
from adapters_lab.files import write_json_atomic
from adapters_lab.runs import FolderLock, RunFolderError, fingerprint
from tests.conftest import FAST, REPO, compose_config


class Built(Exception):
    """Raised by a patched build_model: the run got past every folder check."""


def no_build(*_):
    raise Built


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every result file's bytes (not the lock, Hydra's folder or the staging area)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock" and ".staging" not in p.parts}


def test_fingerprint_keeps_what_changes_results_only():
    base = fingerprint(compose_config(["trainer.progress_bar=true"]))
    assert fingerprint(compose_config(["trainer.progress_bar=false", "trainer.log_every=1", "paths.output_dir=/x",
                                       "trainer.checkpoint_every=7", "overwrite=true"])) == base
    assert base["adapter.rank"] == 32 and base["trainer.lr"] == 3e-4 and base["seed"] == 42
    assert not any(key.startswith(("paths.", "logger.", "hydra.")) for key in base)
    for override, key in [("trainer.lr=1e-2", "trainer.lr"), ("adapter.rank=8", "adapter.rank"), ("seed=1", "seed"),
                          ("dataset.cutoff_len=64", "dataset.cutoff_len"), ("eval.num_beams=2", "eval.num_beams"),
                          ("model.tiny.hidden_size=24", "model.tiny.hidden_size")]:
        changed = fingerprint(compose_config([override]))
        assert [k for k in base if changed.get(k) != base[k]] == [key], override


def test_finished_folder_is_reused_only_by_its_own_config(make_cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    value = pipeline.run(make_cfg())
    before = snapshot(out)
    assert json.loads((out / "metrics.json").read_text())["fingerprint"] == fingerprint(make_cfg())

    monkeypatch.setattr(pipeline, "build_model", no_build)
    assert pipeline.run(make_cfg("trainer.log_every=1", "trainer.checkpoint_every=1")) == value  # same results
    with pytest.raises(RunFolderError, match=r"holds a finished run with other settings \(adapter.dropout: 0.05 -> "
                                             r"0.3, trainer.lr: 0.0003 -> 0.01\); overwrite=true replaces it"):
        pipeline.run(make_cfg("trainer.lr=1e-2", "adapter.dropout=0.3"))
    assert snapshot(out) == before
    with pytest.raises(Built):
        pipeline.run(make_cfg("trainer.lr=1e-2", "overwrite=true"))


def test_a_folder_fingerprinted_before_val_set_size_moved_is_still_its_configs(make_cfg, tmp_path, monkeypatch):
    """A metrics.json whose fingerprint names trainer.val_set_size (before it moved to the dataset group)."""
    out = tmp_path / "run"
    old = {("trainer.val_set_size" if k == "dataset.val_set_size" else k): v for k, v in fingerprint(make_cfg()).items()}
    assert old["trainer.val_set_size"] == 4 and "dataset.val_set_size" not in old
    write_json_atomic(out / "metrics.json", {"eval": {"average": 0.25}, "fingerprint": old})
    monkeypatch.setattr(pipeline, "build_model", no_build)
    assert pipeline.run(make_cfg()) == 0.25  # reused: the same config
    with pytest.raises(RunFolderError, match=r"other settings \(dataset.val_set_size: 4 -> 2\)"):
        pipeline.run(make_cfg("dataset.val_set_size=2"))


def test_resume_with_changed_settings_is_refused(make_cfg, tmp_path, monkeypatch, caplog):
    """A run killed after its checkpoint, started again with another lr and dropout: refused, naming both."""
    def killed(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_results", killed)  # killed after training, before metrics.json
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(make_cfg())
    assert (tmp_path / "run" / "checkpoints" / "latest.json").is_file()
    monkeypatch.undo()
    with pytest.raises(RunFolderError, match=r"holds an unfinished run \(checkpoints, partial results\) with other "
                                             r"settings \(adapter.dropout: 0.05 -> 0.3, trainer.lr: 0.0003 -> 0.05\)"):
        pipeline.run(make_cfg("trainer.lr=5e-2", "adapter.dropout=0.3"))
    with caplog.at_level("INFO"):
        pipeline.run(make_cfg())  # the same settings resume
    assert "resumed from" in caplog.text
    with pytest.raises(RunFolderError, match=r"trainer.resume=.*step-0000003: made with other settings \(trainer.lr"):
        pipeline.run(compose_config(["trainer.lr=5e-2", f"trainer.resume={tmp_path / 'run/checkpoints/step-0000003'}"],
                                    tmp_path / "elsewhere"))


def test_failed_overwrite_keeps_the_old_results_whole(make_cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    value = pipeline.run(make_cfg())
    before = snapshot(out)

    def disk_full(*_, **__):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pipeline, "save_adapter", disk_full)  # fails after training, predictions, config.yaml
    with pytest.raises(OSError, match="No space left"):
        pipeline.run(make_cfg("trainer.lr=1e-2", "overwrite=true"))
    monkeypatch.undo()
    assert snapshot(out) == before  # nothing of the new run outside its staging area
    with pytest.raises(RunFolderError, match="trainer.lr: 0.0003 -> 0.01"):  # not finished with the new config
        pipeline.run(make_cfg("trainer.lr=1e-2"))
    monkeypatch.setattr(pipeline, "build_model", no_build)
    assert pipeline.run(make_cfg()) == value  # still finished with the old one
    monkeypatch.undo()

    pipeline.run(make_cfg("adapter=none", "overwrite=true"))  # a finished overwrite replaces everything
    assert json.loads((out / "metrics.json").read_text())["fingerprint"] == fingerprint(make_cfg("adapter=none"))
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists() and not (out / ".staging").exists()
    assert "name: none" in (out / "config.yaml").read_text()


HOLD = "import sys, time; from adapters_lab.runs import FolderLock; FolderLock(sys.argv[1]).acquire(); " \
       "print('locked', flush=True); time.sleep(120)"


def test_a_held_folder_is_refused_at_once_naming_the_holder(make_cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(pipeline, "build_model", no_build)
        with pytest.raises(RunFolderError, match=rf"run: in use by process {holder.pid} on "):
            pipeline.run(make_cfg())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid  # a dead process's lock file is left
    with pytest.raises(Built):
        pipeline.run(make_cfg())  # and taken over
    lock = FolderLock(out)
    lock.acquire()  # released when the run raised
    lock.release()


def test_two_runs_racing_for_one_folder(tmp_path):
    out = tmp_path / "race"
    cmd = [sys.executable, "run.py", *FAST, f"hydra.run.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    results = [(run.pid, *run.communicate(timeout=300), run.returncode) for run in runs]
    codes = sorted(code for *_, code in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err, _ in results]
    (winner, *_), (_, _, loser_err, _) = sorted(results, key=lambda r: r[3])
    assert loser_err.strip().splitlines()[-1] == (
        f"error: paths.output_dir={out}: in use by process {winner} on {os.uname().nodename}; "
        "wait for it to end or choose another folder")
    assert "Traceback" not in loser_err
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 3


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_result_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == mode
