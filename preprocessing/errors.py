"""The project's fault classes, in one place (layer: preprocessing, the bottom; every package raises these).

Three classes, one rule each:
- transient (`TransientError`: storage unreachable or throttled past boto3's own retries, a cluster that does not
  answer, a lost node): retried after `settings.retry_delays()` (the README's 10 s, 60 s, 300 s), then reported in
  one line;
- bad input (`UserError`: a damaged dataset, a bad config, missing credentials, a bad path): one line on stderr and
  exit 2, never retried (not by the CLI, not by Ray, not by Prefect): it fails the same way every time;
- anything else is a bug and keeps its traceback.

`classify` is the one classifier: it finds a known fault inside Ray's wrappers (a task's or a training worker's
error reaches the driver wrapped) and says which class a failure is, for every front end: the CLI
(`dcgan.cli.run_command`, also inside a Ray Job, where it prints the class for the job's follower, `dcgan.jobs`),
the Prefect tasks' retry condition (`pipelines.tasks`) and `retrying`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, TypeVar

log = logging.getLogger(__name__)


T = TypeVar("T")


class UserError(Exception):
    """A known fault: one line for the user, exit status 2, never retried."""


class TransientError(UserError):
    """A known fault that may pass (an unreachable endpoint or cluster): retried with backoff, then one line."""


class InputError(UserError, ValueError):
    """An input (a file, an argument, a parameter) that cannot be used as given; the message names it."""


class MissingError(UserError, FileNotFoundError):
    """A file, folder or object that should exist and does not; the message names it."""


NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})  # a full disk or an exhausted quota: the user must act
# a path the user gave that the system refuses as it is: too long, read-only, not permitted, a symlink loop
BAD_PATH = frozenset({errno.ENAMETOOLONG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ELOOP})


def no_space_line(where: str | None, err: OSError) -> str:
    """The one line for a write that found no space (a full disk or quota): it fails the same way until the user frees
    space or writes elsewhere, so bad input, not transient; what was written before stays and resumes."""
    at = f"{where}: " if where else ""
    return (f"{at}{err.strerror or 'No space left on device'}: free space there or write elsewhere, then run the "
            "same command again")


class NoSpaceError(UserError, OSError):
    """A write that found no space (`no_space_line`); `where` is None when the failing write did not say (an
    upload by a library): the caller that knows where it was writing may name it (`NoSpaceError.at`)."""

    def __init__(self, line: str, where: str | None = None):
        super().__init__(line)
        self.where = where

    def at(self, where: str) -> NoSpaceError:
        """This fault naming `where`, unless it names a place already."""
        return self if self.where else NoSpaceError(f"{where}: {self}", where)


@contextlib.contextmanager
def naming_no_space(where: str, cls: type[NoSpaceError] = NoSpaceError) -> Iterator[None]:
    """Writes to `where`: one that finds no space is `cls` naming `where` (an OSError from a write names no file)."""
    try:
        yield
    except OSError as err:
        if err.errno in NO_SPACE and not isinstance(err, UserError):
            raise cls(no_space_line(where, err), where) from None
        raise


def one_line(err: BaseException) -> str:
    """The message of an error on one line (multi-line details joined with '; ')."""
    parts = [p.strip() for p in str(err).splitlines() if p.strip()]
    return "; ".join(parts) if parts else type(err).__name__


def known_fault(err: BaseException) -> UserError | None:
    """The known fault inside `err` (itself, or what Ray's task/actor/Train wrappers carry), as a plain instance
    whose message is its first line (Ray appends tracebacks and advice); None for a bug."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError: its own type also subclasses the cause's
        if isinstance(e, OSError) and e.errno in NO_SPACE and not isinstance(e, UserError):
            return NoSpaceError(no_space_line(e.filename, e), e.filename)  # any write: a checkpoint, a log, a shard
        if isinstance(e, OSError) and e.errno in BAD_PATH and e.filename and not isinstance(e, UserError):
            return InputError(f"{e.filename}: {e.strerror}")  # the same every time: a path to change, not retry
        if isinstance(e, UserError) and not isinstance(cause, BaseException):
            if "\n" not in str(e) and not type(e).__module__.startswith("ray"):
                return e
            if type(e).__module__.startswith("ray"):  # a Ray-made subclass: keep the project's own class
                base = next((c for c in type(e).__mro__ if issubclass(c, UserError)
                             and not c.__module__.startswith("ray")), UserError)
            else:
                base = type(e)
            try:
                return base(str(e).splitlines()[0])
            except Exception:  # noqa: BLE001 - a subclass with another signature keeps its own message
                return e
        todo += [cause, getattr(e, "_base_exc", None), getattr(e, "controller_failure", None), e.__cause__,
                 *getattr(e, "worker_failures", {}).values()]
    return None


FAULT_KEY = "dcgan_fault"  # the line a command in a Ray Job prints for its follower: {"dcgan_fault": {...}}


@dataclass(frozen=True)
class Fault:
    """What a failure is, decided once (`classify`) for every front end."""

    kind: Literal["transient", "bad_input", "bug"]
    error: BaseException  # the known fault, unwrapped from Ray's wrappers; a bug as it was raised

    @property
    def line(self) -> str:
        return one_line(self.error)

    @property
    def worth_retrying(self) -> bool:
        """Another attempt may end otherwise: not bad input, and not a ValueError or TypeError (a bug, pydantic's
        validation errors among them, that fails the same way every time)."""
        return self.kind == "transient" or (self.kind == "bug" and not isinstance(self.error, (ValueError, TypeError)))

    def job_line(self) -> str:
        """This fault as one JSON line, for a Ray Job's log (its follower rebuilds the class: `from_job_log`)."""
        return json.dumps({FAULT_KEY: {"kind": self.kind, "line": self.line}}, separators=(",", ":"))


def classify(err: BaseException) -> Fault:
    known = known_fault(err)
    if known is None:
        return Fault("bug", err)
    return Fault("transient" if isinstance(known, TransientError) else "bad_input", known)


def fault_in_job_log(logs: str) -> tuple[str, str] | None:
    """(kind, line) of the last fault a command printed in a Ray Job's log (`Fault.job_line`), if any."""
    for raw in reversed(logs.splitlines()):
        raw = raw.strip()
        if raw.startswith('{"' + FAULT_KEY + '"'):
            try:
                got = json.loads(raw)[FAULT_KEY]
                return str(got["kind"]), str(got["line"])
            except (ValueError, KeyError, TypeError):
                continue
    return None


def retrying(fn: Callable[[], T], what: str, delays: list[float], sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, run again after each of `delays` (a front end's `settings.retry_delays()`) while it fails on a
    transient fault.

    A known fault comes out as its one line (unwrapped from Ray's wrappers): a transient one after the last retry,
    bad input at once; anything else is re-raised as it is.
    """
    delays = list(delays)
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified: a bug is re-raised untouched
            fault = classify(err)
            if fault.kind == "bug":
                raise
            if fault.kind != "transient" or attempt == len(delays):
                if fault.error is err:
                    raise
                raise fault.error from None
            log.warning("%s: %s; retrying in %g s (retry %d of %d)", what, fault.line, delays[attempt],
                        attempt + 1, len(delays))
            sleep(delays[attempt])
    raise AssertionError("unreachable")
