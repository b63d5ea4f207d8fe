"""A location has exactly one writer: a lease object in its storage (layer: preprocessing).

The lease object (a run's `lease.json`, a dataset's `_lease.json`) names its holder (host, pid, since) and carries a
token, a heartbeat counter and an expiry. A writer takes it before it writes (`held`), renews it every `lease_s() /
3` seconds from a thread, and removes it at the end. Every change is a compare-and-swap, so two writers can never
both believe they hold it: on S3 a conditional put (`If-None-Match: *` to create, `If-Match: <etag>` to renew, steal
or delete), on local disk an exclusive create (a hard link of a complete file) and an flock'd read-compare-write. A
second writer is refused with one line naming the holder; a lease is stolen only after it expired (a writer on this
host whose holder pid is gone waits for the expiry, at most one lease life, so the dead writer's workers have stopped
by then).

Workers may watch the lease (`Watch`, a training's workers do): a token that changed or a heartbeat counter that has
not moved for two renewals (measured on the worker's own clock, so no clock skew matters) means their writer is
gone, and they stop before the lease expires and could be taken by the next one. `Writer` holds the words a
location's lines use (dcgan.lease: a run's; `DATASET`: a build's or a dedup's output).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from preprocessing import settings, storage
from preprocessing.errors import UserError

log = logging.getLogger(__name__)

LEASE_ENV = "DCGAN_LEASE_S"  # default 60 s (preprocessing.settings)


class LeaseError(UserError):
    """The location is being written by another writer (or this one lost its lease): one line, exit 2."""


@dataclass(frozen=True)
class Writer:
    """What a lease guards, in the words of its lines: "<location> is being <busy> (<holder>...): <advice>"."""

    noun: str     # "run", "dataset"
    busy: str     # "trained by another driver"
    advice: str   # what the refused one may do instead
    # whether a dead holder on this host is waited out until its lease expires: a training's workers may still
    # checkpoint until they see their driver gone (Watch); a build's or dedup's tasks write whole files, the same
    # bytes the next writer writes, so its lease is taken over at once
    wait_for_dead: bool = True


DATASET = Writer("dataset", "written by another command", "one dataset has one writer; wait for it to finish or "
                 "write to another --out", wait_for_dead=False)

_HELD: set[str] = set()  # tokens of the leases this process holds now: one of its own that is not is a leftover


def lease_s() -> float:
    """How long a lease lives without renewal (DCGAN_LEASE_S, default 60 s); the driver renews it 3 times as often."""
    return settings.seconds(LEASE_ENV)


# ------------------------------------------------------------------------ compare-and-swap on one object or file

Version = Any  # S3: the object's ETag; local: the file's bytes


def _read(uri: str) -> tuple[dict | None, Version]:
    """(the lease, its version), or (None, None) when there is none. An unreadable lease counts as held."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        obj = _conditional(uri, storage.s3_client().get_object, Bucket=bucket, Key=key)  # None: no lease
        if obj is None:
            return None, None
        data = obj["Body"].read()
        return _parse(data), obj["ETag"]
    path = storage.local_path(uri)
    try:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            data = f.read()
    except FileNotFoundError:
        return None, None
    return _parse(data), data


def _parse(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"holder": {"host": "?", "pid": "?", "since": "?"}, "token": None,
                                                  "expires": 0.0, "unreadable": True}


def _conditional(uri: str, fn, **kwargs) -> dict | None:
    """An S3 call with a precondition: its answer, or None when the precondition failed (the lease changed)."""
    from botocore.exceptions import ClientError

    try:
        return fn(**kwargs)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (404, 409, 412):
            return None
        raise storage._explain(err, uri) from None


def _put(uri: str, body: bytes, **condition) -> Version | None:
    bucket, key = storage.split_s3(uri)
    answer = _conditional(uri, storage.s3_client().put_object, Bucket=bucket, Key=key, Body=body, **condition)
    return None if answer is None else answer["ETag"]


def _create(uri: str, lease: dict) -> Version | None:
    """Write the lease if there is none: its version, or None if one exists."""
    body = json.dumps(lease).encode()
    if storage.is_s3(uri):
        return _put(uri, body, IfNoneMatch="*")
    path = storage.local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # appears whole or not at all, and only if there is none
    except FileExistsError:
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return body


@contextlib.contextmanager
def _locked_if_unchanged(uri: str, version: Version) -> Iterator[Any]:
    """Local: the lease file, locked, if it is still the same file with the same bytes; else None."""
    path = storage.local_path(uri)
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        yield None
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            same_file = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino  # not unlinked while we waited
        except FileNotFoundError:
            same_file = False
        yield f if same_file and f.read() == version else None


