"""Cluster mode as an operator runs it: a real 3-node Ray cluster on 127.0.0.1 (a head with no CPUs, two worker
nodes), Ray's token authentication on, a moto S3 server as the only storage, a real Prefect server and a process
worker whose RAY_ADDRESS names the cluster's Jobs API. Every stage runs as a Ray Job of the same `dcgan` command
line; nothing is written to local disk; a lost node costs at most one checkpoint interval of training, and a build
that loses a node gives the same dataset. A lost head is one line (CLI) or a Failed run (Prefect) within the
configured wait, and the same command on the restarted cluster resumes training or finishes the build byte for byte.

The module starts with the test cluster's own facts (formerly tests/test_multinode.py: token auth is on and
enforced, a job's driver joins with the head's token and reaches S3, Ray Train spreads its workers over the worker
nodes, a killed node is reported dead within seconds). One cluster for the module (tests/multinode.py: 20-50 s to
start and stop on 2 cores, paid once here); the node-loss tests run after the others and the head-loss tests last,
since they kill nodes and replace the cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import cv2
import pytest
from multinode import multinode_cluster  # noqa: F401  (fixture)
from prefect_server import BIN, prefect, prefect_server, stop  # noqa: F401  (fixture)
from realdata import grace_hopper_path, mnist_rgb32, skimage_rgb

from dcgan import checkpoints
from dcgan.run_log import read_metrics
from preprocessing import dataset_layout, shards, storage

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
POOL = "dcgan-process"
WRITTEN = ("manifest.json", "state.pt", "report.md", "metrics.csv")  # what a stage writes: on S3, never on disk


def tiny(name: str, data: str, run: str, **cluster) -> dict:
    """A run of the paper's 64x64 architecture at toy widths, small enough for 2 CPU workers."""
    return {"name": name, "data": data, "run": run,
            "model": {"resolution": 64, "ngf": 8, "ndf": 8, "kernel_size": 4, "z_dim": 16},
            "train": {"batch_size": 4, "steps": 4, "checkpoint_every": 2, "log_every": 2, "shuffle_buffer": 0},
            "cluster": {"workers": 2, "cpus_per_worker": 1, **cluster},
            "evaluate": {"suites": ["samples"], "n_samples": 8}}


def digits_run(tmp_path: Path, name: str, data: str, run: str, rows: int, train: dict | None = None,
               **cluster) -> Path:
    """Two shards of `rows` real digits each at `data`, and a config file for a toy 32x32 run of them at `run`."""
    images = mnist_rgb32(2 * rows)
    entries = [shards.write_table(data, dataset_layout.part(i), shards.make_table(
        [f"{i}-{j:03d}" for j in range(rows)], images[rows * i:rows * (i + 1)])) for i in range(2)]
    shards.write_manifest(data, kind="lsun", resolution=32, shards=entries, inputs=2 * rows)
    config = tiny(name, data, run, **cluster)
    config["model"] = {"resolution": 32, "ngf": 8, "ndf": 8, "kernel_size": 4, "z_dim": 16}
    config["train"].update(train or {})
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


def upload_face_photos(prefix: str) -> None:
    """Package photos with one face each (grace_hopper, astronaut), mirrored and rescaled, plus a cat (no face)."""
    photos = {"grace_hopper": cv2.cvtColor(cv2.imread(str(grace_hopper_path())), cv2.COLOR_BGR2RGB),
              "astronaut": skimage_rgb("astronaut"), "chelsea": skimage_rgb("chelsea")}
    for name, rgb in photos.items():
        for variant, img in (("", rgb), ("-mirror", rgb[:, ::-1]), ("-big", cv2.resize(rgb, None, fx=1.25, fy=1.25))):
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            storage.write_bytes(f"{prefix}/{name}{variant}.jpg", jpg.tobytes())


def files_named(roots: list[Path], since: float) -> list[str]:
    found = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            found += [f"{dirpath}/{f}" for f in files if f in WRITTEN and os.path.getmtime(f"{dirpath}/{f}") >= since]
    return found


