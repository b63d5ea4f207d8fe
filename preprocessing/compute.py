"""Where work runs (layer: preprocessing, the bottom, so that every stage and front end follows one rule).

The address comes from the configuration (`cluster.address`), else from Ray's standard RAY_ADDRESS:
- none                                  -> `local`: a Ray started inside this process (the laptop default);
- `http(s)://HEAD:8265`, a Jobs API     -> `jobs`: the stage is submitted to that cluster as a Ray Job
                                           (`dcgan.stages` does it; library code never submits itself);
- `auto`, `HOST:PORT`                   -> `join`: this process joins the cluster it runs on (the driver of a Ray
                                           Job, where Ray sets RAY_ADDRESS, or a shell on a node);
- `ray://HOST:PORT`, Ray Client         -> refused in one line: Ray advises against it for Ray Train, and Ray Data's
                                           steps (dedup's) fail under it.
Ray's token authentication (on by default for `ray start` since Ray 2.52) needs nothing from the project: Ray's client
finds the token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.

The console gets the project's lines (stage lines, `[progress]`, errors); Ray's own logs (execution plans, worker
set-up, its INFO lines) stay in Ray's log files (/tmp/ray/session_latest/logs) unless DCGAN_LOG_LEVEL is INFO or
DEBUG (`dcgan --verbose`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from preprocessing import settings
from preprocessing.errors import InputError, TransientError, known_fault

JOBS_SCHEMES = ("http://", "https://")
# What a worker process prints that reaches the console when quiet: the project's lines and errors. Ray applies it
# where it forwards workers' output to a driver (this process, or a Ray Job's driver and so the job's log).
PROJECT_LINES = r"^(?!.*(\[dcgan\]|\[progress\]|Traceback|Error\b))"


# How long a Ray Train fit waits for workers that fit the cluster but are not placed: long enough for an autoscaler to
# add a GPU node (minutes on a cloud), short of a night (15 minutes; preprocessing.settings).
WAIT_ENV = "DCGAN_WORKERS_WAIT_S"


# A local Ray's session folder (logs, sockets, spilled objects) needs room: on a full disk its GCS never writes its
# port file and `ray.init` ends in a traceback after a timeout
LOCAL_RAY_MIN_FREE_MIB = 64
PROBE_TIMEOUT_S = 10.0  # a cluster's GCS port answers a TCP connect at once; a firewall that drops it, by this time
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
HTTP2_SETTINGS = 0x04  # the frame type a gRPC server's (the GCS's) connection preface starts with


class ClusterUnreachable(TransientError, ConnectionError):
    """Nothing answers at a HOST:PORT cluster address (transient: retried with backoff, then one line)."""


def workers_wait_s() -> float:
    return settings.seconds(WAIT_ENV)


def autoscaler_maximum() -> dict[str, float] | None:
    """What an autoscaling cluster may grow to, or None for a fixed cluster (Ray's own check reads the same)."""
    try:
        from ray._private import state as ray_state

        return ray_state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - another Ray: no autoscaler information, judge the cluster as it is
        return None


def verbose() -> bool:
    """Ray's own logs on the console too (DCGAN_LOG_LEVEL=INFO or DEBUG). A bad value is not verbose here: called
    before the command's error handling, it leaves that value to `settings.check`."""
    try:
        return settings.log_level() <= logging.INFO
    except InputError:
        return False


def quiet_console() -> None:
    """Unless `verbose()`, keep Ray's worker chatter off the console, and colour codes out of a console that is not
    a terminal: call before `ray` is imported (Ray reads the setting once). Entry points (the `dcgan` CLI, the demo)
    call it; a library user keeps Ray's defaults."""
    if not verbose():
        os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", PROJECT_LINES)
    if not sys.stderr.isatty():  # a log file or a pipe: Ray's worker prefixes without colour codes, and no
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # progress bars (a terminal's, redrawn with \r: a log
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # got every redraw of Train's dataset split)


class _NoKnownFaultTracebacks(logging.Filter):
    """Ray Data logs a failed task's exception with its traceback before raising it to the driver, where a known
    fault is reported in one line (and a transient one retried): its console copy is dropped; a bug's is kept. The
    advice line Ray Data logs before it is dropped either way (a bug's traceback follows it, or the caller's own)."""

    # Ray Data's advice before the exception it logs: "please open an issue" for any exception that is not its own
    # UserCodeException (a known fault raised as itself is one), or where to find the full trace.
    ADVICE = ("Exception occurred in Ray Data or Ray Core internal code", "Exception occurred in user code")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return not (record.name.startswith("ray.data") and record.getMessage().startswith(self.ADVICE))
        return known_fault(exc) is None


def no_known_fault_tracebacks(*names: str) -> None:
    """No console copy of a known fault's traceback from these loggers' handlers (Ray's own, which log an exception
    they are about to raise); a bug's is kept. Ray's session log files keep everything."""
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if type(handler).__name__ == "SessionFileHandler":
                continue
            if not any(isinstance(f, _NoKnownFaultTracebacks) for f in handler.filters):
                handler.addFilter(_NoKnownFaultTracebacks())


def quiet_ray_data() -> None:
    """Ray Data's INFO lines (execution plans, "Progress bars disabled") to its log file only, unless verbose; no
    console traceback for a known fault (its one line comes from the caller). A stage calls it before its first
    Ray Data step: importing Ray Data (and pandas with it) costs ~0.5 s, which a stage without it does not pay."""
    import ray.data  # noqa: F401 - configures Ray Data's loggers

    no_known_fault_tracebacks("ray", "ray.data")
    if not verbose():
        for handler in logging.getLogger("ray.data").handlers:
            if type(handler).__name__ != "SessionFileHandler":
                handler.setLevel(logging.ERROR)


@dataclass(frozen=True)
class Placement:
    kind: Literal["local", "join", "jobs"]
    address: str | None = None

    def __str__(self) -> str:
        return {"local": "a local Ray in this process", "join": f"the Ray cluster at {self.address}",
                "jobs": f"a Ray Job on the cluster at {self.address}"}[self.kind]


def placement(address: str | None = None) -> Placement:
    """Where a stage runs, from an explicit address (the config's) or RAY_ADDRESS."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not address or address == "local":
        return Placement("local")
    if address.startswith(JOBS_SCHEMES) and _has_host_and_port(address):
        return Placement("jobs", address.rstrip("/"))
    if address.startswith("ray://"):
        raise InputError(f"{address} (cluster.address, or RAY_ADDRESS) is a Ray Client address, which the stages do "
                         "not use (Ray advises against it for Ray Train, and Ray Data's steps fail under it): give "
                         "the cluster's Jobs API, http://HEAD:8265, and the stage runs there as a Ray Job")
    host, colon, port = address.rpartition(":")
    if address != "auto" and not (colon and host and "://" not in host and port.isdigit() and 0 < int(port) < 65536):
        raise InputError(f"{address!r} (cluster.address, or RAY_ADDRESS) is not a Ray address: local, auto, HOST:PORT "
                         "(a cluster's GCS), or http://HEAD:8265 (its Jobs API)")
    return Placement("join", address)


def _has_host_and_port(url: str) -> bool:
    """A URL with a host and, if it names a port, a valid one."""
    parts = urlsplit(url)
    try:
        return bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number or out of range
        return False


def cluster_cpus() -> int:
    """The CPUs of the Ray this process is connected to (1 when not connected): sizes the parallel steps of a stage
    to the cluster it runs on."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1


_connected: tuple[Placement, str] | None = None  # where connect() started or joined Ray here, and that Ray's GCS


def owns_ray() -> bool:
    """Whether the Ray this process works on is its own local one (`connect` started it): every worker, actor and
    placement group of it ends with this process."""
    import ray

    return bool(_connected and _connected[0].kind == "local" and ray.is_initialized()
                and _connected[1] == ray.get_runtime_context().gcs_address)


def connect(address: str | None = None, *, quiet: bool = True) -> None:
    """Start or join Ray for work in this process, once.

    A later call that names another place than the Ray this process already works on is refused (one Ray per
    process; it would otherwise run, silently, where the first caller connected); without an address it keeps the
    Ray that is there. Settings a stage's workers need (an environment variable) go with its tasks' runtime_env,
    not here, so that they hold whoever connected first. A Jobs API address is refused: a process cannot run work
    on a cluster through the Jobs API, only submit to it.
    """
    global _connected
    import ray

    where = _not_jobs(placement(address))
    if ray.is_initialized():
        first = _connected[0] if _connected and _connected[1] == ray.get_runtime_context().gcs_address else None
        if address is not None and first is not None and where != first:
            raise InputError(f"this process already works on {first}; cluster.address {address!r} asks for "
                             f"{where}: run it in its own process, or give every stage the same cluster.address")
        return
    kwargs = {}
    if quiet and not verbose():
        kwargs.update(logging_level=logging.WARNING, log_to_driver=True)
    if where.kind == "local":
        # A local Ray is this process's own: no dashboard (nothing here reads it; it cost ~3 CPU-s and ~1 s of
        # start-up a stage). Jobs and the state API need a cluster, whose head runs one. "local", not no address:
        # without one `ray.init` joins the GCS named in Ray's temp dir (ray_current_cluster), which `ray start`
        # writes and only `ray stop` removes; after a killed or crashed head it waited minutes on that dead address.
        _check_place(where)
        if quiet and not verbose():
            _no_auth_default_notice()
        ray.init(address="local", include_dashboard=False, **kwargs)
    else:
        _check_place(where)
        try:
            ray.init(address=where.address, **kwargs)
        except ConnectionError as err:  # `auto` with no Ray on this node; a GCS that stopped answering meanwhile
            if where.address == "auto":
                raise InputError("cluster.address (or RAY_ADDRESS) auto finds no Ray on this node: `ray start` it "
                                 "into the cluster first, or give the cluster's HOST:PORT") from None
            raise ClusterUnreachable(f"cannot reach the Ray cluster at {where.address} (cluster.address, or "
                                     f"RAY_ADDRESS): {str(err).split('. ')[0] or type(err).__name__}") from None
    _connected = (where, ray.get_runtime_context().gcs_address)
    if quiet and "ray.data" in sys.modules:
        quiet_ray_data()


def check_place(address: str | None = None) -> None:
    """What `connect(address)` would refuse about where it starts or joins Ray, told without starting or joining it
    (no room for a local Ray's session, nothing answering at a cluster's address, a Jobs API address): a stage asks
    before it writes anything, and connects once its other checks are done, so a Ray that cannot start leaves
    nothing behind and a bad location or missing credentials is told before a Ray's start."""
    where = _not_jobs(placement(address))
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return  # `connect` keeps the Ray this process has (or refuses another place: told there)
    _check_place(where)


def _not_jobs(where: Placement) -> Placement:
    if where.kind == "jobs":
        raise InputError(f"{where.address} is a Ray Jobs API address: a stage sent there runs as a Ray Job "
                         "(the dcgan CLI and the flows submit it); inside a job or on a node use auto or HOST:PORT")
    return where


def _check_place(where: Placement) -> None:
    if where.kind == "local":
        _room_for_local_ray()
        _home_for_local_ray_token()
    else:
        _answers(where.address)


class _AuthDefaultNotice(logging.Filter):
    """Ray's WARNING that it turned token authentication on for a new local instance (RAY_AUTH_MODE unset), with how
    to opt out: a command's own local Ray is not shared, yet the line was on every command's console, and a known
    fault's one line came second to it. Authentication stays on; only the line is dropped (`--verbose` keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _no_auth_default_notice() -> None:
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _AuthDefaultNotice) for f in logger.filters):
        logger.addFilter(_AuthDefaultNotice())


def disconnect() -> None:
    """Leave the Ray that `connect` started (it stops) or joined here. A command calls it once its work has returned
    rather than leave it to the interpreter's exit, where Ray first sleeps 0.5 s for workers' log lines still on
    their way: a command's tasks and workers have ended by then (a training's last worker lines come a second or
    more before Ray Train's teardown is done), so the sleep only added to every stage's fixed cost (issue 22)."""
    global _connected
    if _connected is None:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _connected = None


def _room_for_local_ray() -> None:
    """Refuse at once to start a local Ray on a temp disk without room for its session folder (a full /tmp on a
    shared machine): Ray's GCS cannot write its port file and `ray.init` fails after a timeout, with a traceback."""
    import shutil
    from pathlib import Path

    from ray._common.utils import get_default_system_temp_dir  # Ray's own choice: RAY_TMPDIR, TMPDIR, /tmp

    where = Path(get_default_system_temp_dir())
    existing = next((p for p in (where, *where.parents) if p.exists()), Path("/"))
    free_mib = shutil.disk_usage(existing).free / 2**20
    if free_mib < LOCAL_RAY_MIN_FREE_MIB:
        raise InputError(f"{where}: {free_mib:.0f} MiB free, where a local Ray keeps its session (logs, sockets, "
                         f"spilled objects; at least {LOCAL_RAY_MIN_FREE_MIB} MiB): free space there or set RAY_TMPDIR "
                         "to a folder with room")


def _home_for_local_ray_token() -> None:
    """Refuse at once a local Ray that could not write its token: a new local Ray has token authentication on (Ray's
    default, RAY_AUTH_MODE unset or token) and, given no token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or an existing
    ~/.ray/auth_token), writes one to ~/.ray/auth_token. A home it cannot write (HOME naming a file, a read-only or
    missing home, as a container's user may have) was Ray's traceback from inside `ray.init`."""
    from pathlib import Path

    given = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_MODE", "token").strip().lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN") \
            or (given and Path(given).expanduser().is_file()):
        return
    try:
        token = Path.home() / ".ray" / "auth_token"
    except RuntimeError:  # no HOME and no home in the user database
        raise InputError("a new local Ray writes its authentication token to ~/.ray/auth_token, and this user has no "
                         "home: set HOME to a folder you can write, or give a token in RAY_AUTH_TOKEN or "
                         "RAY_AUTH_TOKEN_PATH") from None
    if token.is_file():
        return
    existing = next((p for p in token.parents if p.exists()), Path("/"))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{token}: a new local Ray writes its authentication token there and cannot ({existing} is "
                         f"{'not a folder' if not existing.is_dir() else 'not writable'}): set HOME to a folder you "
                         "can write, or give a token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")