def _replace(uri: str, lease: dict, version: Version) -> Version | None:
    """Overwrite the lease if it is still at `version`: the new version, or None if it changed meanwhile."""
    body = json.dumps(lease).encode()
    if storage.is_s3(uri):
        return _put(uri, body, IfMatch=version)
    with _locked_if_unchanged(uri, version) as f:
        if f is None:
            return None
        f.seek(0)
        f.write(body)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
        return body


def _delete(uri: str, version: Version) -> bool:
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        return _conditional(uri, storage.s3_client().delete_object, Bucket=bucket, Key=key, IfMatch=version) is not None
    with _locked_if_unchanged(uri, version) as f:
        if f is None:
            return False
        os.unlink(storage.local_path(uri))
        return True


# ------------------------------------------------------------------------------------------------ the writer


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def describe(lease: dict) -> str:
    """`host H pid P since T`: who holds a lease, for the one line a refused writer prints."""
    h = lease.get("holder") or {}
    return f"host {h.get('host', '?')} pid {h.get('pid', '?')} since {h.get('since', '?')}"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Lease:
    """A lease this process holds; `renew` and `release` are compare-and-swaps against what it last wrote."""

    uri: str
    ttl_s: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    beat: int = 0
    version: Version = None
    since: str = field(default_factory=_now_iso)
    lost: str | None = None
    noun: str = "run"

    def body(self) -> dict:
        return {"holder": {"host": socket.gethostname(), "pid": os.getpid(), "since": self.since},
                "token": self.token, "beat": self.beat, "renewed": _now_iso(), "expires": time.time() + self.ttl_s,
                "lease_s": self.ttl_s}

    @property
    def beat_s(self) -> float:
        return self.ttl_s / 3

    def renew(self) -> None:
        """One heartbeat; LeaseError (and `lost` set) when the lease is no longer ours."""
        self.beat += 1
        version = _replace(self.uri, self.body(), self.version)
        if version is None:
            current, _ = _read(self.uri)
            self.lost = (f"{self.uri} was taken by {describe(current)}" if current
                         else f"{self.uri} was removed by someone else")
            raise LeaseError(f"lost the {self.noun}'s lease: {self.lost}; this writer stops writing")
        self.version = version

    def release(self) -> None:
        try:
            if self.lost is None and not _delete(self.uri, self.version):
                log.warning("%s changed under this writer; left as it is", self.uri)
        finally:
            _HELD.discard(self.token)  # not held any more, even where storage kept it (it expires by itself)

    def watch_config(self) -> dict[str, Any]:
        """What a worker needs to watch this lease (see Watch)."""
        return {"uri": self.uri, "token": self.token, "lease_s": self.ttl_s}


def acquire(location: str, uri: str, writer: Writer, ttl_s: float | None = None, *,
            wait: Callable[[float], None] = time.sleep) -> Lease:
    """Take the lease `uri` of `location`, or raise LeaseError naming its live holder. An expired lease is taken over,
    and so at once is one this process left (an earlier attempt whose release met a storage fault: the command's
    retry found its own lease and was refused). One whose holder on this host is gone is waited for until it expires
    when `writer.wait_for_dead` (its workers stop before that), else taken over; one whose holder elsewhere has
    missed two renewals is waited for until it expires (at most a third of its life), not refused."""
    ttl = lease_s() if ttl_s is None else ttl_s
    lease = Lease(uri, ttl, noun=writer.noun)
    dead_until: dict[str, float] = {}  # a dead holder's token -> when its lease counts as expired here
    for _ in range(100):  # each turn is a lost race with another writer: bounded
        lease.version = _create(lease.uri, lease.body())
        if lease.version is not None:
            break
        current, version = _read(lease.uri)
        if current is None:
            continue
        left = float(current.get("expires") or 0) - time.time()
        holder = current.get("holder") or {}
        here = holder.get("host") == socket.gethostname()
        ours = here and str(holder.get("pid")) == str(os.getpid()) and current.get("token") not in _HELD
        dead = here and not ours and not _pid_alive(holder.get("pid"))
        if left > 0 and dead and writer.wait_for_dead:
            # Its workers stop within one lease life of its last renewal (`lease_s`, in the lease). An expiry further
            # off than that (a file edited by hand, a clock set back) is not waited for in full: it was an hour.
            until = dead_until.setdefault(str(current.get("token")),
                                          time.time() + min(left, float(current.get("lease_s") or ttl)))
            left = until - time.time()
            if left > 0:
                log.warning("the %s's last writer (%s) is gone; waiting %.0f s for its lease to expire",
                            writer.noun, describe(current), left)
                wait(left + 0.1)
                continue
        if left > 0 and not (ours or dead):
            if left < float(current.get("lease_s") or ttl) / 3:  # two renewals missed: it stopped or is stalled
                log.warning("%s: its writer (%s) has not renewed its lease since %s; waiting %.0f s for it to "
                            "expire", location, describe(current), current.get("renewed", "?"), left)
                wait(left + 0.1)
                continue
            raise LeaseError(f"{location} is being {writer.busy} ({describe(current)}; lease renewed "
                             f"{current.get('renewed', '?')}, expires in {left:.0f} s): {writer.advice}")
        lease.version = _replace(lease.uri, lease.body(), version)
        if lease.version is not None:
            log.warning("took over the %s lease of %s (%s)", "expired" if left <= 0 else "left", describe(current),
                        lease.uri)
            break
    else:  # pragma: no cover - a hundred lost races in a row
        raise LeaseError(f"{lease.uri}: could not take the {writer.noun}'s lease (other writers keep changing it)")
    check, version = _read(lease.uri)  # read back: a storage that ignored a precondition loses here, not later
    if not check or check.get("token") != lease.token or version != lease.version:
        raise LeaseError(f"{location} is being {writer.busy} ({describe(check or {})})")
    _HELD.add(lease.token)
    return lease


