"""Ray Train end to end: 2 CPU workers read shards from and checkpoint to the S3 server on 127.0.0.1,
survive a killed worker, and resume from the newest checkpoint rather than from scratch."""

import subprocess
import sys

import pytest
import torch

from dcgan import checkpoints
from dcgan.config import load_config
from dcgan.networks import Generator
from dcgan.run_log import read_metrics
from dcgan import run_layout, scratch
from dcgan.train import FAIL_AT_STEP_ENV, train
from preprocessing import shards, storage
from tests.realdata import mnist_rgb32
from preprocessing import dataset_layout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mnist_on_s3(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="train-test")
    uri = "s3://train-test/datasets/mnist/v1"
    x = mnist_rgb32(512)
    entries = [
        shards.write_table(uri, dataset_layout.part(i),
                           shards.make_table([f"d{j:05d}" for j in range(i * 256, (i + 1) * 256)], x[i * 256:(i + 1) * 256]))
        for i in range(2)
    ]
    shards.write_manifest(uri, kind="test", resolution=32, shards=entries, inputs=512)
    return uri


def weights(run_uri, step):
    return torch.cat([v.flatten().float() for v in checkpoints.load_state(run_uri, step)["generator"].values()])


def test_two_workers_on_s3_survive_a_killed_worker_and_resume(ray_cluster, mnist_on_s3, monkeypatch, tmp_path):
    run = "s3://train-test/runs/tiny"
    cfg = load_config("configs/tiny-test.yaml", {"data": mnist_on_s3, "run": run, "train.steps": 10})
    first = train(cfg)
    assert first["step"] == 10 and checkpoints.complete_steps(run) == [5, 10]
    assert storage.exists(run_layout.samples(run, 10)) and storage.exists(storage.join(run, "config.yaml"))
    loaded = checkpoints.load_models(run)  # torch.load(weights_only=True) inside
    assert loaded.step == 10 and isinstance(loaded.generator, Generator)

    # Resume to step 20; worker 1 dies at step 17, Ray Train restarts the group, which resumes from step 15.
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "17")
    cfg2 = load_config("configs/tiny-test.yaml", {"data": mnist_on_s3, "run": run, "train.steps": 20})
    second = train(cfg2)
    assert second["step"] == 20
    assert storage.exists(storage.join(run, "ray", "fault-injected"))
    # The run keeps its newest keep_checkpoints = 3 (`train._keep_newest_checkpoints`); Ray Train remembers only
    # this fit's (`train._forget_rays_checkpoints`). A checkpoint uploaded just before the worker died (15) is
    # complete and valid, and the restarted workers resumed from it (the project reads checkpoints from storage).
    assert checkpoints.complete_steps(run) == [10, 15, 20]
    registered = [c["checkpoint_dir_name"] for c in storage.read_json(
        f"{run}/checkpoints/checkpoint_manager_snapshot.json")["checkpoint_results"]]
    assert registered[-1] == "step-0000020" and "step-0000010" not in registered
    logged = [int(r["step"]) for r in read_metrics(run)]
    assert logged[:2] == [5, 10] and logged[-1] == 20 and 1 not in logged[2:]  # the counter continued, not restarted

    # Weights and optimizer state continued from the checkpoint: Adam's own step counter reached 20, not 10 or 5.
    state = checkpoints.load_state(run, 20)
    assert {int(v["step"]) for v in state["opt_g"]["state"].values()} == {20}
    assert not torch.equal(weights(run, 20), weights(run, 10))

    # A finished run is not trained again.
    again = train(cfg2)
    assert again["step"] == 20

    # `dcgan sample` reads the run from S3 and writes a 4x4 grid.
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "-m", "dcgan.cli", "sample", "--run", run, "--n", "16", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import cv2

    assert cv2.imread(str(out)).shape == (4 * 34 + 2, 4 * 34 + 2, 3)


# ------------------------------------------------------------------------------- one writer per run (issue 21)


