"""Training workers the cluster cannot place: at once when they can never fit (tests/test_faults.py, and as a Ray Job
on the 3-node cluster in tests/test_cluster.py), and within the configured wait when they fit but never come."""

from __future__ import annotations

import time

import pytest
from test_cluster import digits_run

from dcgan import checkpoints, resources
from dcgan.config import load_config
from dcgan.train import train

pytestmark = pytest.mark.slow


def test_workers_that_fit_but_never_come_are_one_line_within_the_configured_wait(ray_cluster, tmp_path,
                                                                                monkeypatch):
    """Another job holds both CPUs of the local Ray: the worker fits the cluster (the check before training passes)
    but is never placed. Ray Train would retry the placement for ever; the run stops after DCGAN_WORKERS_WAIT_S with
    one line naming what was asked, what the cluster has and what is free."""
    from ray.util.placement_group import placement_group, remove_placement_group

    path = digits_run(tmp_path, "unplaced", str(tmp_path / "data"), str(tmp_path / "run"), rows=8,
                      workers=1, cpus_per_worker=1)
    cfg = load_config(path)
    monkeypatch.setenv(resources.WAIT_ENV, "4")
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    held = placement_group([{"CPU": 2}])  # the other job
    ray_cluster.get(held.ready(), timeout=60)
    try:
        started = time.monotonic()
        with pytest.raises(resources.WorkersNeverCame) as caught:
            train(cfg)
        took = time.monotonic() - started
    finally:
        remove_placement_group(held)
    message = str(caught.value)
    assert "\n" not in message and "asks for 1.25 CPU; the cluster has 2 CPU (0 CPU free now)" in message, message
    assert "within 4 s (DCGAN_WORKERS_WAIT_S)" in message and took < 60, (took, message)
    assert checkpoints.latest_step(cfg.run_uri) is None