def stage_jobs(cluster) -> dict[str, list]:
    out: dict[str, list] = {}
    for job in cluster.jobs().list_jobs():
        stage = (job.metadata or {}).get("dcgan.stage")
        if stage:
            out.setdefault(stage, []).append(job)
    return out


# --- the cluster itself and the Ray 2.60 facts cluster mode relies on (token auth, a job's driver on the head
# reaching S3, Ray Train spreading its workers, a killed node seen dead); first, before any other job's Ray Train
# workers are in the cluster's actor list, and the last restores the node it kills ---------------------------

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


def test_joining_with_a_wrong_token_or_none_is_one_line_at_once(multinode_cluster, tmp_path):
    """`dcgan dedup` joining the GCS (HOST:PORT) with a wrong token, or with token auth off in the client: ray.init
    retried the refusal 20 times (~22 s, a warning line each) and then said only "Failed to connect", which reads as
    a transient fault and was retried for minutes more. It is bad input, named at once, not retried. (The source is
    a real dataset: dedup checks it before it joins Ray.)"""
    from test_faults import make_dataset

    cluster = multinode_cluster
    make_dataset(str(tmp_path / "source"))
    for auth in ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, {"RAY_AUTH_MODE": "disabled"}):
        env = {**cluster.client_env(HOME=str(tmp_path), RAY_ADDRESS=cluster.gcs_address, PYTHONPATH=str(REPO)),
               **auth}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "dcgan.cli", "dedup", str(tmp_path / "source"), "--out",
                               str(tmp_path / "out")], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.strip().splitlines()[-1] == (
            f"dcgan dedup: error: cannot join the Ray cluster at {cluster.gcs_address} (cluster.address, or "
            "RAY_ADDRESS) with this client's token (InvalidAuthToken: Authentication token is missing or incorrect): "
            "a cluster with token authentication needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"), auth
        assert took < 15, (took, auth)
        assert not (tmp_path / "out").exists()


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


def test_a_killed_node_is_reported_dead_within_seconds(multinode_cluster):
    node = multinode_cluster.nodes["node_b"]
    multinode_cluster.kill_node("node_b")
    assert node.pids() == []  # raylet, agents and workers: nothing of the node is left
    assert multinode_cluster.wait_dead("node_b", timeout=30) < 15  # measured 4-9 s with FAST_HEALTH_CHECK
    assert multinode_cluster.node_state("node_a") == "ALIVE"
    old = node.node_id
    multinode_cluster.add_node("node_b")  # later tests of the module get their two worker nodes back
    assert multinode_cluster.node_state("node_b") == "ALIVE" and multinode_cluster.nodes["node_b"].node_id != old