def dcgan_train(data: str, run: str, steps: int, mark: str, **env: str) -> subprocess.Popen:
    """`dcgan train` of configs/tiny-test.yaml in its own process (its own local Ray), with a short lease and an
    environment mark that its Ray processes inherit (to find them, and to stop only them)."""
    import os

    env = {**os.environ, "DCGAN_LEASE_S": "6", "DCGAN_TEST_MARK": mark, **env}
    return subprocess.Popen([sys.executable, "-m", "dcgan.cli", "train", "--config", "configs/tiny-test.yaml",
                             "--data", data, "--run", run, "--steps", str(steps)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def marked(mark: str, name: str = "") -> list[int]:
    """PIDs of live processes whose environment carries DCGAN_TEST_MARK=mark (and whose command line has `name`)."""
    from pathlib import Path

    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            zombie = (proc / "stat").read_text().split(")")[-1].split()[0] == "Z"
            if not zombie and name.encode() in (proc / "cmdline").read_bytes() \
                    and f"DCGAN_TEST_MARK={mark}".encode() in (proc / "environ").read_bytes():
                out.append(int(proc.name))
        except OSError:
            continue
    return out


@pytest.fixture
def marks():
    """Marks for the `dcgan train` processes a test starts; whatever carries one is stopped at the end, by PID."""
    import os
    import signal
    import uuid

    made: list[str] = []
    yield lambda: made.append(uuid.uuid4().hex) or made[-1]
    for mark in made:
        for pid in marked(mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for(what, timeout: float, every: float = 0.5):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_a_local_training_beside_another_ray_prints_only_its_own_lines(ray_cluster, mnist_on_s3, marks):
    """A user's machine may run another Ray (a cluster `ray start`ed there, someone else's job): here, this test
    session's own. Ray Train's placement group cleaner, an actor that asks the State API whether the controller is
    alive, could not tell which Ray was its own and printed "Found multiple active Ray instances" with a traceback on
    the console of a training that went well. A local training starts none (`ray_train.Trainer`): its Ray stops
    with it, placement groups and all."""
    import ray

    assert ray.is_initialized()  # the other Ray, in this process
    proc = dcgan_train(mnist_on_s3, "s3://train-test/runs/beside-another-ray", 4, marks())
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "run s3://train-test/runs/beside-another-ray at step 4" in out, err[-3000:]
    for noise in ("Traceback", "PlacementGroupCleaner", "multiple active Ray", "ConnectionError"):
        assert noise not in err, err[-3000:]


def test_two_concurrent_trainings_of_one_run_one_is_refused_and_the_run_stays_resumable(mnist_on_s3, marks):
    from dcgan import lease

    run = "s3://train-test/runs/two-writers"
    first = dcgan_train(mnist_on_s3, run, 10, marks())
    wait_for(lambda: storage.exists(lease.lease_uri(run)) or first.poll() is not None, 120)
    second = dcgan_train(mnist_on_s3, run, 10, marks())
    _, err2 = second.communicate(timeout=120)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2, err2
    assert "Traceback" not in err2
    lines = [ln for ln in err2.splitlines() if ln.startswith("dcgan train: error: ")]
    assert len(lines) == 1 and "being trained by another driver" in lines[0], err2
    assert f"pid {first.pid} since " in lines[0] and "host " in lines[0]

    # The run is intact: one header, each interval once, the lease gone, and it resumes.
    assert not storage.exists(lease.lease_uri(run))
    assert storage.read_text(run_layout.metrics_csv(run)).count("step,") == 1
    assert [int(r["step"]) for r in read_metrics(run)] == [5, 10]
    third = dcgan_train(mnist_on_s3, run, 15, marks())
    _, err3 = third.communicate(timeout=300)
    assert third.returncode == 0, err3
    assert checkpoints.complete_steps(run) == [5, 10, 15]
    assert [int(r["step"]) for r in read_metrics(run)] == [5, 10, 15]


def test_a_killed_driver_leaves_no_worker_writing_and_a_rerun_continues_the_run(mnist_on_s3, marks):
    """SIGKILL of the driver: its workers stop within one lease lifetime (6 s here), before the lease could pass to
    another driver, and write nothing after; the next `dcgan train` waits out the dead driver's lease, then continues:
    every interval logged once, keep_checkpoints (3) kept. Until they notice (up to two renewals) the driverless
    workers train on, and may even finish the first run's 40 steps, so the rerun asks for 60; a rerun of a finished
    run keeps the newest 3 as well (and the newest valid checkpoint where newer ones are corrupt) without joining any
    Ray, and the rerun after that, with nothing left over, is skipped."""
    import os
    import signal
    import time

    run = "s3://train-test/runs/killed"
    mark = marks()
    first = dcgan_train(mnist_on_s3, run, 40, mark)
    wait_for(lambda: 10 in checkpoints.complete_steps(run) or first.poll() is not None, 300)
    assert first.poll() is None, first.communicate()[1]
    assert marked(mark, "RayTrainWorker")
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    killed = time.monotonic()
    wait_for(lambda: not marked(mark, "RayTrainWorker"), 10, every=0.2)
    assert time.monotonic() - killed <= 6 + 2  # one lease lifetime, and a poll's slack
    logged_before = [int(r["step"]) for r in read_metrics(run)] if storage.exists(run_layout.metrics_csv(run)) else []
    time.sleep(3)  # nothing writes on after its driver died
    assert ([int(r["step"]) for r in read_metrics(run)] if logged_before else []) == logged_before

    again = dcgan_train(mnist_on_s3, run, 60, marks())
    _, err = again.communicate(timeout=400)
    assert again.returncode == 0, err
    assert [int(r["step"]) for r in read_metrics(run)] == list(range(5, 65, 5))
    assert storage.read_text(run_layout.metrics_csv(run)).count("step,") == 1
    assert checkpoints.complete_steps(run) == [50, 55, 60], err

    # Two older valid checkpoints left behind (as driverless workers leave them) and the newest three corrupt: a
    # rerun with nothing to train removes the older leftover and keeps 45, the newest valid one.
    state = checkpoints.load_state(run, 50)
    for step in (40, 45):
        checkpoints.save(run, step, {**state, "step": step})
    for step in (50, 55, 60):
        state_pt = f"{run_layout.checkpoint(run, step)}/state.pt"
        data = storage.read_bytes(state_pt)
        storage.write_bytes(state_pt, bytes(len(data)))  # same size, other bytes: only the sha256 tells
    # a Ray address where nothing listens: the tidy-up must not join one (it started a local Ray, ~10 s, before)
    finished = dcgan_train(mnist_on_s3, run, 45, marks(), RAY_ADDRESS="127.0.0.1:1")
    _, err = finished.communicate(timeout=120)
    assert finished.returncode == 0, err
    assert "nothing to train" in err
    assert checkpoints.complete_steps(run) == [45, 50, 55, 60], err
    skipped = dcgan_train(mnist_on_s3, run, 45, marks())
    _, err = skipped.communicate(timeout=120)
    assert skipped.returncode == 0 and "skipping train" in err, err  # nothing left over: no Ray


def test_bad_input_inside_a_worker_fails_once_with_one_line_not_retried(tmp_path, marks):
    """A dataset whose manifest claims more rows than its shards hold: the training stream ends early inside the
    workers. Ray Train's FailureConfig (max_failures 3) would run it four times; a known fault fails at once."""
    data = str(tmp_path / "short")
    x = mnist_rgb32(128)
    entries = [shards.write_table(data, dataset_layout.part(i), shards.make_table(
        [f"d{j:05d}" for j in range(i * 64, (i + 1) * 64)], x[i * 64:(i + 1) * 64])) for i in range(2)]
    shards.write_manifest(data, kind="test", resolution=32, shards=[{**e, "rows": 256} for e in entries], inputs=512)
    r = dcgan_train(data, str(tmp_path / "run"), 15, marks())
    _, err = r.communicate(timeout=400)
    lines = [ln for ln in err.splitlines() if ln.startswith("dcgan train: error: ")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "manifest says 256" in lines[0] or "short" in lines[0]
    assert err.count("starting step 0/15") == 1, err  # one attempt


def test_ctrl_c_stops_a_local_training_within_seconds(mnist_on_s3, marks):
    """SIGINT (Ctrl-C) in the middle of a fit: exit 130 with one line within seconds, the lease released, no Ray
    training worker left; the run resumes (its checkpoints are intact)."""
    import signal
    import time

    from dcgan import lease

    run = "s3://train-test/runs/ctrl-c"
    mark = marks()
    r = dcgan_train(mnist_on_s3, run, 400, mark)
    wait_for(lambda: storage.exists(run_layout.metrics_csv(run)) or r.poll() is not None, 300)
    assert r.poll() is None
    r.send_signal(signal.SIGINT)
    asked = time.monotonic()
    _, err = r.communicate(timeout=60)
    assert time.monotonic() - asked < 15, err
    assert r.returncode == 130, err
    assert [ln for ln in err.splitlines() if ln.startswith("dcgan train: ")] == [
        "dcgan train: interrupted; run the same command again to resume"], err
    assert not storage.exists(lease.lease_uri(run))
    wait_for(lambda: not marked(mark, "RayTrainWorker"), 10, every=0.2)
    # a worker Ray killed mid-checkpoint may have left a scratch folder after the driver cleared them: the run's next
    # start removes it (dcgan/scratch.py); this test starts none, so it removes it itself (one in a suite run, /tmp)
    scratch.clear(run)