def _answers(address: str) -> None:
    """Refuse at once a HOST:PORT address where no Ray cluster answers: `ray.init` would retry it for many minutes
    (about 14 with Ray 2.60's defaults), saying only "Failed to connect to GCS" on the console.

    Nothing listening, or no answer: ClusterUnreachable (transient: a head restarting). Something else listening, a
    common slip being the dashboard's port without `http://`: InputError. A GCS is a gRPC server, so it answers
    HTTP/2's connection preface with its SETTINGS frame; an HTTP/1 server answers "HTTP/1.x ...". A GCS that refuses
    this client's token: InputError. With Ray's TLS (RAY_USE_TLS) the GCS speaks TLS first and only the connect is
    checked. `auto` is checked at the address Ray reads for it (`ray start`'s ray_current_cluster file), else left
    to Ray; any other address is a HOST:PORT (`placement` refused the rest)."""
    named = f"{address} (cluster.address, or RAY_ADDRESS)"
    if address == "auto":
        from ray._private.utils import read_ray_address  # what `ray.init(address="auto")` reads first

        # `ray start` writes its address there and only `ray stop` removes it: after a head that was killed or
        # crashed, `auto` named a dead GCS, and ray.init retried it for minutes. Without the file Ray looks for a
        # GCS process on this node, or says it finds none (an InputError in `connect`).
        if not (address := read_ray_address()):
            return
        named = f"{address} (what cluster.address or RAY_ADDRESS auto finds in Ray's ray_current_cluster file)"
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S) as conn:
            if os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true"):
                return
            conn.sendall(HTTP2_PREFACE)
            reply = b""
            while len(reply) < 9 and (more := conn.recv(9 - len(reply))):
                reply += more
    except OSError as err:
        raise ClusterUnreachable(f"cannot reach the Ray cluster at {named}: "
                                 f"{err.strerror or f'no answer within {PROBE_TIMEOUT_S:g} s'}") from None
    if len(reply) == 9 and reply[3] == HTTP2_SETTINGS:
        if refused := _token_refused(address):
            raise InputError(f"cannot join the Ray cluster at {named} with this client's token ({refused}): a "
                             "cluster with token authentication needs RAY_AUTH_MODE=token and its token in "
                             "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
        return
    said = (f"an HTTP/1 server answers there (a Ray dashboard? its Jobs API address is http://{host}:{port})"
            if reply.startswith(b"HTTP/") else "what answers there does not speak Ray's gRPC")
    raise InputError(f"{named} is not a Ray cluster's GCS port (the head's `ray start --port`, 6379 by default): "
                     f"{said}")


def _token_refused(address: str) -> str | None:
    """The GCS's reason where it refuses this process's token, asked as `ray.init` will ask it (one GetClusterId RPC
    with Ray's own auth metadata, which follows RAY_AUTH_MODE as ray.init does for an explicit address): `ray.init`
    would retry a refusal 20 times, ~22 s and a warning line each, then say only "Failed to connect". None where it
    answers, or where this Ray has no such interface (the check then leaves it to ray.init)."""
    try:
        import grpc
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            SyncAuthenticationMetadataClientInterceptor,
        )
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
        from ray.exceptions import AuthenticationError
    except ImportError:
        return None
    channel = grpc.intercept_channel(grpc.insecure_channel(address), SyncAuthenticationMetadataClientInterceptor())
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                                                          timeout=PROBE_TIMEOUT_S)
    except grpc.RpcError as err:
        return err.details() if err.code() == grpc.StatusCode.UNAUTHENTICATED else None
    except AuthenticationError as err:  # RAY_AUTH_MODE=token, and no token anywhere
        return str(err).split(". ")[0].rstrip(".")
    finally:
        channel.close()
    return None
