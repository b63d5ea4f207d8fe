"""train-dcgan on a Ray cluster: a real Ray head with its dashboard (the Jobs API) started by the test on free
loopback ports; the flow submits `dcgan train` as a Ray Job, streams its log, and fails with the job's cause."""

from __future__ import annotations

import os
import shutil
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
from preprocessing import dataset_layout, shards

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
    with pytest.raises(InputError, match="is a Ray Client address, which the stages do not use"):
        compute.placement("ray://head:10001")  # Ray Data's steps fail under it (dedup: an AttributeError traceback)
    assert compute.placement("[::1]:6379") == compute.Placement("join", "[::1]:6379")
    # ray.init: a traceback, or a hang
    for slip in ("127.0.0.1:abc", "head", "head:70000", ":6379", "http://", "http://head:abc", "ftp://head:21"):
        with pytest.raises(InputError, match=r"is not a Ray address: local, auto, HOST:PORT"):
            compute.placement(slip)
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


def test_a_short_jobs_end_is_seen_within_a_fifth_of_a_second(monkeypatch):
    """A stage's fixed cost on a warm cluster includes the follower's wait for the end it polls for: the first
    seconds are polled every FAST_POLL_S (at the old 1 s polls this job's end was seen 1.0 s after the start)."""

    class Ending:
        def __init__(self, after_s):
            self.ends = time.monotonic() + after_s
            self.calls = 0

        def get_job_info(self, job_id):
            self.calls += 1
            status = "SUCCEEDED" if time.monotonic() >= self.ends else "RUNNING"
            return type("Info", (), {"status": status})()

        def get_job_logs(self, job_id):
            return "done\n"

    started = time.monotonic()
    info, logs = jobs.follow(Ending(0.3), "raysubmit_1", lambda line: None, poll_s=1.0)
    seen_after = time.monotonic() - started
    assert str(info.status) == "SUCCEEDED" and logs == "done\n"
    assert 0.3 <= seen_after < 0.3 + jobs.FAST_POLL_S + 0.15, seen_after
    # past the fast window, one poll a poll_s (polled every FAST_POLL_S throughout, this job would take 18 polls)
    monkeypatch.setattr(jobs, "FAST_POLL_FOR_S", 1.0)
    client = Ending(3.5)
    jobs.follow(client, "raysubmit_2", lambda line: None, poll_s=1.0)
    assert client.calls <= 1.0 / jobs.FAST_POLL_S + 2.5 + 2, client.calls


def test_a_jobs_end_is_polled_for_often_once_its_command_printed_its_last_line(monkeypatch):
    """Past the first FAST_POLL_FOR_S a job is polled once a poll_s, so a long stage's end was seen up to a second
    late; once its command printed its result (or fault) line only its process's exit is left, and the end is seen
    within a fifth of a second again."""
    from dcgan import stages
    from preprocessing.errors import Fault, InputError

    monkeypatch.setattr(jobs, "FAST_POLL_FOR_S", 0.5)
    result = stages.result_line({"stage": "train"})

    class Finishing:
        def __init__(self):
            start = time.monotonic()
            self.prints, self.ends = start + 1.3, start + 1.75  # the result at 1.3 s, the process gone at 1.75 s

        def get_job_info(self, job_id):
            status = "SUCCEEDED" if time.monotonic() >= self.ends else "RUNNING"
            return type("Info", (), {"status": status})()

        def get_job_logs(self, job_id):
            return "step 1\n" + (result + "\n" if time.monotonic() >= self.prints else "")

    for last_line, (low, high) in ((stages.is_last_line, (1.75, 1.75 + jobs.FAST_POLL_S + 0.15)),
                                   (None, (2.3, 3.0))):  # polls to ~0.6 s, then every second: seen at ~2.6 s
        started = time.monotonic()
        info, logs = jobs.follow(Finishing(), "raysubmit_3", lambda line: None, poll_s=1.0, last_line=last_line)
        seen_after = time.monotonic() - started
        assert str(info.status) == "SUCCEEDED" and stages.parse_result(logs) == {"stage": "train"}
        assert low <= seen_after < high, (last_line, seen_after)
    fault = Fault("bad_input", InputError("x")).job_line()
    assert stages.is_last_line(result) and stages.is_last_line(" " + fault) and not stages.is_last_line("step 1")


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


