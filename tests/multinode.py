"""A real multi-node Ray cluster on 127.0.0.1 for tests, with Ray's token authentication on.

`ray start --head --num-cpus 0` plus worker nodes `ray start --address ... --num-cpus 2 --resources '{"node_a": 1}'`,
each in its own session (start_new_session), started one at a time (two joining at once can fail); as on an operator's
machine, only the head is given a temp dir and the nodes that join share its session directory.
The cluster gets its own token through RAY_AUTH_TOKEN: nothing reads or writes ~/.ray/auth_token. Facts behind the
choices (timings, what auth needs, what Ray Train does on node loss) are in tests/MULTINODE.md.

Cost: 22-50 s to start a head and two worker nodes on the 2 shared cores, about 2.8 GB resident (head 1.8, each
worker node 0.5, idle); stopping 4-20 s. `multinode_cluster` is module-scoped: each test module that uses it pays
that once and gets a fresh cluster (tests may kill nodes). Every process of a node (its session, and every
descendant even if it left the session) is stopped by PID, never with `ray stop`; if the test process itself is
killed, each `ray start` gets SIGTERM from the kernel and stops its node. (One file, though long: the start, the
client side of token auth and the PID-exact stop of a node are one lifecycle.)
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port

BIN = Path(sys.executable).parent
# Node-death detection in a few seconds instead of ~15 (Ray's 3 s period x 5 failures): the GCS health-checks each
# raylet every period and declares it dead after `threshold` failures in a row; the generous timeout keeps a raylet
# that is merely slow on a busy machine alive. Read by the head's GCS (measured in MULTINODE.md).
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "5000",
                     "RAY_health_check_failure_threshold": "3"}
# Settings a node must not inherit from the test process: an address would redirect `ray start`, and the in-process
# `ray_cluster` fixture's RAY_AUTH_MODE=disabled would turn auth off.
CLEARED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
# Ports Ray would take at fixed defaults (6379, 8265, 10001, 52365); every other port Ray binds itself (port 0), which
# cannot race. A port picked here can still be taken by someone else before Ray binds it: a node that fails to start
# is retried once with fresh ports.
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port")
WORKER_PORTS = ("dashboard-agent-listen-port",)
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 15


@dataclass
class Node:
    """One `ray start --block` process and what it started; `resource` is the custom resource only it has."""

    name: str
    resource: str | None
    process: subprocess.Popen
    temp_dir: Path
    node_id: str = ""
    known: dict[int, int] = field(default_factory=dict)  # every pid seen in the node -> its start time

    @property
    def pgid(self) -> int:
        return self.process.pid  # start_new_session: the `ray start` process leads its own group and session

    def pids(self) -> list[int]:
        """The node's live processes (empty once it is stopped or killed)."""
        return _members(self)

    def log_tail(self, chars: int = 3000) -> str:
        text = (self.temp_dir / "ray-start.log").read_text(errors="replace")
        return text[-chars:]


