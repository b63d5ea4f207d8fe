"""A run has one writer (dcgan.lease), so has a dataset being built or de-duplicated (preprocessing.lease), and a
metrics history survives a repeated interval (dcgan.run_log): the lease's compare-and-swap on local disk and on a
real S3 server (moto), and the CSV a resume rewrites."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from dcgan import lease
from dcgan.run_log import RunLog, parse_metrics, read_metrics
from preprocessing import storage


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "r")
    return request.getfixturevalue("s3_bucket") + "/runs/r"


def test_a_second_writer_is_refused_naming_the_holder_until_the_first_releases(run_uri):
    first = lease.acquire(run_uri, ttl_s=30)
    with pytest.raises(lease.LeaseError) as refused:
        lease.acquire(run_uri, ttl_s=30)
    line = str(refused.value)
    assert "\n" not in line and f"host {socket.gethostname()}" in line
    assert f"pid {first.body()['holder']['pid']}" in line
    assert f"since {first.since}" in line
    first.renew()  # the holder's heartbeat goes on
    first.release()
    assert not storage.exists(lease.lease_uri(run_uri))
    lease.acquire(run_uri, ttl_s=30).release()


def test_an_expired_lease_is_taken_over_and_its_old_holder_can_no_longer_write(run_uri):
    old = lease.acquire(run_uri, ttl_s=0.5)
    time.sleep(0.7)
    new = lease.acquire(run_uri, ttl_s=30)
    with pytest.raises(lease.LeaseError, match="taken by"):
        old.renew()
    old.release()  # the old holder removes nothing that is not its own
    assert storage.read_json(lease.lease_uri(run_uri))["token"] == new.token
    new.release()


def test_a_dead_driver_on_this_host_is_waited_out_not_refused(tmp_path):
    run = str(tmp_path / "r")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = lease.Lease(lease.lease_uri(run), 1.0)
    body = dead.body()
    body["holder"]["pid"] = int(gone.stdout)
    assert lease._lease._create(dead.uri, body) is not None
    waited = []
    taken = lease.acquire(run, ttl_s=30, wait=lambda s: (waited.append(s), time.sleep(s)))
    assert len(waited) == 1 and 0 < waited[0] <= 1.2
    assert storage.read_json(lease.lease_uri(run))["token"] == taken.token
    taken.release()

    # an expiry an hour off (a file edited by hand, a clock set back) is waited for one lease life, not an hour
    body["expires"] = time.time() + 3600
    assert lease._lease._create(dead.uri, body) is not None
    waited.clear()
    taken = lease.acquire(run, ttl_s=30, wait=lambda s: (waited.append(s), time.sleep(s)))
    assert len(waited) == 1 and 0 < waited[0] <= 1.2, waited
    assert storage.read_json(lease.lease_uri(run))["token"] == taken.token


def test_workers_see_their_driver_go(run_uri):
    held = lease.acquire(run_uri, ttl_s=0.9)
    watch = lease.Watch(**held.watch_config())
    assert watch.problem() is None
    held.renew()
    assert watch.problem() is None
    time.sleep(0.7)  # no renewal for more than two heartbeats (2 x 0.3 s): the driver died
    assert "stopped renewing" in watch.problem()

    other = lease.Watch(**held.watch_config())
    assert other.problem() is None
    time.sleep(1.0)
    thief = lease.acquire(run_uri, ttl_s=30)  # expired, taken by the next driver
    assert f"now held by host {socket.gethostname()}" in other.problem()
    thief.release()
    assert lease.Watch(thief.uri, thief.token, 30).problem().endswith("is gone (its driver ended)")


def test_held_removes_the_lease_at_the_end_also_after_a_failure(run_uri):
    with pytest.raises(RuntimeError):
        with lease.held(run_uri):
            assert storage.exists(lease.lease_uri(run_uri))
            raise RuntimeError("a bug")
    assert not storage.exists(lease.lease_uri(run_uri))


# ------------------------------------------------------------------------------------------------ metrics.csv

# What two concurrent writers left before the lease (issue 21): every row twice and a header in the middle.
DAMAGED = """step,loss_d,loss_g,d_x,d_g_z,images_per_s,epoch
5,1.2,0.9,0.6,0.4,100.0,0
step,loss_d,loss_g,d_x,d_g_z,images_per_s,epoch
5,1.3,0.8,0.6,0.4,90.0,0
10,1.1,1.0,0.55,0.45,110.0,0
10,1.1,1.0,0.55,0.45,110.0,0
15,1.0,1.1,0.5,0.5,1
"""


def test_a_damaged_history_is_read_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        rows = parse_metrics(DAMAGED)
    assert [r["step"] for r in rows] == [5, 10] and rows[0]["loss_d"] == 1.3
    assert len([r for r in caplog.records if "damaged or repeated" in r.getMessage()]) == 1


def test_a_resume_rewrites_the_rows_after_its_step_so_no_interval_is_written_twice(run_uri, caplog):
    storage.write_text(storage.join(run_uri, "metrics", "metrics.csv"), DAMAGED)
    log = RunLog(run_uri, resume_step=5)  # the newest checkpoint is step 5: rows 10 and 15 are repeated next
    for step in (10, 15):
        log.log(step, {"loss_d": 1.0, "loss_g": 1.0, "d_x": 0.5, "d_g_z": 0.5, "images_per_s": 1.0, "epoch": 0})
    log.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rows = read_metrics(run_uri)
    assert [r["step"] for r in rows] == [5, 10, 15] and not caplog.records
    text = storage.read_text(storage.join(run_uri, "metrics", "metrics.csv"))
    assert text.count("step,") == 1


def test_a_history_with_bytes_that_are_not_text_is_read_and_resumed_with_one_warning(run_uri, caplog):
    """A metrics.csv holding bytes that are not UTF-8 (a disk error, an editor's encoding) was a UnicodeDecodeError in
    every worker of the resumed run, retried by Ray and then a traceback, exit 1: it is a damaged history like the
    others, read as far as it makes sense."""
    uri = storage.join(run_uri, "metrics", "metrics.csv")
    storage.write_bytes(uri, DAMAGED.encode() + b"\xff\xfe\x00garbage\n20,\xe9\n" + b"\x01" * 200_000 + b"\n")
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(run_uri)] == [5, 10]
    assert len([r for r in caplog.records if "damaged or repeated" in r.getMessage()]) == 1
    log = RunLog(run_uri, resume_step=10)
    log.log(15, {"loss_d": 1.0, "loss_g": 1.0, "d_x": 0.5, "d_g_z": 0.5, "images_per_s": 1.0, "epoch": 0})
    log.close()
    assert [r["step"] for r in read_metrics(run_uri)] == [5, 10, 15]


def test_a_remote_runs_scratch_folder_goes_on_close_on_error_and_with_the_next_worker(s3_bucket, tmp_path,
                                                                                       monkeypatch):
    """A remote run's metrics are written in a local scratch folder first: `close` publishes and removes it, a failing
    block removes it without publishing, and what a killed worker left (no Python cleanup runs) the run's next rank 0
    removes (`scratch.clear`), leaving other runs' folders and anything else in the temporary folder alone."""
    import tempfile

    from dcgan import scratch
    from dcgan.run_log import opened

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own temporary folder
    run, other = s3_bucket + "/runs/a", s3_bucket + "/runs/b"
    values = {"loss_d": 1.0, "loss_g": 1.0, "d_x": 0.5, "d_g_z": 0.5, "images_per_s": 1.0, "epoch": 0}
    with opened(run, 0) as log:
        log.log(5, values)
        assert log.dir.is_dir() and log.dir.parent == tmp_path
    assert not log.dir.exists() and [r["step"] for r in read_metrics(run)] == [5]
    with pytest.raises(RuntimeError), opened(run, 5) as log:
        log.log(10, values)
        raise RuntimeError("worker failed")
    assert not log.dir.exists() and [r["step"] for r in read_metrics(run)] == [5]  # nothing more published

    killed = RunLog(run, resume_step=5)  # a worker Ray killed: never closed
    checkpoint = scratch.make(run, "ckpt")
    (checkpoint / "state.pt").write_bytes(b"x" * 1000)
    theirs, mine = scratch.make(other, "metrics"), tmp_path / "someone-elses"
    mine.mkdir()
    assert scratch.clear(run) == 2
    assert not killed.dir.exists() and not checkpoint.exists() and theirs.is_dir() and mine.is_dir()
    killed._csv.close()
    killed._tb.close()


def test_a_dataset_being_written_is_refused_to_a_second_build_and_a_second_dedup(run_uri, tmp_path, capfd):
    """Two commands writing one dataset location at once (a scheduled build overlapping a manual one) both ran and
    both reported success: the later one's manifest stood over files either may have written last, and the first
    one's result line named a dataset that was no longer there. Now the dataset's lease (`_lease.json`, taken after
    the location is claimed) refuses the second with one line naming the holder, before it writes anything."""
    from realdata import digits_folder
    from test_faults import make_dataset

    from dcgan.cli import main
    from preprocessing import dataset_layout, ownership
    from preprocessing import lease as generic

    out = run_uri.replace("/runs/r", "/datasets/d")
    folder = digits_folder(tmp_path / "digits")
    source = str(tmp_path / "source")
    make_dataset(source)
    ownership.claim(out, "dataset")
    first = generic.acquire(out, dataset_layout.lease(out), generic.DATASET, ttl_s=30)
    try:
        capfd.readouterr()
        for argv in (["build-lsun", str(folder), "--out", out, "--resolution", "32", "--no-dedup"],
                     ["dedup", source, "--out", out]):
            assert main(argv) == 2
            err = capfd.readouterr().err
            lines = [ln for ln in err.splitlines() if ln.startswith(f"dcgan {argv[0]}: error: ")]
            assert len(lines) == 1 and "Traceback" not in err, err
            assert f"{out} is being written by another command (host " in lines[0], lines[0]
            assert f"pid {os.getpid()} " in lines[0] and "write to another --out" in lines[0], lines[0]
        assert storage.read_json(dataset_layout.lease(out))["token"] == first.token
        assert sorted(ownership.contents(out)) == ["_dcgan.json", "_lease.json"]  # nothing else was written
    finally:
        first.release()
    assert ownership.contents(out) == ["_dcgan.json"]


def test_a_lease_left_by_this_process_a_dead_builder_or_a_silent_holder_is_not_a_refusal(run_uri):
    """Three leases that are nobody's any more: (1) this process's own, whose release met a storage fault (the CLI's
    retry of a build after S3 came back found it and was refused: exit 2 instead of the clean build); (2) a dead
    builder's on this host, taken over at once (a build's tasks write whole files, the same bytes as the next
    build's: nothing to wait for; a run's driver is waited out, test above); (3) one whose holder on another host
    has missed two renewals, waited for until it expires (at most a third of its life) rather than refused."""
    from preprocessing import dataset_layout
    from preprocessing import lease as generic

    out = run_uri.replace("/runs/r", "/datasets/d")
    uri = dataset_layout.lease(out)
    never = []
    first = generic.acquire(out, uri, generic.DATASET, ttl_s=30)
    generic._HELD.discard(first.token)  # what a release that met a storage fault leaves: the object, not the hold
    second = generic.acquire(out, uri, generic.DATASET, ttl_s=30, wait=never.append)
    assert never == [] and storage.read_json(uri)["token"] == second.token != first.token
    with pytest.raises(lease.LeaseError, match="is being written by another command"):  # held now: refused
        generic.acquire(out, uri, generic.DATASET, ttl_s=30, wait=never.append)
    second.release()

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = generic.Lease(uri, 30.0, noun="dataset")
    body = dead.body()
    body["holder"]["pid"] = int(gone.stdout)
    assert generic._create(uri, body) is not None
    third = generic.acquire(out, uri, generic.DATASET, ttl_s=30, wait=never.append)
    assert never == [] and storage.read_json(uri)["token"] == third.token
    third.release()

    silent = generic.Lease(uri, 30.0, noun="dataset")
    body = silent.body()
    body["holder"]["host"], body["expires"] = "another-host", time.time() + 2.0  # renewed 28 s ago, of 30
    assert generic._create(uri, body) is not None
    waited = []
    fourth = generic.acquire(out, uri, generic.DATASET, ttl_s=30, wait=lambda s: (waited.append(s), time.sleep(s)))
    assert len(waited) == 1 and 0 < waited[0] <= 2.2 and storage.read_json(uri)["token"] == fourth.token
    fourth.release()