def dcgan_train_at(address: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`dcgan train` of a 2-step tiny run with RAY_ADDRESS = `address`, transient faults not retried, on a real
    dataset in tmp_path/data (the dataset is checked before Ray is joined: a missing one would be the error)."""
    if not (tmp_path / "data").exists():
        tiny_dataset(str(tmp_path / "data"))
    env = {**os.environ, "RAY_ADDRESS": address, "DCGAN_RETRY_DELAYS_S": "", **env}
    return subprocess.run([sys.executable, "-m", "dcgan.cli", "train", "--config", "configs/tiny-test.yaml", "--data",
                           str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--steps", "2"], env=env,
                          capture_output=True, text=True, timeout=90, cwd=Path(__file__).resolve().parents[1])


def test_a_cluster_address_where_nothing_or_no_ray_listens_is_one_line_at_once(tmp_path):
    """HOST:PORT of a cluster that is not there: `ray.init` retried it for more than 5 minutes, with only Ray's
    "Failed to connect to GCS" warnings on the console; a port where another server listens, for ~14 minutes. Nothing
    listening is a transient fault: retried (off here), then one line, exit 2; another server is bad input, one line,
    exit 2. Nothing is written either way."""
    import http.server
    import threading

    address = f"127.0.0.1:{free_port()}"
    done = dcgan_train_at(address, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (f"dcgan train: error: cannot reach the Ray cluster at {address} "
                                                    "(cluster.address, or RAY_ADDRESS): Connection refused")
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # nothing but the test's dataset

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{web.server_address[1]}"
        done = dcgan_train_at(address, tmp_path)
    finally:
        web.shutdown()
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"dcgan train: error: {address} (cluster.address, or RAY_ADDRESS) is not a Ray cluster's GCS port (the head's "
        "`ray start --port`, 6379 by default): what answers there does not speak Ray's gRPC")
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # nothing but the test's dataset


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
        shutil.rmtree(temp_dir, ignore_errors=True)  # the head's session logs (2-3 MB), left behind before


def tiny_dataset(uri: str, n: int = 64) -> None:
    """A committed 32x32 dataset of real digits, written directly in the shard format."""
    images = mnist_rgb32(n)
    entry = shards.write_table(uri, dataset_layout.part(0), shards.make_table([f"{i:05d}" for i in range(n)], images))
    shards.write_manifest(uri, kind="lsun", resolution=32, shards=[entry], inputs=n)
    assert np.asarray(images).shape == (n, 32, 32, 3)


@pytest.mark.slow
def test_the_dashboards_port_as_a_join_address_is_one_line_naming_the_jobs_api(ray_head, tmp_path):
    """HEAD:8265 without `http://` (the dashboard's port where a GCS port or a Jobs API URL belongs): `ray.init` took
    it for a GCS and retried for ~14 minutes. It is bad input, told at once with the address meant; the same head's
    GCS passes the check (every Ray Job's driver joins with a HOST:PORT address and makes it)."""
    address = ray_head.removeprefix("http://")
    started = time.monotonic()
    done = dcgan_train_at(address, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"dcgan train: error: {address} (cluster.address, or RAY_ADDRESS) is not a Ray cluster's GCS port (the head's "
        f"`ray start --port`, 6379 by default): an HTTP/1 server answers there (a Ray dashboard? its Jobs API address "
        f"is http://{address})")
    assert time.monotonic() - started < 60
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # nothing but the test's dataset


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
def test_a_job_whose_log_cannot_be_read_is_followed_by_its_status_to_its_result(ray_head, tmp_path):
    """The head answers but cannot fetch the job's log from the node its driver runs on (that node's dashboard agent
    down, or on a port it could not bind: HTTP 500 with the head's traceback). The follower took that for a cluster
    that does not answer, and after a minute reported it lost, with every frame of the traceback on one line, though
    the job had SUCCEEDED; a Prefect task then submitted it again. Now one line says the log cannot be read, the job
    is followed by its status, and the stage's result is read from what it wrote."""
    import json

    from realdata import digits_folder
    from s3_faults import FaultProxy

    photos = digits_folder(tmp_path / "photos", 40)
    agent_down = (500, "Traceback (most recent call last):\n  File \"aiohttp/client.py\", line 760, in _request\n"
                  "aiohttp.client_exceptions.InvalidUrlClientError: http://192.0.2.2:-1/api/job_agent/jobs/x/logs\n",
                  10_000)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DCGAN_CLUSTER_LOST_AFTER_S": "5"}
    with FaultProxy(ray_head, rate=0, canned={("GET", "*/logs"): agent_down}) as proxy:
        proc = subprocess.run([sys.executable, "-m", "dcgan.cli", "build-lsun", str(photos), "--out",
                               str(tmp_path / "ds"), "--resolution", "32", "--no-dedup", "--json", "--address",
                               proxy.url], env=env, capture_output=True, text=True, timeout=300)
        assert proxy.injected["canned 500"] >= 1
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [ln for ln in proc.stderr.splitlines() if "cannot be read through" in ln]
    assert len(said) == 1 and said[0].endswith(
        "(Request failed with status code 500: aiohttp.client_exceptions.InvalidUrlClientError: "
        "http://192.0.2.2:-1/api/job_agent/jobs/x/logs); following its status only"), proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stderr and "does not answer" not in proc.stderr and "lost" not in proc.stderr
    assert json.loads(proc.stdout)["dcgan_result"]["counts"]["rows"] == 40

    # a job that fails on bad input is still its one line, exit 2: the fault comes from the end of the driver's
    # output that Ray keeps in the job's message
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: gone\nroot: {tmp_path}\ndata: {tmp_path / 'no-dataset'}\n")
    with FaultProxy(ray_head, rate=0, canned={("GET", "*/logs"): agent_down}) as proxy:
        proc = subprocess.run([sys.executable, "-m", "dcgan.cli", "train", "--config", str(cfg), "--address",
                               proxy.url], env={**env, "DCGAN_RETRY_DELAYS_S": ""}, capture_output=True, text=True,
                              timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("dcgan train: error: ") and "no manifest.json" in lines[-1], lines[-1]


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


@pytest.mark.slow  # fresh processes that start Rays (~13 s)
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


# ------------------------------------------------------------------------------------- cluster.submit: rayjob


class MiniKubeRay:
    """The Kubernetes API and KubeRay's part of a RayJob, on the test's Ray head. There is no Kubernetes API server
    here, so this is these tests' one stand-in: an HTTP server on 127.0.0.1 that answers the custom-object requests
    the real client (kubernetes_asyncio, from a kubeconfig) makes for RayJobs (create, get, delete), and does what
    KubeRay does with one: submits spec.entrypoint with its runtimeEnvYAML through the Jobs API, as KubeRay's
    submitter does, in the pods' environment (the template's S3 settings), and reports the status as KubeRay writes
    it: Initializing, then Running with jobId and dashboardURL (host:port, no scheme), then Complete or Failed."""

    def __init__(self, address: str, token: str = "t0ken"):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.address, self.token, self.created, self.job_ids, self.polls = address, token, {}, {}, {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Authorization)
        mini = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                mini.requests.append((method, self.path, self.headers.get("Authorization", "")))
                prefix = "/apis/ray.io/v1/namespaces/dcgan/rayjobs"
                path = self.path.split("?")[0]
                if not path.startswith(prefix):
                    return self._answer(404, {"kind": "Status", "code": 404})
                name = path[len(prefix) + 1:]
                if method == "POST":
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    mini.created[body["metadata"]["name"]] = body
                    return self._answer(201, body)
                if name not in mini.created:
                    return self._answer(404, {"kind": "Status", "code": 404})
                if method == "DELETE":
                    mini.created.pop(name)
                    return self._answer(200, {"kind": "Status", "status": "Success"})
                return self._answer(200, {**mini.created[name], "status": mini.status(name)})

            def do_POST(self):
                self._route("POST")

            def do_GET(self):
                self._route("GET")

            def do_DELETE(self):
                self._route("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: Path) -> Path:
        import yaml

        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "mini",
            "clusters": [{"name": "mini", "cluster": {"server": self.url}}],
            "users": [{"name": "flows", "user": {"token": self.token}}],
            "contexts": [{"name": "mini", "context": {"cluster": "mini", "user": "flows", "namespace": "dcgan"}}]}))
        return path

    def status(self, name: str) -> dict:
        import yaml

        self.polls[name] = self.polls.get(name, 0) + 1
        spec = self.created[name]["spec"]
        if self.polls[name] == 1:
            return {"jobDeploymentStatus": "Initializing"}
        client = jobs.connect(self.address)
        if name not in self.job_ids:
            env = {**yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"], **jobs.aws_env(pass_credentials=True)}
            self.job_ids[name] = client.submit_job(entrypoint=spec["entrypoint"], runtime_env={"env_vars": env})
        ray_status = str(client.get_job_status(self.job_ids[name]))
        state = {"SUCCEEDED": "Complete", "FAILED": "Failed", "STOPPED": "Failed"}.get(ray_status, "Running")
        return {"jobDeploymentStatus": state, "jobStatus": ray_status, "jobId": self.job_ids[name],
                "dashboardURL": self.address.split("://", 1)[1]}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_train_flow_as_a_rayjob_streams_the_same_log_and_returns_the_result(s3_bucket, ray_head, tmp_path,
                                                                          monkeypatch):
    """`cluster.submit: rayjob`: the train task renders the RayJob, writes the run's config beside the run in object
    storage, and follows the RayJob; the Ray job KubeRay starts from it trains from that config, and the flow run
    logs its lines and returns its result as for a Jobs API submission."""
    import yaml

    from dcgan import rayjob

    template = rayjob.load_template()  # the shipped template, its worker pods without GPUs (a CPU test)
    for group in template["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for amounts in group["template"]["spec"]["containers"][0]["resources"].values():
            amounts.pop("nvidia.com/gpu", None)
    (tmp_path / "rayjob-cpu.yaml").write_text(yaml.safe_dump(template))
    monkeypatch.setenv(rayjob.TEMPLATE_ENV, str(tmp_path / "rayjob-cpu.yaml"))
    kuberay = MiniKubeRay(ray_head)
    monkeypatch.setenv("KUBECONFIG", str(kuberay.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: the kubeconfig it is
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config("configs/tiny-test.yaml", {
        "root": s3_bucket, "name": "as-rayjob", "train.steps": 2, "train.checkpoint_every": 2, "train.batch_size": 16,
        "cluster.workers": 1, "cluster.cpus_per_worker": 1, "cluster.submit": "rayjob"})
    tiny_dataset(cfg.data_uri)
    try:
        state = train_dcgan(cfg, return_state=True)
    finally:
        kuberay.close()
    logs = run_logs(state.state_details.flow_run_id)
    assert state.is_completed(), logs[-4000:]
    assert state.result()["step"] == 2 and checkpoints.latest_step(cfg.run_uri) == 2
    [name] = kuberay.created
    # what the real client sent: the RayJob created once in the namespace, then polled, with the kubeconfig's token
    assert kuberay.requests[0][:2] == ("POST", "/apis/ray.io/v1/namespaces/dcgan/rayjobs")
    assert {r[:2] for r in kuberay.requests[1:]} == {("GET", f"/apis/ray.io/v1/namespaces/dcgan/rayjobs/{name}")}
    assert {r[2] for r in kuberay.requests} == {"Bearer t0ken"}
    for line in ("train runs on a KubeRay RayJob", f"created RayJob {name}", f"RayJob {name}: Initializing",
                 f"RayJob {name}: Running", "[ray job]", f"RayJob {name}: Complete"):
        assert line in logs, (line, logs[-3000:])
    ran = load_config(rayjob.config_uri(cfg.run_uri, name))
    assert ran.cluster.submit == "jobs-api" and ran.cluster.address is None and ran.train.steps == 2


def test_a_rayjob_still_running_on_a_lost_cluster_is_deleted_in_one_line(monkeypatch):
    """KubeRay #3860/#4217: the head is gone and the RayJob keeps saying Running (its cluster leaked). The follower
    does not wait for ever: after the configured wait it deletes the RayJob and raises a lost cluster in one line."""
    from dcgan import rayjob

    monkeypatch.setenv("DCGAN_CLUSTER_LOST_AFTER_S", "2")
    dead = f"127.0.0.1:{free_port()}"  # the head's dashboard: nothing answers there

    class Stuck:
        deleted: list[str] = []

        def get(self, name):
            return {"status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": "raysubmit_1",
                               "dashboardURL": dead}}

        def delete(self, name):
            self.deleted.append(name)

    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(jobs.RayClusterLost) as caught:
        rayjob.follow(Stuck(), "dcgan-train-x", lines.append, poll_s=0.2)
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert message.startswith(f"RayJob dcgan-train-x still says Running but its cluster at {dead} is gone") \
        and "\n" not in message, message
    assert Stuck.deleted == ["dcgan-train-x"] and "deleted RayJob dcgan-train-x" in lines
