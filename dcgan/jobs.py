"""A stage sent to a Ray cluster as a Ray Job, followed from the caller to its end (layer: dcgan).

A Prefect worker or a laptop needs no GPU and should not hold a Ray driver for hours: the stage's `dcgan` command line
is submitted through the Jobs API of the cluster's dashboard (http://head:8265), its log is streamed to the caller
line by line (the CLI's stderr, the Prefect run's log), and a job that ends FAILED or STOPPED raises with its cause.
Ctrl-C, SIGTERM or a cancelled Prefect run stops the job. The job carries its resolved config in its environment and
a working_dir only for a user's local box file or cascade; the code comes from the cluster's image (infra/Dockerfile),
so what runs is what was deployed. The job's environment carries the storage endpoint and region, never a credential
unless `cluster.pass_credentials` (anyone who can read the Jobs API can read a job's environment); nothing is logged
but the names of what was passed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Iterator

from preprocessing import settings
from preprocessing.compute import ClusterUnreachable
from preprocessing.errors import TransientError, UserError, fault_in_job_log, one_line
from preprocessing.settings import RETRY_DELAYS_ENV

# The standard storage settings a job needs to reach the same object store (passed only when set). Credentials are
# not among them: the nodes bring their own (environment, profile, instance or pod role) unless the caller opts in.
AWS_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Settings of the job's processes: no progress bars (they are a terminal's, not a log's); Ray Train V2.
JOB_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_V2_ENABLED": "1"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# The Jobs API's own "try again" (HTTP 500 "No available agent to submit job, please try again later"): a head that
# has just started, or a loaded one, has no job agent registered yet. Retried after these pauses, then one line.
TRY_AGAIN = re.compile(r"try again later|No available agent", re.IGNORECASE)
# DCGAN_JOB_SUBMIT_RETRY_S ("2,5,10") sets other pauses (default 2,5,10,20,30: preprocessing.settings).
POLL_TIMEOUT_S = 30  # one Jobs API request while following a job
FAST_POLL_S, FAST_POLL_FOR_S = 0.2, 10.0  # a followed job is polled every 0.2 s for its first 10 s, then every poll_s
# no answer for DCGAN_CLUSTER_LOST_AFTER_S (60 s) while a job runs: the cluster is lost
# Terminal colours and cursor moves (Ray's prefixes, progress bars) mean nothing in a run log.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LOG_TAIL_LINES = 30


class RayClusterUnreachable(ClusterUnreachable):
    """The Jobs API did not answer (a transient fault: a Prefect task retries it with backoff); the Jobs API's case
    of `compute.ClusterUnreachable` (a joined address where nothing listens)."""


class RayClusterLost(RayClusterUnreachable):
    """The Jobs API stopped answering while a job ran (a lost head): transient, so a re-run once it is back resumes."""


class RayJobError(RuntimeError):
    """A job that ended FAILED or STOPPED; the message carries Ray's reason and the end of its log."""


class RayJobInputError(RayJobError, UserError, ValueError):
    """A job that failed on bad input (a damaged dataset, a bad config): retrying cannot help."""


class RayJobTransientError(RayJobError, TransientError):
    """A job that failed on a transient fault past its own retries (storage down): a later attempt may pass."""