def test_every_stage_runs_as_a_ray_job_from_prefect_deployments(multinode_cluster, s3_bucket, prefect_server,
                                                                tmp_path):
    cluster, env = multinode_cluster, prefect_server
    started = time.time()
    upload_face_photos(f"{s3_bucket}/raw/photos")
    data, run = f"{s3_bucket}/datasets/faces/v1", f"{s3_bucket}/runs/e2e"
    config = json.dumps(tiny("e2e", data, run, placement="STRICT_SPREAD"))

    prefect(env, "work-pool", "create", POOL, "--type", "process")
    deployed = prefect(env, "--no-prompt", "deploy", "--all")
    for name in ("build-faces/faces", "build-lsun/lsun", "train-dcgan/train", "train-dcgan/nightly",
                 "evaluate-dcgan/evaluate", "dcgan-pipeline/pipeline"):
        assert name in deployed, deployed
    assert "0 2 * * *" in prefect(env, "deployment", "schedule", "ls", "train-dcgan/nightly")

    # the worker is configured as README's "Run on a cluster" says: the Jobs API address and the cluster's token
    worker_env = cluster.client_env(**{k: v for k, v in env.items() if k.startswith("PREFECT_")},
                                    RAY_ADDRESS=cluster.jobs_address, PWD=str(REPO), PREFECT_WORKER_QUERY_SECONDS="2")
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL], cwd=REPO,
                                  env=worker_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for deployment, params in (
            ("build-faces/faces", [f"out={data}", "build=" + json.dumps(
                {"input": f"{s3_bucket}/raw/photos", "resolution": 64, "min_face": 60, "shard_rows": 4}),
                "dedup=" + json.dumps({"enabled": False})]),
            ("train-dcgan/train", [f"config={config}"]),
            ("evaluate-dcgan/evaluate", [f"config={config}"]),
        ):
            try:
                ran = prefect(env, "deployment", "run", deployment, *[a for p in params for a in ("--param", p)],
                              "--watch", "--watch-timeout", "400", timeout=430)
            except AssertionError as err:
                raise AssertionError(f"{deployment} failed; the worker's log:\n{log.read_text()[-6000:]}") from err
            assert "COMPLETED" in ran.upper(), f"{deployment}: {ran[-2000:]}\n{log.read_text()[-4000:]}"
    finally:
        stop(worker)

    jobs = stage_jobs(cluster)
    assert {s: [str(j.status) for j in js] for s, js in jobs.items()} == {
        "build-faces": ["SUCCEEDED"], "train": ["SUCCEEDED"], "evaluate": ["SUCCEEDED"]}
    train_job = jobs["train"][0].job_id  # the module's earlier jobs ran Ray Train workers too
    workers = [w for w in cluster.state("actors", class_name="RayTrainWorker") if w["job_id"] == train_job]
    assert {w["node_id"] for w in workers} == {cluster.nodes["node_a"].node_id, cluster.nodes["node_b"].node_id}
    logs = log.read_text()
    assert "[ray job]" in logs and "build-faces runs on a Ray Job on the cluster" in logs

    manifest = shards.read_manifest(data)
    assert manifest["kind"] == "faces" and manifest["counts"]["rows"] >= 4  # two faces x three variants
    assert manifest["rejects"]["by_reason"].get("no_face") == 3  # the cat
    assert checkpoints.latest_step(run) == 4 and storage.exists(f"{run}/eval/step-0000004/report.md")
    assert not files_named([tmp_path, REPO, cluster.base_dir], started), "a stage wrote to local disk"


