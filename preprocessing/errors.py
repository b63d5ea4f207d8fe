"""The project's known faults (layer: preprocessing, the bottom; every package raises these).

A `UserError` is a fault the user can fix: bad input, a bad configuration, a location that cannot be used, a missing
or corrupt file. Its message names the file, field or URI and says what to do, on one line. Front ends (the `dcgan`
CLI, `make demo`, the Prefect tasks) print it as one line and exit 2 (or fail the run without retrying); anything else
that escapes is a bug and keeps its traceback.

`TransientError` marks the one kind of known fault that a retry can cure (an endpoint that did not answer).
"""

from __future__ import annotations


class UserError(Exception):
    """A known fault: one line for the user, exit status 2, never retried."""


class TransientError(UserError):
    """A known fault that may pass (an unreachable endpoint or cluster): reported in one line, but retried."""


def one_line(err: BaseException) -> str:
    """The message of an error on one line (multi-line details joined with '; ')."""
    parts = [p.strip() for p in str(err).splitlines() if p.strip()]
    return "; ".join(parts) if parts else type(err).__name__


class InputError(UserError, ValueError):
    """An input (a file, an argument, a parameter) that cannot be used as given; the message names it."""


class MissingError(UserError, FileNotFoundError):
    """A file, folder or object that should exist and does not; the message names it."""