class MultiNodeCluster:
    """A head (no CPUs: work must go to worker nodes) and named worker nodes, reachable with `env` / `token`."""

    def __init__(self, base_dir: Path, node_env: dict[str, str], head_env: dict[str, str]):
        self.base_dir, self.token = base_dir, secrets.token_hex(32)  # Ray's own format: 64 hex characters
        self.nodes: dict[str, Node] = {}
        self._seen: set[str] = set()
        self._node_env = {k: v for k, v in node_env.items() if k not in CLEARED}
        self._node_env.update(PATH=f"{BIN}{os.pathsep}{node_env.get('PATH', '')}", RAY_AUTH_TOKEN=self.token,
                              RAY_TRAIN_V2_ENABLED="1", RAY_DATA_DISABLE_PROGRESS_BARS="1",
                              # SIGTERM would first drain the node for up to 30 s (a Kubernetes nicety)
                              RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        self._head_env = head_env
        self._pick_head_ports()

    def _pick_head_ports(self) -> None:
        self.ports = {name: free_port() for name in HEAD_PORTS}
        self.jobs_address = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.gcs_address = f"127.0.0.1:{self.ports['port']}"
        # Ray code that finds "the" cluster by itself (Train's PlacementGroupCleaner on the head) fails on a machine
        # running several Ray clusters ("Found multiple active Ray instances") unless RAY_ADDRESS names it.
        self._node_env["RAY_ADDRESS"] = self.gcs_address

    # ---------------------------------------------------------------------------------------------- clients

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs besides the address: explicit addresses never turn token auth on by
        themselves, so RAY_AUTH_MODE=token is required next to the token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def client_env(self, **extra: str) -> dict[str, str]:
        """The full environment for a client subprocess (CLI, Prefect worker) of this cluster."""
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        return {**env, **self.env, "PATH": self._node_env["PATH"], **extra}

    @contextmanager
    def client(self) -> Iterator[None]:
        """This process as a client of the cluster, for code under test that finds the token in the environment
        (`JobSubmissionClient(address)`, `ray.init(address=...)`): RAY_AUTH_MODE/RAY_AUTH_TOKEN set, restored on exit.
        Ray reads the auth mode and token once per process, so the cache is refreshed both ways; setting the
        variables alone does nothing once Ray has been used (e.g. by the in-process `ray_cluster`, auth disabled)."""
        names = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
        saved = {name: os.environ.pop(name, None) for name in names}
        os.environ.update(self.env)
        _refresh_ray_auth()
        try:
            yield
        finally:
            for name, value in saved.items():
                os.environ.pop(name, None)
                if value is not None:
                    os.environ[name] = value
            _refresh_ray_auth()

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that authenticate to the dashboard whatever this process's own Ray auth mode is."""
        return {"Authorization": f"Bearer {self.token}"}

    def jobs(self):
        """A JobSubmissionClient for this cluster, authenticated by header (no process-wide Ray settings)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.jobs_address, headers=self.headers)

    def state(self, resource: str, **filters: str) -> list[dict]:
        """The State API (`nodes`, `actors`, ...) over HTTP with the token, e.g. state("actors",
        class_name="RayTrainWorker"); rows carry node_id, state, resources_total, ..."""
        query = [("detail", "1"), ("limit", "10000")]
        for key, value in filters.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        url = f"{self.jobs_address}/api/v0/{resource}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(urllib.request.Request(url, headers=self.headers), timeout=10) as reply:
            body = json.load(reply)
        if not body.get("result"):
            raise RuntimeError(f"State API {resource}: {body.get('msg')}")
        return body["data"]["result"]["result"]

    def node_state(self, name: str) -> str:
        """ALIVE or DEAD, as the GCS reports the named node now."""
        node_id = self.nodes[name].node_id
        return next(n["state"] for n in self.state("nodes") if n["node_id"] == node_id)

    # ---------------------------------------------------------------------------------------------- nodes

    def _launch(self, name: str, args: list[str], env: dict[str, str], resource: str | None) -> Node:
        """`ray start --block ...` in its own session; returns once the GCS lists the node ALIVE."""
        temp_dir = self.base_dir / name
        temp_dir.mkdir()
        # As an operator starts nodes: only the head names a temp dir. A node that joins takes the head's (Ray
        # shares the session directory, and with it one runtime_resources folder for every node on this machine).
        own_temp = ["--temp-dir", str(temp_dir)] if resource is None else []
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", *own_temp,
               "--disable-usage-stats", *args]
        with open(temp_dir / "ray-start.log", "wb") as log:
            process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=_term_when_parent_dies)
        node = self.nodes[name] = Node(name, resource, process, temp_dir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not node.node_id:
            _members(node)  # remember every pid of the node while `ray start` is still their parent
            if process.poll() is not None:
                raise _Exited(f"ray start for node {name} exited {process.returncode}:\n{node.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {name} not ALIVE after {START_TIMEOUT_S} s:\n{node.log_tail()}")
            time.sleep(0.5)
            try:
                alive = [n for n in self.state("nodes", state="ALIVE") if n["node_id"] not in self._seen
                         and (n["is_head_node"] if resource is None else resource in n["resources_total"])]
            except OSError:
                continue  # the head's dashboard is not up yet
            if alive:
                node.node_id = alive[0]["node_id"]
        self._seen.add(node.node_id)  # a killed node may still be listed ALIVE when its name is reused
        return node

    def _start(self, name: str, command, resource: str | None) -> Node:
        """Launch `command()` -> (args, env); once more with fresh ports if `ray start` exits: on a busy machine a
        port can be taken between picking and binding (the agent dies with EADDRINUSE and the raylet with it)."""
        try:
            return self._launch(name, *command(), resource)
        except _Exited:
            self._discard(name)
            return self._launch(name, *command(), resource)

    def _discard(self, name: str) -> None:
        node = self.nodes.pop(name)
        _kill_all(node, signal.SIGKILL)
        node.process.wait(STOP_TIMEOUT_S)
        shutil.rmtree(node.temp_dir, ignore_errors=True)

    def start_head(self) -> Node:
        def command():
            self._pick_head_ports()
            args = ["--head", "--num-cpus", "0", "--num-gpus", "0", "--include-dashboard=true",
                    "--dashboard-host", "127.0.0.1", *[f"--{k}={v}" for k, v in self.ports.items()]]
            return args, {**self._node_env, **self._head_env}

        head = self._start("head", command, None)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the Jobs API answers a little after the State API
            try:
                self.jobs().list_jobs()
                return head
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def add_node(self, name: str, cpus: float = 2, resource: str | None = None) -> Node:
        """Start one more worker node with `cpus` CPUs and the custom resource `resource` (default: its name).
        A name whose node was killed may be reused: the new node gets a new node id."""
        if name in self.nodes:
            if self.nodes[name].process.poll() is None:
                raise ValueError(f"node {name} is running")
            self._discard(name)
        resource = resource or name

        def command():
            args = ["--address", self.gcs_address, "--num-cpus", str(cpus), "--num-gpus", "0",
                    "--resources", json.dumps({resource: 1}), *[f"--{k}={free_port()}" for k in WORKER_PORTS]]
            # A joining node never turns auth on by itself: without RAY_AUTH_MODE=token the GCS refuses it.
            return args, {**self._node_env, **self.env}

        return self._start(name, command, resource)

    def kill_head(self) -> float:
        """A lost head: SIGKILL the head node's processes (GCS, dashboard and Jobs API, the jobs' drivers); the
        worker nodes are left as they are. Returns time.monotonic() of the kill."""
        head = self.nodes["head"]
        _kill_all(head, signal.SIGKILL)
        killed = time.monotonic()
        head.process.wait(STOP_TIMEOUT_S)
        return killed

    def restart(self, cpus: float = 2) -> None:
        """The cluster brought back after a lost head: every node stopped, then a new head (new ports, so a new
        `jobs_address`) and the same worker nodes."""
        workers = [name for name, node in self.nodes.items() if node.resource is not None]
        self.stop()
        for name in list(self.nodes):
            self._discard(name)
        self._seen.clear()
        self.start_head()
        for name in workers:
            self.add_node(name, cpus)

    def kill_node(self, name: str) -> float:
        """Node loss: SIGKILL the node's raylet, agents and workers at once (no draining, no goodbye to the GCS).
        Returns time.monotonic() of the kill, to measure how long the cluster takes to notice."""
        node = self.nodes[name]
        if node.resource is None:
            raise ValueError("kill_node is for worker nodes; the head is the cluster")
        _kill_all(node, signal.SIGKILL)
        killed = time.monotonic()
        # a process the node forked while the first kill went out (a raylet starting a worker, which leaves the
        # process group) is killed too: a lost node loses all of it (one survived once, at load 5)
        deadline = killed + STOP_TIMEOUT_S
        while _members(node) and time.monotonic() < deadline:
            time.sleep(0.05)
            _kill_all(node, signal.SIGKILL)
        node.process.wait(STOP_TIMEOUT_S)
        return killed

    def wait_dead(self, name: str, timeout: float = 60) -> float:
        """Seconds until the GCS reports the node DEAD (polled every 0.25 s)."""
        start = time.monotonic()
        while self.node_state(name) != "DEAD":
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"node {name} still ALIVE {timeout} s after its processes died")
            time.sleep(0.25)
        return time.monotonic() - start

    def stop(self) -> None:
        """Worker nodes, then the head (a raylet that loses its GCS first waits for it): SIGTERM to each node's
        processes (`ray start` stops what it started), SIGKILL to whatever is left after STOP_TIMEOUT_S."""
        workers = [node for node in self.nodes.values() if node.resource is not None]
        heads = [node for node in self.nodes.values() if node.resource is None]
        for group in (workers, heads):
            for node in group:
                _kill_all(node, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while any(_members(node) for node in group) and time.monotonic() < deadline:
                time.sleep(0.2)
            for node in group:
                _kill_all(node, signal.SIGKILL)
                try:
                    node.process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass


# ------------------------------------------------------------------------------------------------ processes


class _Exited(RuntimeError):
    """`ray start` ended before its node joined."""


def _term_when_parent_dies() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL (`ray start` then stops
    its node), so a killed pytest leaves no cluster behind. The kernel watches the starting *thread*: start clusters
    from the test's main thread."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _refresh_ray_auth() -> None:
    """What Ray itself does when `ray.init()` turns token auth on: re-read RAY_AUTH_MODE and the token."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _proc_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (ppid, session id, start time in clock ticks, state), read from /proc (psutil is not installed)."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
        table[int(entry)] = (int(fields[1]), int(fields[3]), int(fields[19]), fields[0])
    return table


