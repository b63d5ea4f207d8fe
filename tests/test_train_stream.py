"""Ray Train end to end on the training stream: 9 shards of unequal size, 24 steps of batch 32 (2.7 epochs), shuffle
on. One worker, two workers killed at a step between checkpoints, a run resized from 2 workers to 1 mid-way, and a
run whose final checkpoint has a same-size bit flip all end with the same weights (within 1e-9, in float64): the same
global batches in the same order, whatever the worker count, the restarts or the resize.

In float64 (train.precision fp64): in float32 the same runs differ by ~1e-3 after 24 steps, and so does a float32 run
of 2 gloo processes against 1 on the very same batches, while in float64 those agree to 6e-16: 2 workers sum the same
numbers in another order, and Adam's lr / (sqrt(v) + eps) turns that rounding into weight differences wherever a
gradient is near zero (see tests/test_batchnorm.py). float64 leaves only a real difference visible."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dcgan import checkpoints
from dcgan.config import load_config
from dcgan.run_state import finished_step
from dcgan.train import FAIL_AT_STEP_ENV, train
from tests.test_stream import SIZES, make_dataset
from dcgan import run_layout

pytestmark = pytest.mark.slow
STEPS = 24


def config(data, run, workers, steps=STEPS):
    return load_config("configs/tiny-test.yaml", {
        "data": data, "run": run, "train.steps": steps, "train.batch_size": 32, "train.shuffle_buffer": 64,
        "train.checkpoint_every": 8, "train.log_every": 4, "train.precision": "fp64",
        "cluster.workers": workers, "cluster.cpus_per_worker": 0.5,
    })


def weights(run, step):
    state = checkpoints.load_state(run, step)
    return {f"{net}.{k}": v.double() for net in ("generator", "discriminator") for k, v in state[net].items()}


def worst(a, b):
    out = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"worst weight difference to the 1-worker run: {out:.2e}")
    return out


def flip_a_bit(run, step):
    """Same size, one bit different: only the sha256 can tell."""
    path = Path(run_layout.checkpoint(run, step)) / "state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_one_worker_two_workers_a_kill_a_resize_and_a_corrupt_final_checkpoint_train_alike(
        ray_cluster, tmp_path, monkeypatch, caplog):
    data = str(tmp_path / "data")
    make_dataset(data)
    assert sum(SIZES) // 32 < STEPS // 2  # more than two epochs
    caplog.set_level(logging.INFO, logger="dcgan.train")

    one = str(tmp_path / "one")
    assert train(config(data, one, 1))["step"] == STEPS
    reference = weights(one, STEPS)

    # 2 workers; the last one exits at step 19 (between the checkpoints at 16 and 24): Ray Train restarts the group,
    # which resumes at 16 and reads the stream from step 16's rows.
    killed = str(tmp_path / "killed")
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "19")
    assert train(config(data, killed, 2))["step"] == STEPS
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    assert (Path(killed) / "ray" / "fault-injected").exists()
    assert worst(weights(killed, STEPS), reference) < 1e-9

    # 2 workers to step 12 (mid-epoch, mid-window), then resumed on 1 worker: the same stream continues, said first.
    resized = str(tmp_path / "resized")
    assert train(config(data, resized, 2, steps=12))["step"] == 12
    caplog.clear()
    assert train(config(data, resized, 1))["step"] == STEPS
    first = [r.getMessage() for r in caplog.records if r.name == "dcgan.train"][0]
    assert "from step 12" in first and "trained on 2 worker(s), now 1: the same stream continues" in first, first
    assert worst(weights(resized, STEPS), reference) < 1e-9

    # A same-size bit flip in the final checkpoint: the run is not complete; training resumes from step 16 (its
    # stream from step 16's rows, not 24's) and ends where the others did.
    flip_a_bit(resized, STEPS)
    assert checkpoints.latest_step(resized) == 16 and finished_step(config(data, resized, 1)) is None
    assert train(config(data, resized, 1))["step"] == STEPS
    assert worst(weights(resized, STEPS), reference) < 1e-9
