"""train-dcgan on a Ray cluster: a real Ray head with its dashboard (the Jobs API) started by the test on free
loopback ports; the flow submits `dcgan train` as a Ray Job, streams its log, and fails with the job's cause."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from prefect_fixtures import prefect_harness, run_logs  # noqa: F401  (fixture)
from realdata import mnist_rgb32

from dcgan import checkpoints
from dcgan.config import load_config
from dcgan import jobs
from pipelines import tasks
from preprocessing import compute
from preprocessing.errors import InputError
from pipelines.flows import train_dcgan
from preprocessing import shards

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_one_rule_decides_where_work_runs(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert compute.placement(None).kind == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address: this process joins the cluster
    assert compute.placement(None) == compute.Placement("join", "127.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")  # a Jobs API: the stage is submitted as a Ray Job
    assert compute.placement(None) == compute.Placement("jobs", "http://head:8265")
    assert compute.placement("auto") == compute.Placement("join", "auto")  # the config's address wins
    with pytest.raises(InputError, match="Jobs API address"):
        compute.connect("https://head:8265")


def test_job_log_is_streamed_line_by_line_once():
    lines: list[str] = []
    stream = jobs._LineStream(lines.append)
    stream.feed("step 1\nstep")
    stream.feed("step 1\nstep 2 loss 0.7\n\n")
    stream.feed("step 1\nstep 2 loss 0.7\n\nlast")
    stream.close()
    assert lines == ["step 1", "step 2 loss 0.7", "last"]


def test_unreachable_cluster_fails_the_run_with_the_address(monkeypatch, tmp_path):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(tasks.train_stage, "retries", 1)
    monkeypatch.setattr(tasks.train_stage, "retry_delay_seconds", [0])
    cfg = load_config("configs/tiny-test.yaml", {"root": str(tmp_path)})
    state = train_dcgan(cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(jobs.RayClusterUnreachable, match=f"cannot reach the Ray cluster at {address}"):
        state.result()
    assert checkpoints.latest_step(cfg.run_uri) is None


# ------------------------------------------------------------------------------------------ a real Ray head


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` with the dashboard on free ports, stopped by its PID (never `ray stop`, which would
    end every Ray on the machine)."""
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port")}
    temp_dir = tempfile.mkdtemp(prefix="rayj-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
           "RAY_TRAIN_V2_ENABLED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
           "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1",
           "--temp-dir", temp_dir, "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited: {(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            try:
                jobs.connect(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever is left of the group this test started
        except ProcessLookupError:
            pass
        log.close()


def tiny_dataset(uri: str, n: int = 64) -> None:
    """A committed 32x32 dataset of real digits, written directly in the shard format."""
    images = mnist_rgb32(n)
    entry = shards.write_table(uri, shards.shard_name(0), shards.make_table([f"{i:05d}" for i in range(n)], images))
    shards.write_manifest(uri, kind="lsun", resolution=32, shards=[entry], inputs=n)
    assert np.asarray(images).shape == (n, 32, 32, 3)


@pytest.mark.slow
def test_the_jobs_api_try_again_answer_is_retried_then_one_line(ray_head, tmp_path, monkeypatch):
    """A head that has just started (or a loaded one) answers a submission with HTTP 500 "No available agent to
    submit job, please try again later": the CLI retries it with backoff, and after the last pause says so in one
    line (exit 2) instead of a traceback. The answers come from a proxy in front of the real Jobs API."""
    from s3_faults import FaultProxy

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: busy\nroot: {tmp_path}\ndata: {tmp_path / 'no-dataset'}\n")
    busy = (500, "No available agent to submit job, please try again later.", 2)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DCGAN_JOB_SUBMIT_RETRY_S": "0.2,0.2",
           "DCGAN_RETRY_DELAYS_S": ""}  # the CLI's own retry of a transient stage off: the submission's retries alone
    for times, code in ((2, 2), (3, 2)):  # two refusals are ridden out (the job then fails on its own input), three are not
        with FaultProxy(ray_head, rate=0, canned={("POST", "/api/jobs/"): busy[:2] + (times,)}) as proxy:
            proc = subprocess.run([sys.executable, "-m", "dcgan.cli", "train", "--config", str(cfg), "--address",
                                   proxy.url], env=env, capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert sum("asked to try again later; retrying in 0.2 s" in line for line in lines) == min(times, 2)
        if times == 2:
            assert "submitted Ray job" in proc.stderr and "no manifest.json" in lines[-1], lines[-1]
        else:
            assert lines[-1] == (f"dcgan train: error: the Ray cluster at {proxy.url} did not take the job after 3 "
                                 "tries: Request failed with status code 500: No available agent to submit job, please "
                                 "try again later")


@pytest.mark.slow
def test_train_flow_runs_a_ray_job_and_streams_its_log(ray_head, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-to-be-logged-4711")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # a session S3 fixture may have set it
    cfg = load_config("configs/tiny-test.yaml", {
        "root": str(tmp_path), "name": "on-cluster", "train.steps": 2, "train.checkpoint_every": 2,
        "train.batch_size": 16, "cluster.workers": 1, "cluster.cpus_per_worker": 1, "cluster.address": ray_head,
    })
    tiny_dataset(cfg.data_uri)
    state = train_dcgan(cfg, return_state=True)
    logs = run_logs(state.state_details.flow_run_id)
    assert state.is_completed(), logs[-4000:]
    result = state.result()
    assert result["step"] == 2 and checkpoints.latest_step(cfg.run_uri) == 2
    assert Path(result["samples"]).is_file()
    assert "[ray job]" in logs and "SUCCEEDED" in logs
    # credentials stay on this machine unless cluster.pass_credentials (the nodes bring their own); none is logged
    assert "storage settings passed: AWS_REGION" in logs and "not-to-be-logged-4711" not in logs


def test_a_second_connect_to_another_ray_is_refused_not_ignored(tmp_path):
    """Whoever connects first used to win silently (the demo's Ray kept the build's pixel cap from its workers):
    the same place is kept, another one is one clear error, and a build after a plain connect still gives its
    workers OpenCV's pixel cap (its tasks carry it; the worker checks)."""
    import subprocess
    import sys

    from realdata import encode, real_photos

    src = tmp_path / "photos"
    src.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        (src / f"{name}.jpg").write_bytes(encode(real_photos()[name]))
    code = f"""
import sys
from preprocessing import compute
from preprocessing.build import build_dataset
from preprocessing.config import BuildConfig
from preprocessing.errors import InputError
compute.connect()          # as the demo does: no pixel cap
compute.connect(None)      # the same Ray: kept
compute.connect("local")   # the same place: kept
build_dataset(BuildConfig(kind="center-crop", input={str(src)!r}, max_pixels=400_000), {str(tmp_path / 'ds')!r})
try:
    compute.connect("127.0.0.1:1")
except InputError as err:
    print("REFUSED", err)
"""
    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED this process already works on a local Ray in this process; cluster.address '127.0.0.1:1'" \
        in out.stdout, out.stdout
    assert (tmp_path / "ds" / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["bad_input", "transient"])
def test_a_job_that_fails_fails_the_run_with_its_cause_classified_once(fault, ray_head, tmp_path, monkeypatch):
    """The job's command classifies its fault (`preprocessing.errors.classify`) and the follower raises the same
    class: bad input fails the run at once; a storage outage inside the job stays transient, so the Prefect task
    retries it (it was bad input before: the follower read only the CLI's error line)."""
    monkeypatch.setattr(tasks.train_stage, "retries", 1)
    monkeypatch.setattr(tasks.train_stage, "retry_delay_seconds", [0])
    where, error, match, submissions = {"data": str(tmp_path / "missing-dataset")}, jobs.RayJobInputError, \
        "no manifest.json", 1
    if fault == "transient":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens: storage is down
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("DCGAN_RETRY_DELAYS_S", "")  # the job's own retries off: the fault reaches the follower
        where, error, match, submissions = {"data": "s3://nowhere-bucket/data", "cluster.pass_credentials": True}, \
            jobs.RayJobTransientError, "cannot reach the S3 endpoint", 2
    cfg = load_config("configs/tiny-test.yaml", {"root": str(tmp_path), "name": f"fails-{fault}",
                                                  "run": str(tmp_path / "run"), "cluster.address": ray_head, **where})
    state = train_dcgan(cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(error, match=match):
        state.result()
    logs = run_logs(state.state_details.flow_run_id)
    assert "FAILED" in logs and match in logs
    assert logs.count("submitted Ray job") == submissions, logs[-3000:]
    assert checkpoints.latest_step(cfg.run_uri) is None
