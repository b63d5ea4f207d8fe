"""A checkpoint counts (newest step, run completion, where the stream resumes) only after its content checks pass:
a same-size bit flip, which the size check cannot see, makes `latest_step` fall back exactly as `load_state` does."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dcgan import checkpoints
from dcgan.config import load_config
from dcgan.networks import Generator
from dcgan.run_state import finished_step
from dcgan import run_layout


@pytest.fixture
def run(tmp_path):
    """A run with checkpoints at steps 5 and 10 of a tiny generator."""
    uri = str(tmp_path / "run")
    cfg = load_config("configs/tiny-test.yaml", {"data": str(tmp_path / "data"), "run": uri})
    torch.manual_seed(0)
    g = Generator(cfg.model)
    for step in (5, 10):
        checkpoints.save(uri, step, {"generator": g.state_dict(), "step": step})
    return uri, cfg


def flip_a_bit(run_uri: str, step: int) -> None:
    path = Path(run_layout.checkpoint(run_uri, step)) / "state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_bit_flip_in_the_newest_checkpoint_falls_back_to_the_one_before(run, caplog):
    uri, _ = run
    assert checkpoints.latest_step(uri) == 10
    flip_a_bit(uri, 10)
    assert checkpoints.valid_steps(uri) == [5, 10]  # the cheap checks cannot see it
    with caplog.at_level(logging.WARNING, logger="dcgan.checkpoints"):
        assert checkpoints.latest_step(uri) == 5
    assert any("corrupt" in r.getMessage() and "step-0000010" in r.getMessage() for r in caplog.records)
    assert checkpoints.load_state(uri)["step"] == 5  # the same choice
    assert (Path(run_layout.checkpoint(uri, 10)) / "state.pt").exists()  # left in place


def test_a_bit_flip_in_the_final_checkpoint_leaves_the_run_unfinished(run):
    uri, cfg = run  # train.steps = 10 in tiny-test
    assert finished_step(cfg) == 10
    flip_a_bit(uri, 10)
    assert finished_step(cfg) is None
    flip_a_bit(uri, 5)
    assert checkpoints.latest_step(uri) is None
