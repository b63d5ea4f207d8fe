"""Fault classes (issue 21): transient faults are retried with the documented backoff and then reported in one line,
bad input is one line and exit 2 and never retried, anything else keeps its traceback, from the CLI and from the
Prefect tasks alike. Storage faults are met for real: a moto S3 server on 127.0.0.1 that is down, or comes back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_faults import TINY, make_run, world  # noqa: F401 (fixture)

from dcgan.cli import main
from preprocessing import lsun, settings, storage
from fresh_process import own_ray_temp_dir, ray_sessions
from realdata import digits_folder, encode, lsun_like_photos
from preprocessing.errors import InputError, TransientError, classify, retrying
from preprocessing.settings import retry_delays

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_and_the_code_promise_the_same_backoff(monkeypatch):
    text = " ".join((REPO / "README.md").read_text().split())
    promised = re.search(r"faults are retried after (\d+) s, (\d+) s and (\d+) s", text)
    assert promised, "README no longer states the retry delays"
    assert tuple(float(s) for s in promised.groups()) == settings.SECONDS_LISTS["DCGAN_RETRY_DELAYS_S"][0]
    monkeypatch.delenv("DCGAN_RETRY_DELAYS_S", raising=False)
    assert retry_delays() == [10.0, 60.0, 300.0]
    from pipelines import tasks

    assert tasks._RETRYING["retry_delay_seconds"] == retry_delays()  # the Prefect tasks wait the same
    monkeypatch.setenv("DCGAN_RETRY_DELAYS_S", "0.5, 1")
    assert retry_delays() == [0.5, 1.0]
    monkeypatch.setenv("DCGAN_RETRY_DELAYS_S", "soon")
    with pytest.raises(InputError, match="DCGAN_RETRY_DELAYS_S"):
        retry_delays()


@pytest.mark.parametrize("fault, calls, raised", [
    (TransientError("s3://b: cannot reach the S3 endpoint"), 4, TransientError),  # retried 3 times, then one line
    (InputError("config.yaml: train.steps must be positive"), 1, InputError),      # bad input: never retried
    (KeyError("a bug"), 1, KeyError),                                               # a bug: as it is
])
def test_each_class_is_retried_or_not(fault, calls, raised):
    seen, slept = [], []

    def fn():
        seen.append(1)
        raise fault

    with pytest.raises(raised) as got:
        retrying(fn, "test", delays=[10, 60, 300], sleep=slept.append)
    assert len(seen) == calls and slept == [10, 60, 300][:calls - 1]
    assert got.value is fault
    assert classify(fault).worth_retrying == (not isinstance(fault, InputError))
    assert classify(fault).kind == {TransientError: "transient", InputError: "bad_input", KeyError: "bug"}[raised]


@pytest.mark.parametrize("err, kind", [
    (PermissionError(13, "Permission denied", "/data/theirs"), "bad_input"),
    (OSError(30, "Read-only file system", "/mnt/ro/ds"), "bad_input"),
    (OSError(36, "File name too long", "/d/" + "x" * 300), "bad_input"),
    (OSError(40, "Too many levels of symbolic links", "/loop/a"), "bad_input"),
    (PermissionError(1, "Operation not permitted"), "bug"),   # names no path: not the user's to change
    (OSError(5, "Input/output error", "/dev/sdz"), "bug"),
])
def test_a_path_the_system_refuses_is_bad_input_naming_it(err, kind):
    """A path the user gave that the system refuses as it is (no permission, a read-only mount, too long a name, a
    symlink loop) fails the same way every time: one line naming it, not a traceback, never retried."""
    fault = classify(err)
    assert fault.kind == kind
    if kind == "bad_input":
        assert fault.line == f"{err.filename}: {err.strerror}" and not fault.worth_retrying


def test_a_transient_fault_that_passes_is_retried_to_success():
    attempts = iter([TransientError("down"), TransientError("still down"), "done"])

    def fn():
        got = next(attempts)
        if isinstance(got, Exception):
            raise got
        return got

    slept = []
    assert retrying(fn, "test", delays=[10, 60, 300], sleep=slept.append) == "done"
    assert slept == [10, 60]


@pytest.fixture
def flaky_s3(s3_bucket, monkeypatch):
    """A second moto server on 127.0.0.1 (moto keeps its buckets per process, so it serves the same data), which
    the test stops and starts; the CLI is pointed at it."""
    from conftest import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    servers = []

    def start():
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        servers.append(server)

    def stop():
        servers.pop().stop()

    start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    storage._client.cache_clear()
    yield s3_bucket, start, stop
    while servers:
        stop()
    storage._client.cache_clear()


def test_cli_retries_an_s3_endpoint_that_comes_back(flaky_s3, tmp_path, monkeypatch, capfd):
    """Before: one line at the first failure, no retry (the README promised retries)."""
    bucket, start, stop = flaky_s3
    run = f"{bucket}/runs/tiny"
    make_run(run)
    stop()
    monkeypatch.setenv("DCGAN_RETRY_DELAYS_S", "4,4,4")
    back = threading.Timer(4.0, start)  # after the first attempt failed, within the first retry's wait
    back.start()
    try:
        status = main(["sample", "--run", run, "--n", "4", "--out", str(tmp_path / "s.png")])
    finally:
        back.join()
    err = capfd.readouterr().err
    assert status == 0, err
    assert "Traceback" not in err
    assert len(re.findall(r"dcgan sample: .*cannot reach the S3 endpoint.*; retrying in 4 s \(retry 1 of 3\)", err)) == 1
    assert (tmp_path / "s.png").stat().st_size > 0


def test_cli_reports_an_s3_endpoint_that_stays_down_in_one_line(flaky_s3, tmp_path, monkeypatch, capfd):
    bucket, _, stop = flaky_s3
    stop()
    monkeypatch.setenv("DCGAN_RETRY_DELAYS_S", "0.2,0.2")
    status = main(["sample", "--run", f"{bucket}/runs/nothing", "--n", "4", "--out", str(tmp_path / "s.png")])
    err = capfd.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("dcgan sample: error: ")]
    assert status == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and "cannot reach the S3 endpoint" in errors[0]
    assert err.count("retrying in 0.2 s") == 2


def test_no_aws_credentials_is_one_line(s3_bucket, monkeypatch, tmp_path, capfd):
    """Item 6: was a NoCredentialsError traceback from storage.exists (dedup and evaluate check for objects first)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("DCGAN_RETRY_DELAYS_S", "5")  # bad input: must not wait for a retry
    storage._client.cache_clear()
    try:
        status = main(["dedup", f"{s3_bucket}/datasets/d", "--out", f"{s3_bucket}/datasets/e"])
    finally:
        storage._client.cache_clear()
    err = capfd.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("dcgan dedup: error: ")]
    assert status == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and "no AWS credentials" in errors[0] and "retrying" not in err


