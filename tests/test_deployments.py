"""The deployments as an operator uses them: a real Prefect server (SQLite) on 127.0.0.1, a process work pool,
`prefect --no-prompt deploy --all` from the repository, a process worker, and a build-faces run started with
`prefect deployment run` that writes a dataset of real face photos into an S3 bucket (a moto server on 127.0.0.1).
These are the commands of infra/README.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from realdata import grace_hopper_path, skimage_path

from preprocessing import storage

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "dcgan-process"


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGINT (a Prefect worker ignores SIGTERM for a long while), then SIGKILL to its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout}s: {log.read_text()[-3000:]}")


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; yields the CLI's environment."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
               PREFECT_CLI_PROMPT="false", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_healthy(api, server, log)
        yield {**env, "PREFECT_API_URL": api}
    finally:
        stop(server)


def prefect(env: dict, *args: str, timeout: float = 180) -> str:
    """Run a prefect CLI command in the repository, as an operator would; fails the test with its output."""
    done = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env={**env, "PWD": str(REPO)},
                          capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{output[-4000:]}"
    return output


@pytest.mark.slow
def test_build_faces_deployment_runs_on_a_process_worker_into_s3(prefect_server, s3_bucket, tmp_path):
    env = prefect_server
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(grace_hopper_path(), photos / "grace_hopper.jpg")
    shutil.copy(skimage_path("astronaut.png"), photos / "astronaut.png")
    out = f"{s3_bucket}/datasets/faces/v1"

    prefect(env, "work-pool", "create", POOL, "--type", "process")
    deployed = prefect(env, "--no-prompt", "deploy", "--all")
    for name in ("build-faces/faces", "build-lsun/lsun", "train-dcgan/train", "train-dcgan/nightly",
                 "evaluate-dcgan/evaluate", "dcgan-pipeline/pipeline"):
        assert name in deployed, deployed
    schedules = prefect(env, "deployment", "schedule", "ls", "train-dcgan/nightly")
    assert "0 2 * * *" in schedules

    worker_env = {**env, "PWD": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "2", "RAY_AUTH_MODE": "disabled",
                  **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}  # the S3 settings (s3_server)
    log = tmp_path / "worker.log"
    with open(log, "wb") as wout:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL], cwd=REPO,
                                  env=worker_env, stdout=wout, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ran = prefect(env, "deployment", "run", "build-faces/faces",
                      "--param", f"out={out}",
                      "--param", "build=" + json.dumps({"input": str(photos), "resolution": 64, "min_face": 60}),
                      "--param", "dedup=" + json.dumps({"enabled": False}),
                      "--watch", "--watch-timeout", "300", timeout=330)
    finally:
        stop(worker)
    assert "COMPLETED" in ran.upper(), ran[-3000:] + log.read_text()[-3000:]
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    assert manifest["kind"] == "faces" and manifest["counts"]["rows"] == 2
    assert {Path(s).name for s in _sources(out, manifest)} == {"grace_hopper.jpg", "astronaut.png"}


def _sources(out: str, manifest: dict) -> list[str]:
    from preprocessing.shards import ShardDataset

    return [row["source"] for row in ShardDataset(out)]
