"""Training on a Ray cluster as a Ray Job, followed from the Prefect run to its end.

A Prefect worker needs no GPU and should not hold a Ray driver for hours: on a cluster, `train-dcgan` submits
`dcgan train --config config.yaml` through the Jobs API of the cluster's dashboard (http://head:8265, or a ray://
address), streams the job's output into the Prefect run log line by line, and fails the run with the job's cause if it
ends FAILED or STOPPED. The job's working_dir holds only the resolved config; the code comes from the cluster's image
(`infra/Dockerfile`), so what trains is what was deployed. Storage settings reach the job as the standard AWS_*
variables, passed by name when they are set here, and never logged.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from dcgan.config import Config, dump_config
from preprocessing import storage
from preprocessing.errors import TransientError, UserError

# Addresses that name a cluster's Jobs API; anything else (unset, "auto", "local", host:6379) trains in-process.
JOBS_SCHEMES = ("http://", "https://", "ray://")
# The standard storage settings a job needs to reach the same object store (passed only when set). Credentials are
# not among them: anyone who can read the Jobs API can read a job's environment, so the nodes bring their own
# (their environment, a profile, an instance or pod role); `cluster.pass_credentials: true` is the explicit opt-in.
AWS_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# The CLI's one-line message for bad input (dcgan/cli.py): such a job fails the same way every time.
INPUT_ERROR = re.compile(r"^dcgan [\w-]+: error: (.+)$", re.MULTILINE)
# Terminal colours and cursor moves (Ray's prefixes, progress bars) mean nothing in a run log.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Settings of the job's processes: no progress bars (they are a terminal's, not a log's).
JOB_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_V2_ENABLED": "1"}
LOG_TAIL_LINES = 30


class RayClusterUnreachable(TransientError, ConnectionError):
    """The Jobs API did not answer (a transient fault: the task retries it with backoff)."""


class RayJobError(RuntimeError):
    """A job that ended FAILED or STOPPED; the message carries Ray's reason and the end of its log."""


class RayJobInputError(RayJobError, UserError, ValueError):
    """A job that failed on bad input (config, dataset): retrying cannot help."""


def cluster_address(cfg: Config) -> str | None:
    """The Jobs API address from `cfg.cluster.address` or RAY_ADDRESS, or None to train in this process."""
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address and address.strip().startswith(JOBS_SCHEMES):
        return address.strip().rstrip("/")
    return None


# ------------------------------------------------------------------------------------------------------ client

_env_lock = threading.Lock()