def _cli_in_own_process(args: list[str], ray_tmp: Path, **env: str | None) -> subprocess.CompletedProcess:
    """`dcgan ...` in a fresh process, Ray's temp dir its own (so a session Ray starts is seen), RAY_ADDRESS unset."""
    full = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp), "DCGAN_RETRY_DELAYS_S": ""}
    full.pop("RAY_ADDRESS", None)
    for name, value in env.items():
        full.pop(name, None) if value is None else full.__setitem__(name, value)
    return subprocess.run([sys.executable, "-m", "dcgan.cli", *args], capture_output=True, text=True, timeout=300,
                          env=full)


@pytest.mark.parametrize("name, value", [
    ("DCGAN_PROGRESS_INTERVAL", "abc"), ("DCGAN_PROGRESS_INTERVAL", "-2"), ("DCGAN_S3_TIMEOUT_S", "-1"),
    ("DCGAN_S3_TIMEOUT_S", "nan"), ("DCGAN_WORKERS_WAIT_S", "soon"), ("DCGAN_CLUSTER_LOST_AFTER_S", "inf"),
    ("DCGAN_JOB_SUBMIT_RETRY_S", "1,x"), ("DCGAN_LEASE_S", "0"), ("DCGAN_LOG_LEVEL", "LOUD"),
    ("DCGAN_RETRY_DELAYS_S", "-1"),
])
def test_a_bad_setting_in_the_environment_is_one_line_before_anything_is_written(name, value, tmp_path, monkeypatch,
                                                                                 capsys):
    """Each DCGAN_* setting was read where it is used: `DCGAN_PROGRESS_INTERVAL=abc` was a ValueError traceback once
    the build had claimed its output and started Ray, `DCGAN_S3_TIMEOUT_S=-1` blamed the AWS settings. Now every one
    is read when the command starts (preprocessing.settings)."""
    monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    assert main(["build-lsun", str(digits_folder(tmp_path / "digits")), "--out", str(out), "--no-dedup",
                 "--resolution", "32"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dcgan build-lsun: error: {name}={value!r}"), lines
    assert not out.exists()


@pytest.mark.parametrize("args, said", [
    (["build-lsun", "{digits}", "--out", ""], "data: Value error, the location is empty"),
    (["train", "--data", "", "--run", "{tmp}/run"], "data: Value error, the location is empty"),
    (["train", "--data", "{tmp}/ds", "--run", " "], "run: Value error, the location is empty"),
    (["dedup", "{tmp}/ds", "--out", ""], "--out is empty"), (["dedup", ""], "URI is empty"),
    (["sample", "--run", ""], "--run is empty"), (["sample", "--run", "{tmp}/run", "--out", ""], "--out is empty"),
])
def test_an_empty_location_is_one_line_not_the_current_directory_or_a_default(args, said, tmp_path, monkeypatch,
                                                                              capsys):
    """`--out "$OUT"` with OUT unset: build-lsun took the current directory for its output (and told of an overlap
    with a path the user never typed), dedup and sample took their default. Every empty location is refused."""
    digits = str(digits_folder(tmp_path / "digits"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main([a.format(digits=digits, tmp=tmp_path) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dcgan {args[0]}: error: ") and said in lines[0], lines
    assert not list(work.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "digits"]


def test_settings_take_their_defaults_and_the_values_the_readme_names(monkeypatch):
    for name in (*settings.SECONDS, *settings.SECONDS_LISTS, settings.LOG_LEVEL):
        monkeypatch.delenv(name, raising=False)
    settings.check()
    assert settings.seconds("DCGAN_LEASE_S") == 60 and settings.seconds("DCGAN_WORKERS_WAIT_S") == 900
    assert settings.log_level() == logging.WARNING
    monkeypatch.setenv("DCGAN_WORKERS_WAIT_S", "0")  # 0 or more: do not wait
    monkeypatch.setenv("DCGAN_RETRY_DELAYS_S", "")  # empty: no retries
    monkeypatch.setenv("DCGAN_PROGRESS_INTERVAL", " 2.5 ")
    monkeypatch.setenv("DCGAN_LOG_LEVEL", "info")
    settings.check()
    assert settings.seconds("DCGAN_WORKERS_WAIT_S") == 0 and settings.seconds_list("DCGAN_RETRY_DELAYS_S") == ()
    assert settings.seconds("DCGAN_PROGRESS_INTERVAL") == 2.5 and settings.log_level() == logging.INFO
    for level, number in (("warn", logging.WARNING), ("20", logging.INFO), ("NOTSET", 0)):  # as logging takes them
        monkeypatch.setenv("DCGAN_LOG_LEVEL", level)
        assert settings.log_level() == number


NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
                  "AWS_PROFILE": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
                  "AWS_CONFIG_FILE": "/nonexistent/config", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.mark.parametrize("env, culprit", [
    ({"AWS_PROFILE": "no-such-profile"}, "The config profile (no-such-profile) could not be found"),
    ({"AWS_PROFILE": "x", "AWS_CONFIG_FILE": str(REPO / "README.md")}, "Unable to parse config file"),
    ({"AWS_ENDPOINT_URL": "not-a-url"}, "Invalid endpoint: not-a-url"),
    (NO_CREDENTIALS, "no AWS credentials found"),
], ids=["profile-not-found", "config-file-unparsable", "endpoint-not-a-url", "no-credentials"])
def test_aws_settings_that_make_no_s3_client_are_one_line_before_ray_starts(env, culprit, s3_bucket, tmp_path):
    """AWS settings boto3 cannot use (AWS_PROFILE naming no profile, an AWS_CONFIG_FILE that is not one, an
    AWS_ENDPOINT_URL that is not a URL) were botocore's traceback (exit 1) from where the client is made; with no
    credentials at all the line came only after a local Ray had started (~7 s, and Ray's token-authentication
    WARNING before it). Now each is the command's one line on stderr, exit 2, and no Ray session is made."""
    with own_ray_temp_dir() as ray_tmp:
        done = _cli_in_own_process(["build-lsun", str(digits_folder(tmp_path / "digits")), "--out",
                                    f"{s3_bucket}/d", "--no-dedup"], ray_tmp, **env)
        sessions = ray_sessions(ray_tmp)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("dcgan build-lsun: error: ") and culprit in lines[0], lines
    assert sessions == [], sessions
    assert storage.list_uris(s3_bucket) == []


def test_a_home_where_a_local_ray_cannot_write_its_token_is_one_line_before_anything_is_written(tmp_path):
    """A new local Ray (token authentication on, Ray's default) writes its token to ~/.ray/auth_token when it is given
    none; a home it cannot write (here HOME names a file) was Ray's NotADirectoryError traceback from `ray.init`,
    after the build had claimed its output. Now one line naming the token's path, exit 2, nothing written."""
    home = tmp_path / "home-is-a-file"
    home.write_text("not a folder")
    with own_ray_temp_dir() as ray_tmp:
        done = _cli_in_own_process(["build-lsun", str(digits_folder(tmp_path / "digits")), "--out",
                                    str(tmp_path / "out"), "--resolution", "32", "--no-dedup"], ray_tmp,
                                   HOME=str(home), RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None, RAY_AUTH_TOKEN_PATH=None)
        sessions = ray_sessions(ray_tmp)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"dcgan build-lsun: error: {home}/.ray/auth_token: ") and "not a folder" in lines[0]
    assert sessions == [] and not (tmp_path / "out").exists()


def test_a_local_rays_token_home_is_refused_only_where_ray_would_write_a_token(tmp_path, monkeypatch):
    from preprocessing import compute
    from preprocessing.errors import InputError

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    monkeypatch.setenv("HOME", str(a_file))
    with pytest.raises(InputError, match="not a folder"):
        compute._home_for_local_ray_token()
    for name, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_AUTH_TOKEN", "0" * 32), ("RAY_AUTH_TOKEN_PATH", a_file)):
        with monkeypatch.context() as m:
            m.setenv(name, str(value))
            compute._home_for_local_ray_token()  # no token to write: nothing refused
    monkeypatch.setenv("HOME", str(tmp_path / "new" / "home"))  # missing: Ray makes it (mkdir parents=True)
    compute._home_for_local_ray_token()
    (tmp_path / "with-token" / ".ray").mkdir(parents=True)
    (tmp_path / "with-token" / ".ray" / "auth_token").write_text("t")
    monkeypatch.setenv("HOME", str(tmp_path / "with-token"))
    compute._home_for_local_ray_token()


@pytest.mark.slow
def test_an_s3_build_on_its_own_local_ray_prints_only_its_own_lines(s3_bucket, tmp_path):
    """A build to S3 on the command's own local Ray, as a user runs it (Ray's default token authentication, the
    credentials in the environment): stderr held botocore's "Found credentials in environment variables." and Ray's
    "Token authentication is enabled for this Ray cluster" WARNING beside the project's lines. Now only ours."""
    home = tmp_path / "home"  # Ray writes its token under ~/.ray: this test's own home
    home.mkdir()
    with own_ray_temp_dir() as ray_tmp:
        done = _cli_in_own_process(["build-lsun", str(digits_folder(tmp_path / "digits")), "--out",
                                    f"{s3_bucket}/d", "--resolution", "32", "--no-dedup"], ray_tmp, HOME=str(home),
                                   RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None, RAY_AUTH_TOKEN_PATH=None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (home / ".ray" / "auth_token").exists()  # authentication was on: only its notice is gone
    ours = re.compile(r"^(\d\d:\d\d:\d\d (INFO|WARNING) (preprocessing|dcgan)\.|\[progress\] )")
    assert [ln for ln in done.stderr.splitlines() if not ours.match(ln)] == [], done.stderr[-3000:]
    assert "8 rows" in done.stdout


@pytest.mark.slow
def test_s3_lost_mid_build_is_retried_and_the_build_is_the_clean_one(flaky_s3, s3_server, ray_cluster, tmp_path,
                                                                     monkeypatch):
    """Item 5: moto stops while a build writes its chunks and comes back on the same port 30 s later (past boto3's
    and the chunk's own quick retries, so the build's driver meets the fault and retries the build); the build
    (its own process and local Ray, every worker reaching S3 at the flaky endpoint) rides it out and commits the
    dataset a clean build gives. Before: exit 1 after 7 s with a 212-line Ray/botocore traceback."""
    import os
    import subprocess
    import sys
    import time

    from preprocessing import shards

    bucket, start, stop = flaky_s3
    flaky_endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # this process watches through the server that stays up
    storage._client.cache_clear()
    folder = digits_folder(tmp_path / "digits", 480)
    args = ["build-lsun", str(folder), "--resolution", "32", "--shard-rows", "20", "--no-dedup"]
    assert main([*args, "--out", f"{bucket}/clean"]) == 0

    env = {**os.environ, "AWS_ENDPOINT_URL": flaky_endpoint, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled",
           "DCGAN_RETRY_DELAYS_S": "5,10,20",
           "DCGAN_S3_TIMEOUT_S": "3"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "dcgan.cli", *args, "--out", f"{bucket}/flaky"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not storage.list_uris(f"{bucket}/flaky/_chunks") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        stop()
        done_at_stop = len(storage.list_uris(f"{bucket}/flaky/_chunks"))
        time.sleep(30.0)
        start()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert 0 < done_at_stop < 24, done_at_stop  # the endpoint went away mid-build
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert re.search(r"dcgan build-lsun: .*cannot reach the S3 endpoint.*; retrying in 5 s \(retry 1 of 3\)", err), \
        err[-3000:]
    clean, flaky = shards.read_manifest(f"{bucket}/clean"), shards.read_manifest(f"{bucket}/flaky")
    assert flaky["content_hash"] == clean["content_hash"] and flaky["counts"] == clean["counts"]


def _train_workers_started() -> int:
    import ray
    from ray.util.state import list_actors

    return len(list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", "RayTrainWorker")], limit=10_000, raise_on_missing_output=False))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["swapped", "truncated"])
def test_a_damaged_shard_is_bad_input_and_not_retried(damage, world, ray_cluster, capfd, monkeypatch):
    """Item 13: a shard that fails its manifest check (sha256/size) in a training worker was retried by Ray Train
    (cluster.max_failures=3: 4 attempts over 77 s) before its one line. Now: one attempt (one worker group of 2
    workers started), one line naming the shard, exit 2."""
    import shutil

    part1 = Path(world.dataset, "shards", "part-00001.parquet")
    if damage == "swapped":
        shutil.copy(Path(world.dataset, "shards", "part-00000.parquet"), part1)
    else:
        part1.write_bytes(part1.read_bytes()[:-100])
    monkeypatch.setenv("DCGAN_RETRY_DELAYS_S", "30")  # bad input: no retry to wait for
    before = _train_workers_started()
    capfd.readouterr()
    status = main(["train", "--config", TINY, "--data", world.dataset, "--run", world.p("r"), "--steps", "4",
                   "--set", "cluster.max_failures=3"])
    err = capfd.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("dcgan train: error: ")]
    assert status == 2 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and "part-00001" in errors[0], err[-3000:]
    assert "retrying" not in err
    assert _train_workers_started() - before == 2  # one worker group: Ray Train did not restart it


@pytest.mark.slow
def test_the_demo_export_deletes_only_what_it_wrote(tmp_path):
    """pipelines/demo.py used to delete every `NNNNN-D.png` in <root>/demo-input by name alone; now the folder is
    claimed with the ownership marker and a re-export removes only the project's own files."""
    from pipelines.demo import export_mnist
    from preprocessing.ownership import OwnershipError

    users = tmp_path / "users" / "demo-input"
    users.mkdir(parents=True)
    (users / "00001-3.png").write_bytes(b"a user's own picture, named like a digit")
    with pytest.raises(OwnershipError, match="00001-3.png"):
        export_mnist(users, 5)
    assert (users / "00001-3.png").read_bytes().startswith(b"a user's") and len(list(users.iterdir())) == 1

    out = tmp_path / "runs" / "demo-input"
    first = export_mnist(out, 6)
    assert len(list(first.glob("*.png"))) == 6 and (out / "_dcgan.json").exists()
    (first / "notes.txt").write_text("mine")
    second = export_mnist(out, 3)
    assert second == first and len(list(first.glob("*.png"))) == 3 and (first / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_the_demo_export_takes_over_an_export_from_before_the_marker(tmp_path):
    """An export written by the old code (digits in the folder itself, a `.exported` stamp beside it) is the
    project's: it is claimed and replaced, and a user's file in it stays."""
    from pipelines.demo import export_mnist

    old = tmp_path / "demo-input"
    old.mkdir()
    for name in ("00007-1.png", "00012-2.png"):
        (old / name).write_bytes(b"old export")
    (old / "README.txt").write_text("mine")
    (tmp_path / "demo-input.exported").write_text("2 of the pool\n")
    digits = export_mnist(old, 4)
    assert sorted(p.name for p in old.iterdir()) == ["README.txt", "_dcgan.json", "digits", "export.txt"]
    assert len(list(digits.glob("*.png"))) == 4 and not (tmp_path / "demo-input.exported").exists()


def test_ray_trains_controller_gets_our_poll_interval_and_start_timeout_unless_the_user_set_them(monkeypatch):
    """Ray Train's controller polls its workers every 2 s by default, so each fit ended ~1.5 s after its workers did
    (issue 22's fixed start-up); `_controller_env` sets 0.5 s, a wait shorter than Ray's start timeout and no
    preemption watcher (a process of its own, of no use to our loop) while the controller starts, never over what the
    user set, and leaves the environment as it was."""
    from preprocessing import ray_train

    poll, start = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    watcher = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
    for name in (poll, start, watcher):
        monkeypatch.delenv(name, raising=False)
    with ray_train._controller_env(4.0):
        assert os.environ[poll] == "0.5" and os.environ[start] == "4" and os.environ[watcher] == "0"
    assert poll not in os.environ and start not in os.environ and watcher not in os.environ
    with ray_train._controller_env(600.0):
        assert os.environ[poll] == "0.5" and start not in os.environ
    monkeypatch.setenv(poll, "3")
    monkeypatch.setenv(start, "90")
    monkeypatch.setenv(watcher, "1")
    with ray_train._controller_env(4.0):
        assert os.environ[poll] == "3" and os.environ[start] == "90" and os.environ[watcher] == "1"
    assert os.environ[poll] == "3" and os.environ[start] == "90" and os.environ[watcher] == "1"


def test_a_trainer_given_no_ray_dataset_starts_no_dataset_manager():
    """Ray Train's dataset callback starts a DatasetManager actor (a fresh process) for every worker group, Ray
    Datasets or none; our trainers read their own stream of shards, so `Trainer` drops it, and keeps it for a trainer
    that is given a Ray Dataset (the dedup autoencoder's fit on Ray Train)."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from preprocessing import ray_train
    from preprocessing.config import ClusterConfig

    def callbacks(**kw):
        trainer = ray_train.Trainer(lambda: None, scaling_config=ray_train.scaling(ClusterConfig()), **kw)
        return [type(cb) for cb in trainer._create_default_callbacks()]

    without = callbacks()
    assert DatasetsCallback not in without and without  # Ray's other callbacks stay
    with_data = callbacks(datasets={"train": lambda: None})  # a dataset made when the workers start (never, here)
    assert DatasetsCallback in with_data and set(with_data) - {DatasetsCallback} == set(without)


def test_ray_train_retries_all_but_bad_input(monkeypatch, tmp_path):
    """The training failure policy: a damaged shard is raised at once; the store not answering mid-training (a
    transient ShardUnreachable, not a ShardError) and a bug are Ray Train's to retry, as before."""
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from preprocessing.ray_train import KnownFaultPolicy
    from preprocessing import ingest

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: the store is unreachable
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage._client.cache_clear()
    try:
        with pytest.raises(TransientError) as unreachable:
            ingest.read_shard("s3://b/d", {"path": "shards/part-00000.parquet"}, 32, 3, ["image"], 0)
    finally:
        storage._client.cache_clear()
    assert isinstance(unreachable.value, ingest.ShardUnreachable)

    def decision(err):
        return KnownFaultPolicy(FailureConfig(max_failures=3)).make_decision(WorkerGroupError("failed", {1: err}))

    assert decision(ingest.ShardError("shard shards/part-00001.parquet: sha256 differs")) == FailureDecision.RAISE
    assert decision(unreachable.value) == FailureDecision.RETRY
    assert decision(RuntimeError("a bug, or a lost worker")) == FailureDecision.RETRY


# ------------------------------------------------------------------------------------------------ a full disk


def test_a_write_that_finds_no_space_is_bad_input_in_one_line(tmp_path):
    """A real ENOSPC (/dev/full answers every write with it): the user must free space or write elsewhere, so it is
    bad input (one line, exit 2, never retried), also when Ray's task wrapper carries it; and a run whose only
    checkpoint is a write the disk cut off starts again at step 0, while a whole checkpoint that fails its checksum
    is still refused."""
    import errno

    import ray.exceptions

    from dcgan import checkpoints
    from dcgan.config import load_config
    from dcgan.networks import Discriminator, Generator
    from preprocessing.errors import UserError

    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb", buffering=0) as f:
            f.write(b"a shard")
    assert full.value.errno == errno.ENOSPC
    for err in (full.value, ray.exceptions.RayTaskError("_chunk_task", "tb", full.value).as_instanceof_cause()):
        fault = classify(err)
        assert (fault.kind, fault.worth_retrying) == ("bad_input", False)
        assert fault.line.startswith("No space left on device: free space there or write elsewhere"), fault.line
    assert classify(OSError(errno.EACCES, "Permission denied")).kind == "bug"  # only the full-disk errnos

    run = str(tmp_path / "run")
    cfg = load_config(TINY, {"run": run})
    state = {"generator": Generator(cfg.model).state_dict(), "discriminator": Discriminator(cfg.model).state_dict(),
             "step": 5}
    state_pt = Path(checkpoints.save(run, 5, state)) / "state.pt"
    whole = state_pt.read_bytes()
    state_pt.write_bytes(whole[: len(whole) // 3])       # the disk filled up while it was written
    assert checkpoints.resume_state(run) is None
    state_pt.unlink()                                    # or the upload never got to it
    assert checkpoints.resume_state(run) is None
    state_pt.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))  # whole, but damaged: not for a silent restart
    with pytest.raises(UserError, match="every checkpoint .* is corrupt"):
        checkpoints.resume_state(run)
    state_pt.write_bytes(whole)
    assert checkpoints.resume_state(run)["step"] == 5


FULL_DISK = r"""
set -u
cli() { "$PY" -m dcgan.cli "$@"; }
files() { (cd "$1" && find . -type f -printf '%P %i %s %T@\n' | sort); }
mount -t tmpfs -o size=64k tmpfs "$DATA"
mount -t tmpfs -o size=512k tmpfs "$RUN"
cli build-lsun "$LMDB" --out "$DATA/ds" --resolution 32 --shard-rows 4 --no-dedup 2> "$OUT/build1.err"
echo $? > "$OUT/build1.rc"; files "$DATA" > "$OUT/build1.files"
mount -o remount,size=16m "$DATA"
cli build-lsun "$LMDB" --out "$DATA/ds" --resolution 32 --shard-rows 4 --no-dedup --json > "$OUT/build2.json" \
    2> "$OUT/build2.err"
echo $? > "$OUT/build2.rc"; files "$DATA" > "$OUT/build2.files"
cli train --config "$TINY" --data "$DIGITS" --run "$RUN/tiny" --steps 10 2> "$OUT/train.err"
echo $? > "$OUT/train.rc"
mount -t tmpfs -o size=1m tmpfs "$TEMP"
RAY_TMPDIR="$TEMP" cli build-lsun "$LMDB" --out "$OUT/never" --no-dedup 2> "$OUT/local_ray.err"
echo $? > "$OUT/local_ray.rc"
"""


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_same_commands_finish_once_there_is_space(tmp_path):
    """A dataset and a run on disks that fill up (small tmpfs mounts in a mount namespace of the test's own:
    `unshare -rm`, no root needed where user namespaces are allowed): the build stops with one line that names the
    file, exit 2, no traceback and no half-written file; with space again the same command keeps the chunks it
    wrote and finishes with every row. The training's first checkpoint does not fit: one line, exit 2, no traceback
    (Ray Train logs its failed background upload with one), no second attempt. (That the same command then starts
    such a run again at step 0: `test_a_write_that_finds_no_space_is_bad_input_in_one_line`.) A local Ray asked for
    on a temp disk without room for its session is one line before Ray starts."""
    from test_faults import make_dataset

    lmdb_path = tmp_path / "bedroom_val_lmdb"
    good = {}
    for rgb in lsun_like_photos().values():
        for ext in (".jpg", ".webp"):
            data = encode(rgb, ext)
            good[hashlib.sha1(data).hexdigest()] = data
    lsun.write_lmdb(str(lmdb_path), {k.encode(): v for k, v in good.items()})
    digits = str(tmp_path / "digits")
    make_dataset(digits)
    out, data, run, temp = (tmp_path / d for d in ("out", "data", "run", "temp"))
    for d in (out, data, run, temp):
        d.mkdir()
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(REPO), "LMDB": str(lmdb_path), "DIGITS": digits,
           "TINY": TINY, "DATA": str(data), "RUN": str(run), "OUT": str(out), "TEMP": str(temp),
           "DCGAN_RETRY_DELAYS_S": "1", "RAY_ADDRESS": ""}  # a transient reading would show as "retrying"
    done = subprocess.run(["unshare", "-rm", "bash", "-c", FULL_DISK], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    got = {p.name: p.read_text() for p in out.iterdir()}

    def the_line(err: str, command: str) -> str:
        lines = [ln for ln in err.splitlines() if ln.startswith(f"dcgan {command}: error: ")]
        assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
        return lines[0]

    assert got["build1.rc"].strip() == "2", got["build1.err"][-3000:]
    line = the_line(got["build1.err"], "build-lsun")
    assert re.search(r"/ds/\S+: No space left on device: free space there or write elsewhere", line), line
    assert "retrying" not in got["build1.err"]                    # bad input: not retried
    written = dict(ln.split(" ", 1) for ln in got["build1.files"].splitlines())
    assert not [p for p in written if p.endswith(".tmp")], written  # no half-written file left behind
    finished = {m.group(1) for m in (re.search(r"_chunks/part-(\d+)\.json$", p) for p in written) if m}
    kept = {p: v for p, v in written.items() if re.fullmatch(r"ds/shards/part-(\d+)\.parquet", p)
            and p[-13:-8] in finished}                              # chunks with their sidecar: done
    assert kept, written                                           # some chunks finished before the disk filled

    assert got["build2.rc"].strip() == "0", got["build2.err"][-3000:]
    result = json.loads(got["build2.json"].splitlines()[-1])["dcgan_result"]
    assert result["counts"]["rows"] == len(good) and result["counts"]["inputs"] == len(good), result
    after = dict(ln.split(" ", 1) for ln in got["build2.files"].splitlines())
    assert {p: after.get(p) for p in kept} == kept                 # the finished chunks were kept, not redone

    assert got["train.rc"].strip() == "2", got["train.err"][-3000:]
    line = the_line(got["train.err"], "train")  # Ray Train's upload names no file: the run is named
    assert line.startswith(f"dcgan train: error: {run / 'tiny'}: ") and "No space left on device" in line, line
    assert got["train.err"].count("starting step 0/10") == 1, got["train.err"][-3000:]  # not retried by Ray Train

    # a temp disk without room for a local Ray's session: told before Ray is started (it timed out in a traceback)
    assert got["local_ray.rc"].strip() == "2", got["local_ray.err"][-3000:]
    assert "a local Ray keeps its session" in the_line(got["local_ray.err"], "build-lsun")
    assert not (out / "never").exists()