def cli(cluster, *argv: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = cluster.client_env(RAY_ADDRESS=cluster.jobs_address, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "dcgan.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_dcgan_train_as_a_ray_job_starts_on_a_cluster_set_up_as_the_readme_says(multinode_cluster, s3_bucket,
                                                                                 tmp_path):
    """The nodes that join share the head's session folder (README's `ray start --address`, no --temp-dir), so every
    node's runtime-env agent unpacks job packages into one runtime_resources folder. A job shipped with a working_dir
    died at start: when its driver's `ray.init` made a joining node's agent unpack the same package again (rmtree,
    then unzip), the driver's current directory was deleted under it, and oneMKL (linked into torch) aborts at import
    when getcwd() fails ("Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so"). A job now takes its config in
    its environment and needs no working_dir. Two shards, more than one global batch, two workers on two nodes."""
    cluster = multinode_cluster
    data, run = f"{s3_bucket}/datasets/operator", f"{s3_bucket}/runs/operator"
    path = digits_run(tmp_path, "operator", data, run, rows=48, placement="STRICT_SPREAD")

    done = cli(cluster, "train", "--config", str(path))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "oneMKL" not in done.stderr and "Traceback" not in done.stderr
    assert checkpoints.latest_step(run) == 4
    [job] = stage_jobs(cluster)["train"][-1:]
    assert str(job.status) == "SUCCEEDED" and "working_dir" not in (job.runtime_env or {}), job.runtime_env
    workers = [w for w in cluster.state("actors", class_name="RayTrainWorker") if w["job_id"] == job.job_id]
    assert {w["node_id"] for w in workers} == {cluster.nodes["node_a"].node_id, cluster.nodes["node_b"].node_id}

    # a job whose head answers but whose workers cannot all come: one line, what was asked and what the cluster has
    asked = time.monotonic()
    short = cli(cluster, "train", "--config", str(path), "--run", f"{run}-4gpu", "--workers", "4", "--gpu")
    took = time.monotonic() - asked
    assert short.returncode == 2 and "Traceback" not in short.stderr, short.stderr[-3000:]
    line = short.stderr.strip().splitlines()[-1]
    assert line.startswith("dcgan train: error: Ray job dcgan-train-operator-"), line
    assert "asks for 4.25 CPU, 4 GPU, but the cluster has 4 CPU, 0 GPU" in line and took < 120, (took, line)
    assert checkpoints.latest_step(f"{run}-4gpu") is None


def train_until(cluster, path: Path, run: str, step: int, fault, **env: str):
    """`dcgan train --config path` as a Ray Job, and `fault()` once the run has a checkpoint at `step` or later.
    Returns (the CLI process, the newest checkpoint then, what `fault` returned); the checkpoint is None if the run
    ended first."""
    env = cluster.client_env(RAY_ADDRESS=cluster.jobs_address, PYTHONPATH=str(REPO), **env)
    proc = subprocess.Popen([sys.executable, "-m", "dcgan.cli", "train", "--config", str(path)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        steps = checkpoints.complete_steps(run)
        if steps and steps[-1] >= step:
            return proc, steps[-1], fault()
        time.sleep(0.5)
    return proc, None, None


def test_training_survives_a_lost_node(multinode_cluster, s3_bucket, tmp_path):
    """SPREAD over both worker nodes; node_b dies mid-run: Ray Train restarts the group on node_a from the newest
    checkpoint, and the run ends at its last step having lost at most one checkpoint interval."""
    cluster = multinode_cluster
    data, run = f"{s3_bucket}/datasets/digits", f"{s3_bucket}/runs/node-loss"
    # half a CPU a worker: after the loss both workers share node_a's 2 CPUs
    path = digits_run(tmp_path, "node-loss", data, run, rows=32, placement="SPREAD", max_failures=2,
                      cpus_per_worker=0.5, train={"steps": 40, "checkpoint_every": 5, "log_every": 5})
    proc, killed_after, _ = train_until(cluster, path, run, 10, lambda: cluster.kill_node("node_b"))
    out, err = proc.communicate(timeout=400)
    assert killed_after is not None, err[-3000:]
    assert proc.returncode == 0, err[-4000:]
    resumed = [int(line.split("resuming at step ")[1].split("/")[0]) for line in err.splitlines()
               if "resuming at step " in line]
    assert resumed and resumed[-1] >= killed_after, (killed_after, resumed)  # at most one interval lost
    assert checkpoints.latest_step(run) == 40
    logged = [int(r["step"]) for r in read_metrics(run)]
    assert logged == sorted(set(logged)) and logged[-1] == 40  # the counter continued, never went back
    cluster.add_node("node_b")


BUILD_ARGS = ("--resolution", "32", "--shard-rows", "20", "--no-dedup")  # 480 digits -> 24 chunks, 24 shards


@pytest.fixture(scope="module")
def digits_raw(multinode_cluster, s3_server) -> tuple[str, str]:
    """480 real digits as PNGs in their own bucket, and the dataset an uninterrupted `dcgan build-lsun` job makes of
    them: the reference that a build which loses a node or the head must equal. Built once for the module."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    raw, clean = f"s3://{bucket}/raw/digits", f"s3://{bucket}/clean"
    for i, img in enumerate(mnist_rgb32(480)):
        storage.write_bytes(f"{raw}/{i:04d}.png", cv2.imencode(".png", img)[1].tobytes())
    done = cli(multinode_cluster, "build-lsun", raw, "--out", clean, *BUILD_ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return raw, clean


def build_until_chunks(cluster, raw: str, outs: list[str], fault, start=(), **env: str):
    """`dcgan build-lsun raw --out outs[0]` as a Ray Job from the CLI, and `fault()` once every one of `outs` has a
    finished chunk (`start()` has launched the builds of the others). Returns (the CLI process, what `fault`
    returned, or None if a build ended first)."""
    env = cluster.client_env(RAY_ADDRESS=cluster.jobs_address, PYTHONPATH=str(REPO), **env)
    argv = [sys.executable, "-m", "dcgan.cli", "build-lsun", raw, "--out", outs[0], *BUILD_ARGS]
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    others = [p for p in start]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and all(o.poll() is None for o in others):
        if all(storage.list_uris(f"{out}/_chunks") for out in outs):
            return proc, fault()
        time.sleep(0.2)
    return proc, None


def assert_same_dataset(uri: str, reference: str) -> None:
    """Byte-identical: the same content hash, and every shard the same bytes under the same name."""
    got, ref = shards.read_manifest(uri), shards.read_manifest(reference)
    assert got["content_hash"] == ref["content_hash"] and got["counts"] == ref["counts"]
    assert [(e["path"], e["sha256"]) for e in got["shards"]] == [(e["path"], e["sha256"]) for e in ref["shards"]]
    for entry in got["shards"]:
        assert storage.read_bytes(storage.join(uri, entry["path"])) == \
            storage.read_bytes(storage.join(reference, entry["path"])), entry["path"]


def test_a_build_that_loses_a_node_gives_the_same_dataset(multinode_cluster, digits_raw):
    cluster, (raw, clean) = multinode_cluster, digits_raw
    lossy = f"{clean.rsplit('/', 1)[0]}/lossy"
    proc, _ = build_until_chunks(cluster, raw, [lossy], lambda: cluster.kill_node("node_a"))
    proc.communicate(timeout=400)
    if proc.returncode != 0:  # the job may fail with its node; the same command finishes it
        again = cli(cluster, "build-lsun", raw, "--out", lossy, *BUILD_ARGS)
        assert again.returncode == 0, again.stderr[-3000:]
    assert_same_dataset(lossy, clean)


# A build flow run as a Prefect worker runs it (the flow in its own process, the state on the server); prints the
# flow run's and its task runs' final states as the server has them.
FLOW_RUN = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from pipelines.flows import build_lsun
from preprocessing.config import BuildConfig, DedupConfig

state = build_lsun(BuildConfig(input=sys.argv[1], resolution=32, shard_rows=int(sys.argv[3])), sys.argv[2],
                   DedupConfig(enabled=False), return_state=True)
run_id = state.state_details.flow_run_id
with get_client(sync_client=True) as client:
    run = client.read_flow_run(run_id)
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
print(json.dumps({"flow": [run.state.type.value, run.state.message],
                  "tasks": [[t.name, t.state.type.value, t.state.message] for t in tasks]}))
"""


def test_a_build_that_loses_the_head_is_one_line_and_the_rerun_gives_the_same_dataset(
        multinode_cluster, digits_raw, prefect_server):
    """The head dies while two builds run as Ray Jobs, one from the CLI and one from a Prefect flow run: neither
    hangs. Within the configured wait the CLI says in one line that the cluster was lost (exit 2) and the flow run
    ends Failed with that reason, as the Prefect server records it. On the restarted cluster the same command
    finishes the build from its finished chunks, byte-identical to an uninterrupted build. Replaces the module's
    cluster (runs after the node-loss tests)."""
    cluster, (raw, clean) = multinode_cluster, digits_raw
    base = clean.rsplit("/", 1)[0]
    out, flow_out = f"{base}/head-loss", f"{base}/head-loss-flow"
    wait_s = 10
    settings = dict(DCGAN_CLUSTER_LOST_AFTER_S=str(wait_s), DCGAN_RETRY_DELAYS_S="")  # no retry: the loss's own line
    flow_env = cluster.client_env(**{k: v for k, v in prefect_server.items() if k.startswith("PREFECT_")},
                                  RAY_ADDRESS=cluster.jobs_address, PYTHONPATH=str(REPO), **settings)
    builds = len(stage_jobs(cluster).get("build-lsun", []))
    # the flow's build has 4-row chunks (120 of them), so it is still running when the CLI's build has begun
    flow = subprocess.Popen([sys.executable, "-c", FLOW_RUN, raw, flow_out, "4"], env=flow_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180  # the flow's job first: its process starts slowly (Prefect, a flow run)
        while len(stage_jobs(cluster).get("build-lsun", [])) < builds + 1 and flow.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        proc, killed = build_until_chunks(cluster, raw, [out, flow_out], cluster.kill_head, start=[flow], **settings)
        assert killed is not None, (proc.communicate(timeout=60)[1][-3000:], flow.stderr.read()[-3000:])
        _, err = proc.communicate(timeout=wait_s + 90)
        flow_out_text, flow_err = flow.communicate(timeout=wait_s + 90)
        took = time.monotonic() - killed
    finally:
        if flow.poll() is None:
            flow.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("dcgan build-lsun: error: lost the Ray cluster at http://127.0.0.1:"), lines[-3:]
    assert f"no answer for {wait_s} s" in lines[-1] and took < wait_s + 60, (took, lines[-1])
    assert flow.returncode == 0, flow_err[-3000:]
    states = json.loads(flow_out_text.strip().splitlines()[-1])
    assert states["flow"][0] in ("FAILED", "CRASHED") and "lost the Ray cluster at" in states["flow"][1], states
    assert [t[1] for t in states["tasks"]] == ["FAILED"] and "lost the Ray cluster" in states["tasks"][0][2], states
    assert not storage.exists(f"{out}/manifest.json")

    cluster.restart()
    again = cli(cluster, "build-lsun", raw, "--out", out, *BUILD_ARGS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_dataset(out, clean)


def test_a_lost_head_is_one_line_in_bounded_time_and_the_rerun_resumes(multinode_cluster, s3_bucket, tmp_path):
    """The head dies mid-training (GCS, Jobs API and the job's driver with it): the CLI does not hang; within the
    configured wait it says in one line that the cluster was lost (exit 2). The cluster comes back (a new head, the
    same nodes) and the same command resumes from the newest checkpoint to the last step. Runs last: it replaces
    the module's cluster."""
    cluster = multinode_cluster
    data, run = f"{s3_bucket}/datasets/head-loss", f"{s3_bucket}/runs/head-loss"
    path = digits_run(tmp_path, "head-loss", data, run, rows=64, placement="SPREAD", cpus_per_worker=0.5,
                      train={"steps": 60, "checkpoint_every": 5, "log_every": 5})
    wait_s = 10
    proc, _, killed = train_until(cluster, path, run, 10, cluster.kill_head, DCGAN_CLUSTER_LOST_AFTER_S=str(wait_s),
                                  DCGAN_RETRY_DELAYS_S="")  # no stage retry: the lost cluster's own line
    assert killed is not None, proc.communicate(timeout=60)[1][-3000:]
    out, err = proc.communicate(timeout=wait_s + 90)
    took = time.monotonic() - killed
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("dcgan train: error: lost the Ray cluster at http://127.0.0.1:"), lines[-3:]
    assert f"no answer for {wait_s} s" in lines[-1] and took < wait_s + 40, (took, lines[-1])
    saved = checkpoints.latest_step(run)
    assert saved is not None and saved < 60

    cluster.restart()
    again = cli(cluster, "train", "--config", str(path))
    assert again.returncode == 0, again.stderr[-4000:]
    resumed = [int(line.split("resuming at step ")[1].split("/")[0]) for line in again.stderr.splitlines()
               if "resuming at step " in line]
    assert resumed and resumed[0] >= saved, (saved, resumed)
    assert checkpoints.latest_step(run) == 60
