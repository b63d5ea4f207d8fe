"""The multi-node test cluster itself (tests/multinode.py), and the Ray 2.60 facts that cluster mode relies on:
token auth is on and enforced, a job's driver joins the cluster with the head's token and reaches S3, Ray Train
spreads its workers over the worker nodes, and a killed node is reported dead within seconds. One cluster for the
module (about 25 s to start); the tests run in file order and the last one restores the node it kills."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import boto3
import pytest
from multinode import multinode_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

# Runs as a Ray Job: reports what its driver sees and writes to S3 from a task pinned to node_a.
PROBE = """
import json, os, sys, boto3, ray
ray.init()

@ray.remote(num_cpus=0, resources={"node_a": 1})
def put(bucket):
    boto3.client("s3").put_object(Bucket=bucket, Key="from-node-a", Body=ray.get_runtime_context().get_node_id())
    return ray.get_runtime_context().get_node_id()

seen = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "AWS_ENDPOINT_URL")}
seen.update(token=len(os.environ.get("RAY_AUTH_TOKEN", "")), driver_node=ray.get_runtime_context().get_node_id(),
            task_node=ray.get(put.remote(sys.argv[1])))
print("PROBE " + json.dumps(seen))
"""

# Runs as a Ray Job: a two-worker DDP fit of a tiny model, checkpoints to S3, each worker reports its node.
TRAIN = """
import sys, ray.train, torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model

def loop(config):
    model = prepare_model(torch.nn.Linear(4, 1))
    model(torch.randn(8, 4)).pow(2).mean().backward()
    ray.train.report({"node": ray.get_runtime_context().get_node_id()})

scaling = ScalingConfig(num_workers=2, placement_strategy="STRICT_SPREAD", resources_per_worker={"CPU": 1})
result = TorchTrainer(loop, scaling_config=scaling, run_config=RunConfig(name="spread", storage_path=sys.argv[1])).fit()
assert result.error is None, result.error
"""


def run_job(client, tmp_path, script: str, *args: str, timeout: float = 240) -> tuple[str, str]:
    """Submit `python job.py ARGS` with the script as the job's working_dir; its final status and log."""
    (tmp_path / "job.py").write_text(script)
    job = client.submit_job(entrypoint=f"python job.py {' '.join(args)}", runtime_env={"working_dir": str(tmp_path)})
    deadline = time.monotonic() + timeout
    while (status := str(client.get_job_status(job).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(job)
            raise TimeoutError(f"job {job} still {status} after {timeout} s:\n{client.get_job_logs(job)[-3000:]}")
        time.sleep(1)
    return status, client.get_job_logs(job)


def test_the_jobs_api_refuses_a_client_without_the_token(multinode_cluster, tmp_path):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{multinode_cluster.jobs_address}/api/jobs/", timeout=10)
    assert refused.value.code == 401  # `ray start --head` turned auth on by itself: it found RAY_AUTH_TOKEN
    # The Ray client as a fresh process would run it, without the auth settings (and no token file in HOME).
    code = f"from ray.job_submission import JobSubmissionClient as C; C({multinode_cluster.jobs_address!r})"
    env = {k: v for k, v in multinode_cluster.client_env(HOME=str(tmp_path)).items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "AuthenticationError: Authentication required: Unauthorized: Missing authentication token" in proc.stderr


def test_a_job_with_the_token_joins_the_cluster_and_reaches_s3(multinode_cluster, s3_server, s3_bucket, tmp_path):
    from ray.job_submission import JobSubmissionClient

    bucket = s3_bucket.removeprefix("s3://")
    with multinode_cluster.client():  # the token from the environment, as the CLI and Prefect worker will have it
        status, logs = run_job(JobSubmissionClient(multinode_cluster.jobs_address), tmp_path, PROBE, bucket)
    assert status == "SUCCEEDED", logs[-3000:]
    seen = json.loads(next(line for line in logs.splitlines() if line.startswith("PROBE "))[len("PROBE "):])
    nodes = multinode_cluster.nodes
    assert seen["driver_node"] == nodes["head"].node_id  # entrypoints run on the head
    assert seen["task_node"] == nodes["node_a"].node_id
    assert seen["RAY_ADDRESS"].endswith(":" + multinode_cluster.gcs_address.rsplit(":", 1)[1])  # NODE_IP:GCS port
    assert seen["RAY_AUTH_MODE"] == "token" and seen["token"] == 64  # inherited from the head node
    assert seen["AWS_ENDPOINT_URL"] == s3_server
    body = boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=bucket, Key="from-node-a")["Body"].read()
    assert body.decode() == nodes["node_a"].node_id


def test_ray_train_puts_its_two_workers_on_the_two_worker_nodes(multinode_cluster, s3_bucket, tmp_path):
    status, logs = run_job(multinode_cluster.jobs(), tmp_path, TRAIN, f"{s3_bucket}/runs")
    assert status == "SUCCEEDED", logs[-3000:]
    workers = multinode_cluster.state("actors", class_name="RayTrainWorker")  # also after the job ended
    used = sorted(w["node_id"] for w in workers)
    assert used == sorted(multinode_cluster.nodes[name].node_id for name in ("node_a", "node_b"))
    keys = boto3.client("s3").list_objects_v2(Bucket=s3_bucket.removeprefix("s3://"), Prefix="runs/spread/")
    assert keys.get("KeyCount", 0) > 0  # the run's state went to S3, the only storage the nodes share


def test_a_killed_node_is_reported_dead_within_seconds(multinode_cluster):
    node = multinode_cluster.nodes["node_b"]
    multinode_cluster.kill_node("node_b")
    assert node.pids() == []  # raylet, agents and workers: nothing of the node is left
    assert multinode_cluster.wait_dead("node_b", timeout=30) < 15  # measured 4-9 s with FAST_HEALTH_CHECK
    assert multinode_cluster.node_state("node_a") == "ALIVE"
    old = node.node_id
    multinode_cluster.add_node("node_b")  # later tests of the module get their two worker nodes back
    assert multinode_cluster.node_state("node_b") == "ALIVE" and multinode_cluster.nodes["node_b"].node_id != old
