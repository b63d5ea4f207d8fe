"""The deployments as an operator uses them: a real Prefect server (SQLite) on 127.0.0.1, a process work pool,
`prefect --no-prompt deploy --all` from the repository, a process worker, and a build-faces run started with
`prefect deployment run` that writes a dataset of real face photos into an S3 bucket (a moto server on 127.0.0.1).
These are the commands of infra/README.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from prefect_server import BIN, REPO, prefect, prefect_server, stop  # noqa: F401  (fixture)
from realdata import grace_hopper_path, skimage_path

from preprocessing import storage

POOL = "dcgan-process"


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