def _members(node: Node) -> list[int]:
    """Every live process of the node: its session (Ray workers change process group, not session) and their
    descendants (a job's driver starts a session of its own). Remembered in node.known for after they are orphaned."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [pid for pid, row in table.items() if row[1] == node.pgid]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    node.known.update({pid: table[pid][2] for pid in found})
    return [pid for pid in found if table[pid][3] not in "ZX"]  # zombies are dead, only not yet reaped


def _kill_all(node: Node, sig: signal.Signals) -> None:
    """Signal the node's process group, then each process it started that is still the same process (its start
    time unchanged), including ones that left the group or were orphaned since the last look."""
    _members(node)
    try:
        os.killpg(node.pgid, sig)
    except ProcessLookupError:
        pass
    table = _proc_table()
    for pid, started in node.known.items():
        if pid in table and table[pid][2] == started:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------------------------------------ fixtures


@contextmanager
def start_cluster(workers: tuple[str, ...] = ("node_a", "node_b"), cpus: float = 2,
                  head_env: dict[str, str] | None = None) -> Iterator[MultiNodeCluster]:
    """A head and one worker node per name (custom resource = the name), stopped and removed on exit."""
    base_dir = Path(tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    cluster = MultiNodeCluster(base_dir, dict(os.environ), FAST_HEALTH_CHECK if head_env is None else head_env)
    try:
        cluster.start_head()
        for name in workers:
            cluster.add_node(name, cpus)
    except BaseException:
        cluster.stop()
        print(f"multinode: the cluster failed to start; its logs are kept under {base_dir}", file=sys.stderr)
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def multinode_cluster(s3_server):
    """A head and worker nodes `node_a`, `node_b` (2 CPUs each); the nodes see the moto S3 server through the
    standard AWS_* variables, exported by `s3_server` before they start."""
    with start_cluster() as cluster:
        yield cluster