@contextmanager
def _address_wins(address: str) -> Iterator[None]:
    """Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address given; the config's must win."""
    names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
    with _env_lock:
        saved = {n: os.environ.pop(n) for n in names if n in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def connect(address: str):
    """A JobSubmissionClient for `address`, or RayClusterUnreachable naming the address and the cause."""
    from ray.job_submission import JobSubmissionClient

    try:
        with _address_wins(address):
            return JobSubmissionClient(address)
    except (ConnectionError, OSError, RuntimeError) as err:
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RayClusterUnreachable(f"cannot reach the Ray cluster at {address}: {cause}") from None


def aws_env(pass_credentials: bool = False) -> dict[str, str]:
    """The AWS_* settings that are set here, for the job's runtime env (values are never logged); credentials only
    when `pass_credentials`."""
    names = AWS_SETTINGS + (AWS_CREDENTIALS if pass_credentials else ())
    return {name: os.environ[name] for name in names if os.environ.get(name)}


# ------------------------------------------------------------------------------------------------------- a job


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


def follow(client, job_id: str, emit: Callable[[str], None], poll_s: float = 1.0) -> tuple[Any, str]:
    """Stream a job's log through `emit` until it ends; returns (JobDetails, full log).

    Polls the Jobs API (`get_job_info`, `get_job_logs`) rather than holding a websocket, so a dropped connection
    costs one poll, not the run. If the follower is interrupted (Prefect cancels the run), the job is stopped.
    """
    stream = _LineStream(emit)
    logs = ""
    try:
        while True:
            info = client.get_job_info(job_id)
            logs = client.get_job_logs(job_id)
            stream.feed(logs)
            if str(info.status) in TERMINAL:
                stream.close()
                return info, logs
            time.sleep(poll_s)
    except BaseException:
        try:
            if str(client.get_job_status(job_id)) not in TERMINAL:
                client.stop_job(job_id)
                emit(f"stopped Ray job {job_id}")
        except Exception:  # noqa: BLE001 - the original failure is the one to report
            pass
        raise


def job_failure(job_id: str, info: Any, logs: str) -> RayJobError:
    """One error that says why the job ended: Ray's message, the CLI's own error line, and the end of the log."""
    tail = "\n".join(logs.strip().splitlines()[-LOG_TAIL_LINES:])
    reason = (info.message or "").strip().splitlines()[0] if info.message else ""
    bad_input = INPUT_ERROR.findall(logs)
    if bad_input:
        return RayJobInputError(f"Ray job {job_id} {info.status}: {bad_input[-1]}\n--- last log lines ---\n{tail}")
    return RayJobError(f"Ray job {job_id} {info.status}: {reason or info.error_type or 'no reason given'}"
                       f"\n--- last log lines ---\n{tail}")


def run_job(address: str, entrypoint: str, runtime_env: dict[str, Any], logger: logging.Logger | logging.LoggerAdapter,
            *, submission_id: str | None = None, metadata: dict[str, str] | None = None, poll_s: float = 1.0) -> str:
    """Submit `entrypoint` to the cluster, stream its log into `logger`, and return the log if it SUCCEEDED."""
    client = connect(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                               metadata=metadata or {})
    env_names = ", ".join(sorted(n for n in runtime_env.get("env_vars", {}) if n.startswith("AWS_"))) or "none"
    logger.info("Submitted Ray job %s to %s: %s (storage settings passed: %s)", job_id, address, entrypoint, env_names)
    info, logs = follow(client, job_id, lambda line: logger.info("[ray job] %s", line), poll_s=poll_s)
    if str(info.status) != "SUCCEEDED":
        err = job_failure(job_id, info, logs)
        logger.error("%s", err)
        raise err
    logger.info("Ray job %s SUCCEEDED", job_id)
    return logs


# ---------------------------------------------------------------------------------------------------- training


def job_config(cfg: Config) -> Config:
    """The config the job runs: local paths made absolute (the job's cwd is its working_dir), and no address
    (inside a job, RAY_ADDRESS already names the cluster)."""
    update: dict[str, Any] = {"root": storage.normalize(cfg.root)}
    for field in ("data", "run"):
        value = getattr(cfg, field)
        if value is not None:
            update[field] = storage.normalize(value)
    out = cfg.model_copy(update=update)
    out.cluster = out.cluster.model_copy(update={"address": None})
    return out


def run_training_job(cfg: Config, address: str, logger: logging.Logger | logging.LoggerAdapter,
                     poll_s: float = 2.0) -> str:
    """Train `cfg` on the cluster at `address` as a Ray Job and follow it to the end; returns the job's log."""
    resolved = job_config(cfg)
    with tempfile.TemporaryDirectory(prefix="dcgan-job-") as work:
        Path(work, "config.yaml").write_text(dump_config(resolved))
        runtime_env = {"working_dir": work, "env_vars": {**JOB_ENV, **aws_env(cfg.cluster.pass_credentials)}}
        slug = re.sub(r"[^a-z0-9-]+", "-", cfg.name.lower()).strip("-") or "run"
        return run_job(address, "dcgan train --config config.yaml", runtime_env, logger,
                       submission_id=f"dcgan-train-{slug}-{uuid.uuid4().hex[:8]}",
                       metadata={"dcgan.run": resolved.run_uri}, poll_s=poll_s)