@contextlib.contextmanager
def _address_wins(address: str) -> Iterator[None]:
    """Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address given; the configured one must win."""
    names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
    with _env_lock:
        saved = {n: os.environ.pop(n) for n in names if n in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


_env_lock = threading.Lock()


def connect(address: str):
    """A JobSubmissionClient for `address`, or RayClusterUnreachable naming the address and the cause. With Ray's
    token authentication on, the client needs RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
    or ~/.ray/auth_token) in its environment."""
    from ray.job_submission import JobSubmissionClient

    try:
        with _address_wins(address):
            return JobSubmissionClient(address)
    except (ConnectionError, OSError, RuntimeError) as err:
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "401" in cause or "auth" in cause.lower():
            raise UserError(f"the Ray cluster at {address} refused this client ({cause}); set RAY_AUTH_MODE=token "
                            "and the cluster's token (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)") from None
        raise RayClusterUnreachable(f"cannot reach the Ray cluster at {address}: {cause}") from None


def retry_env() -> dict[str, str]:
    """The caller's retry backoff (DCGAN_RETRY_DELAYS_S, also when empty: retries off), kept by the job's command."""
    return {RETRY_DELAYS_ENV: os.environ[RETRY_DELAYS_ENV]} if RETRY_DELAYS_ENV in os.environ else {}


def aws_env(pass_credentials: bool = False) -> dict[str, str]:
    """The AWS_* settings that are set here, for the job's runtime env; credentials only when `pass_credentials`."""
    names = AWS_SETTINGS + (AWS_CREDENTIALS if pass_credentials else ())
    return {name: os.environ[name] for name in names if os.environ.get(name)}


class _LineStream:
    """Turns the growing text of a job's log into complete lines, each emitted once."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit, self.seen, self.partial = emit, 0, ""

    def feed(self, logs: str) -> None:
        new, self.seen = logs[self.seen:], len(logs)
        *lines, self.partial = (self.partial + new).split("\n")
        for line in lines:
            line = ANSI.sub("", line).rstrip()
            if line.strip():
                self.emit(line)

    def close(self) -> None:
        line = ANSI.sub("", self.partial).rstrip()
        if line.strip():
            self.emit(line)
        self.partial = ""


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM (a cancelled Prefect run, a stopped pod) ends the wait like Ctrl-C, so the job is stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def lost_after_s() -> float:
    """How long a job's follower waits for a Jobs API that stopped answering before it reports the cluster lost."""
    return settings.seconds("DCGAN_CLUSTER_LOST_AFTER_S")


def _within(seconds: float, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, or TimeoutError after `seconds`: Ray's Jobs client sets no timeout, and a head that vanished
    without closing its connections (a lost machine) would hold a request forever."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            box["error"] = err

    thread = threading.Thread(target=call, daemon=True, name="jobs-api-request")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _no_answer(err: BaseException) -> bool:
    """The Jobs API is down or restarting (refused, reset, timed out, 5xx), not a refusal of the request."""
    if isinstance(err, (OSError, TimeoutError)):  # requests' errors are OSErrors
        return True
    return _server_error(err)


def _server_error(err: BaseException) -> bool:
    """The Jobs API answered with a 5xx (Ray's client raises it as a RuntimeError naming the status code)."""
    return isinstance(err, RuntimeError) and bool(re.search(r"status code 5\d\d", str(err)))


def _gist(err: BaseException) -> str:
    """An error on one line; a Jobs API answer that carries a server's traceback gives its last line (the exception
    itself), not every frame joined."""
    text = str(err)
    if "Traceback (most recent call last)" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip() != "."]
        head = text.split("Traceback (most recent call last)")[0].strip().rstrip(":")
        return f"{head}: {lines[-1]}" if head else lines[-1]
    return one_line(err)


def follow(client, job_id: str, emit: Callable[[str], None], poll_s: float = 1.0,
           address: str = "", last_line: Callable[[str], bool] | None = None) -> tuple[Any, str]:
    """Stream a job's log through `emit` until it ends; returns (JobDetails, full log).

    Polls the Jobs API rather than holding a websocket, so a dropped connection costs one poll, not the run. The
    first `FAST_POLL_FOR_S` are polled every `FAST_POLL_S`, and so are the `FAST_POLL_FOR_S` after a line for which
    `last_line` is true (the command's last line: what is left is its process's exit): a stage's end is seen within
    a fifth of a second, not up to a second later, and a long one still costs one poll a `poll_s` while it works.
    A head that stops answering for `lost_after_s()` is a lost cluster: RayClusterLost, in one line, never a hang.
    A head that answers but cannot give the job's log is said once, and the job is followed by its status. If the
    follower is interrupted (Ctrl-C, SIGTERM, a cancelled Prefect run), the job is stopped.
    """
    fast_until = time.monotonic() + FAST_POLL_FOR_S

    def line_seen(line: str) -> None:
        nonlocal fast_until
        if last_line is not None and last_line(line):
            fast_until = time.monotonic() + FAST_POLL_FOR_S
        emit(line)

    stream = _LineStream(line_seen)
    logs, silent_since, wait, unreadable = "", None, lost_after_s(), False
    try:
        with _sigterm_stops():
            while True:
                try:
                    info = _within(POLL_TIMEOUT_S, client.get_job_info, job_id)
                except Exception as err:  # noqa: BLE001 - sorted by _no_answer
                    if not _no_answer(err):
                        raise
                    if silent_since is None:
                        silent_since = time.monotonic()
                        emit(f"the Ray cluster at {address or 'the Jobs API'} does not answer ({_gist(err)}); "
                             f"waiting up to {wait:.0f} s")
                    if time.monotonic() - silent_since >= wait:
                        raise RayClusterLost(
                            f"lost the Ray cluster at {address or 'the Jobs API'} while Ray job {job_id} ran: no "
                            f"answer for {wait:.0f} s ({_gist(err)}); run the same command once the cluster is "
                            "back: training resumes from its newest checkpoint, a build keeps its finished chunks"
                        ) from None
                    time.sleep(poll_s)
                    continue
                silent_since = None
                try:
                    logs = _within(POLL_TIMEOUT_S, client.get_job_logs, job_id)
                    unreadable = False
                except Exception as err:  # noqa: BLE001 - sorted by _no_answer
                    if not _no_answer(err):
                        raise
                    # A 5xx: the head answers, but cannot fetch the log from the job driver's node (its dashboard
                    # agent down, or on a port it could not bind). The job is followed by its status; its end, its
                    # result (`stages.stored_result`) and its fault (`job_failure`) do not need the log. Anything
                    # else is a hiccup since the status came: the next poll reads the log again.
                    if _server_error(err) and not unreadable:
                        emit(f"the log of Ray job {job_id} cannot be read through {address or 'the Jobs API'} "
                             f"({_gist(err)}); following its status only")
                        unreadable = True
                stream.feed(logs)
                if str(info.status) in TERMINAL:
                    stream.close()
                    return info, logs
                time.sleep(min(poll_s, FAST_POLL_S) if time.monotonic() < fast_until else poll_s)
    except BaseException:
        try:
            if str(_within(POLL_TIMEOUT_S, client.get_job_status, job_id)) not in TERMINAL:
                _within(POLL_TIMEOUT_S, client.stop_job, job_id)
                emit(f"stopped Ray job {job_id}")
        except Exception:  # noqa: BLE001 - the original failure is the one to report
            pass
        raise


def job_failure(job_id: str, info: Any, logs: str) -> RayJobError:
    """One error that says why the job ended: the fault the command classified (its `Fault.job_line`), of the same
    class here; else Ray's message and the end of the log (a bug)."""
    # A log that could not be read (`follow`): Ray keeps the end of the driver's output in the job's message
    fault = fault_in_job_log(logs) or fault_in_job_log(info.message or "")
    if fault is not None:
        kind, line = fault
        cls = RayJobTransientError if kind == "transient" else RayJobInputError
        return cls(f"Ray job {job_id} {info.status}: {line}")
    tail = "\n".join(logs.strip().splitlines()[-LOG_TAIL_LINES:])
    reason = (info.message or "").strip().splitlines()[0] if info.message else ""
    return RayJobError(f"Ray job {job_id} {info.status}: {reason or info.error_type or 'no reason given'}"
                       f"\n--- last log lines ---\n{tail}")


def submit(client, address: str, emit: Callable[[str], None], retry_s: tuple[float, ...] | None = None,
           **job: Any) -> str:
    """`client.submit_job(**job)`, retrying the Jobs API's "please try again later" with backoff; still refused after
    the last pause, RayClusterUnreachable (a transient fault: one line, and a Prefect task retries it)."""
    pauses = retry_s if retry_s is not None else settings.seconds_list("DCGAN_JOB_SUBMIT_RETRY_S")
    for tries, pause in enumerate((*pauses, None), start=1):
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if not TRY_AGAIN.search(str(err)):
                raise
            if pause is None:
                raise RayClusterUnreachable(f"the Ray cluster at {address} did not take the job after {tries} "
                                            f"tries: {one_line(err).rstrip('.')}") from None
            emit(f"the Ray cluster at {address} asked to try again later; retrying in {pause:g} s")
            time.sleep(pause)


def run_job(address: str, entrypoint: str, runtime_env: dict[str, Any], emit: Callable[[str], None], *,
            submission_id: str | None = None, metadata: dict[str, str] | None = None, poll_s: float = 1.0,
            last_line: Callable[[str], bool] | None = None, **entrypoint_resources: Any) -> str:
    """Submit `entrypoint` to the cluster, stream its log through `emit`, and return the log if it SUCCEEDED.
    `last_line` tells the entrypoint's last line, after which its end is looked for often (`follow`).

    `entrypoint_resources` (entrypoint_num_cpus, entrypoint_num_gpus, entrypoint_memory) place the job's driver: a
    stage that computes in its driver (evaluation) asks for a worker node's CPU or GPU.
    """
    client = connect(address)
    job_id = submit(client, address, emit, entrypoint=entrypoint, runtime_env=runtime_env,
                    submission_id=submission_id, metadata=metadata or {}, **entrypoint_resources)
    names = ", ".join(sorted(n for n in runtime_env.get("env_vars", {}) if n.startswith("AWS_"))) or "none"
    emit(f"submitted Ray job {job_id} to {address}: {entrypoint} (storage settings passed: {names})")
    info, logs = follow(client, job_id, lambda line: emit(f"[ray job] {line}"), poll_s=poll_s, address=address,
                        last_line=last_line)
    if str(info.status) != "SUCCEEDED":
        raise job_failure(job_id, info, logs)
    emit(f"Ray job {job_id} SUCCEEDED")
    return logs