@contextlib.contextmanager
def held(location: str, uri: str, writer: Writer) -> Iterator[Lease]:
    """Hold the lease `uri` of `location` for the block: taken first, renewed by a thread, removed at the end. Should
    it be lost (taken over after a long stall, removed by hand), a block in the main thread is interrupted and ends
    with one LeaseError line; workers that watch it stop by themselves (Watch)."""
    lease = acquire(location, uri, writer)
    stop = threading.Event()
    interrupt = threading.current_thread() is threading.main_thread()

    def beat() -> None:
        while not stop.wait(lease.beat_s):
            try:
                lease.renew()
            except LeaseError as err:
                log.error("%s", err)
                if interrupt:
                    import _thread

                    _thread.interrupt_main()
                return
            except Exception as err:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                log.warning("could not renew the %s's lease (%s); retrying", writer.noun, err)

    thread = threading.Thread(target=beat, name="dcgan-lease", daemon=True)
    thread.start()
    try:
        yield lease
    except KeyboardInterrupt:
        if lease.lost:
            raise LeaseError(f"lost the {writer.noun}'s lease: {lease.lost}; this writer stopped") from None
        raise
    finally:
        stop.set()
        thread.join(timeout=lease.beat_s + 30)
        try:
            lease.release()
        except Exception as err:  # noqa: BLE001 - it expires by itself
            log.warning("could not remove the %s's lease %s (%s); it expires in %.0f s", writer.noun, lease.uri, err,
                        lease.ttl_s)


# ------------------------------------------------------------------------------------------------ the workers


class Watch:
    """A worker's view of its driver's lease: `check()` before each write; `start(on_lost)` checks every half
    renewal from a thread. The driver is gone when the token changed or the lease is missing, or when its heartbeat
    counter has not moved for two renewals on this worker's clock."""

    def __init__(self, uri: str, token: str, lease_s: float):
        self.uri, self.token, self.ttl_s = uri, token, lease_s
        self._beat: Any = None
        self._seen = time.monotonic()
        self.lost: str | None = None

    def problem(self) -> str | None:
        """Why this worker must stop writing, or None while its driver holds the lease."""
        if self.lost:
            return self.lost
        try:
            current, _ = _read(self.uri)
        except Exception:  # noqa: BLE001 - storage hiccup: the heartbeat's age decides
            current = {"token": self.token, "beat": self._beat}
        if current is None:
            self.lost = f"{self.uri} is gone (its driver ended)"
        elif current.get("token") != self.token:
            self.lost = f"{self.uri} is now held by {describe(current)}"
        elif current.get("beat") != self._beat:
            self._beat, self._seen = current.get("beat"), time.monotonic()
        elif time.monotonic() - self._seen > 2 * self.ttl_s / 3:
            self.lost = (f"the driver stopped renewing {self.uri} {time.monotonic() - self._seen:.0f} s ago "
                         f"(it died)")
        return self.lost

    def start(self, on_lost: Callable[[str], None]) -> None:
        def watch() -> None:
            while True:
                time.sleep(self.ttl_s / 6)
                reason = self.problem()
                if reason:
                    on_lost(reason)
                    return

        threading.Thread(target=watch, name="dcgan-lease-watch", daemon=True).start()
