"""Checkpoints written on a background thread (``trainer.async_checkpoint``, the default) hold the
state of the step they name, whatever training did while they were written, and equal the ones
written in the loop; a write error still stops the run with its one-line message."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from adapters_lab.training import checkpoints
from adapters_lab.training.settings import STATE_FILE
from tests.train_helpers import run, token_examples, trainer_cfg

STEPS = 5


def saved(directory) -> dict[int, tuple[dict, dict]]:
    """Each checkpoint's adapter tensors and trainer state, by step."""
    out = {}
    for folder in sorted(directory.glob("step-*")):
        state = torch.load(folder / STATE_FILE, weights_only=False)
        out[state["loop"]["step"]] = (load_file(str(folder / checkpoints.ADAPTER_FILE)), state)
    return out


def assert_same_checkpoints(ours: dict, reference: dict) -> None:
    assert sorted(ours) == sorted(reference) == list(range(1, STEPS + 1))
    for step in reference:
        (tensors, state), (ref_tensors, ref_state) = ours[step], reference[step]
        assert tensors.keys() == ref_tensors.keys()
        assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors), f"adapter of step {step}"
        untimed = [{k: v for k, v in s["loop"].items() if k != "seconds"} for s in (state, ref_state)]
        assert untimed[0] == untimed[1]  # step, data position, counters, losses
        moments = [(s["exp_avg"], r["exp_avg"]) for s, r in zip(state["optimizer"]["state"].values(),
                                                                ref_state["optimizer"]["state"].values())]
        assert moments and all(torch.equal(a, b) for a, b in moments), f"optimiser state of step {step}"


def test_slow_background_writes_hold_the_state_of_their_own_step(tmp_path, monkeypatch):
    """Each write starts 0.3 s late, so training runs on past the step it saves while it waits: a
    checkpoint that kept references to the live weights or optimiser moments would hold a later step's."""
    examples = token_examples(24, seed=3)
    common = dict(max_steps=STEPS, checkpoint_every=1, keep_checkpoints=STEPS, log_every=1)
    run(trainer_cfg(async_checkpoint=False, **common), examples, checkpoint_dir=tmp_path / "sync")
    write = checkpoints.write_checkpoint

    def late_write(*args, **kwargs):
        time.sleep(0.3)
        return write(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "write_checkpoint", late_write)
    start = time.perf_counter()
    run(trainer_cfg(async_checkpoint=True, **common), examples, checkpoint_dir=tmp_path / "async")
    assert time.perf_counter() - start >= 0.3 * STEPS  # every write happened, one after another
    assert_same_checkpoints(saved(tmp_path / "async"), saved(tmp_path / "sync"))
    assert (tmp_path / "async" / checkpoints.LATEST).read_text() == (tmp_path / "sync" / checkpoints.LATEST).read_text()


def test_a_background_write_error_stops_the_run_at_the_next_checkpoint(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(checkpoints.CheckpointWriteError, match="could not write .*step-0000001"):
        run(trainer_cfg(max_steps=3, checkpoint_every=1, async_checkpoint=True), token_examples(8),
            checkpoint_dir=tmp_path)
    assert not (tmp_path / checkpoints.LATEST).exists()


def test_the_writer_waits_for_one_write_before_the_next():
    order, writer = [], checkpoints.CheckpointWriter()
    writer.submit(lambda: (time.sleep(0.2), order.append("first")))
    writer.submit(lambda: order.append("second"))
    writer.wait()
    assert order == ["first", "second"]


def test_snapshots_reuse_their_buffers_and_copy_what_they_are_given():
    writer = checkpoints.CheckpointWriter()
    live = {"w": torch.arange(6.0).view(2, 3), "lr": [0.1]}
    first = writer.snapshot(live)
    first_pointer = first["w"].data_ptr()
    live["w"].add_(1)  # the next step changes the live state: the snapshot must not
    assert torch.equal(first["w"], torch.arange(6.0).view(2, 3)) and first["lr"] == [0.1]
    second = writer.snapshot(live)
    assert second["w"].data_ptr() == first_pointer and torch.equal(second["w"], live["w"])
    assert writer.snapshot({"w": torch.zeros(4)})["w"].data_ptr() != first_pointer  # another shape: a new buffer
