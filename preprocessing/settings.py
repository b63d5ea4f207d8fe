"""The project's environment settings (DCGAN_*), each read and checked here (layer: preprocessing).

Why: they are read deep inside a stage (a progress bar, an S3 client, a job's follower), so a value that is not a
number was a traceback halfway through a command, after it had started Ray and claimed its output, and a negative
one a misleading line from the library it reached. `check()` reads every one when a command or a Prefect stage
starts (`dcgan.cli.main`, `dcgan.stages.run`): a bad value is one line naming it, exit 2, before anything is done.
"""

from __future__ import annotations

import logging
import math
import os

from preprocessing.errors import InputError

# name -> (default, what a value must be, what it sets); seconds above 0, or 0 or more where 0 means "at once"
SECONDS = {
    "DCGAN_S3_TIMEOUT_S": (60.0, "above 0", "how long one S3 request may go unanswered before it is retried"),
    "DCGAN_LEASE_S": (60.0, "above 0", "a writer's lease on a run or dataset lives this long without renewal; "
                                       "renewed 3 times as often"),
    "DCGAN_WORKERS_WAIT_S": (900.0, "0 or more", "how long workers or GPUs that fit the cluster but are not placed "
                                                 "(an autoscaler adding a node) are waited for, then one line"),
    "DCGAN_CLUSTER_LOST_AFTER_S": (60.0, "above 0", "a Jobs API that stops answering this long while a job runs is "
                                                    "a lost cluster"),
    "DCGAN_PROGRESS_INTERVAL": (10.0, "0 or more", "seconds between progress lines when stderr is not a terminal"),
}
RETRY_DELAYS_ENV = "DCGAN_RETRY_DELAYS_S"
# name -> (default pauses, what they are for); set but empty: no retries
SECONDS_LISTS = {
    RETRY_DELAYS_ENV: ((10.0, 60.0, 300.0), "pauses before each retry of a transient storage or cluster fault"),
    "DCGAN_JOB_SUBMIT_RETRY_S": ((2.0, 5.0, 10.0, 20.0, 30.0), "pauses before each retry of a Jobs API that asks to "
                                                               "try again later"),
}
LOG_LEVEL = "DCGAN_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # and what else Python's logging takes: WARN, 20, ...


def reference() -> list[tuple[str, str, str]]:
    """(name, default, meaning) of every setting, for the README's reference (dcgan.config_reference)."""
    rows = [(n, f"{d:g}", f"{m} (seconds, {r})") for n, (d, r, m) in SECONDS.items()]
    rows += [(n, ",".join(f"{v:g}" for v in d), f"{m} (seconds separated by commas; empty: none)")
             for n, (d, m) in SECONDS_LISTS.items()]
    return rows + [(LOG_LEVEL, "WARNING", "INFO or DEBUG puts Ray's own logs on the console too (as `--verbose`)")]


def seconds(name: str) -> float:
    """The setting `name` (one of SECONDS) in seconds; InputError naming it if it is not such a number."""
    default, rule, _ = SECONDS[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (rule == "above 0" and value == 0):
        raise InputError(f"{name}={raw!r} is not a finite number of seconds {rule} (default {default:g})")
    return value


def seconds_list(name: str) -> tuple[float, ...]:
    """The setting `name` (one of SECONDS_LISTS): pauses in seconds separated by commas; set but empty, none."""
    raw = os.environ.get(name)
    if raw is None:
        return SECONDS_LISTS[name][0]
    try:
        values = tuple(float(p) for p in raw.replace(" ", "").split(",") if p)
    except ValueError:
        values = (math.nan,)
    if not all(math.isfinite(v) and v >= 0 for v in values):
        example = ",".join(f"{v:g}" for v in SECONDS_LISTS[name][0])
        raise InputError(f"{name}={raw!r}: give seconds separated by commas, e.g. {example}")
    return values


def retry_delays() -> list[float]:
    """Seconds to wait before each retry of a transient fault (DCGAN_RETRY_DELAYS_S; empty: no retries). Here, not
    in preprocessing.errors, which this module imports."""
    return list(seconds_list(RETRY_DELAYS_ENV))


def log_level() -> int:
    """DCGAN_LOG_LEVEL as a logging level (default WARNING: only the project's lines on the console; INFO or DEBUG
    adds Ray's): a level name or number, as Python's logging takes them."""
    raw = os.environ.get(LOG_LEVEL, "").strip()
    if not raw:
        return logging.WARNING
    level = int(raw) if raw.isdigit() else logging.getLevelName(raw.upper())
    if not isinstance(level, int):  # getLevelName answers "Level X" for a name it does not know
        raise InputError(f"{LOG_LEVEL}={raw!r} is not a log level: one of {', '.join(LOG_LEVELS)}, or a number")
    return level


def check() -> None:
    """Read every setting once: InputError (one line, exit 2) for the first bad one."""
    for name in SECONDS:
        seconds(name)
    for name in SECONDS_LISTS:
        seconds_list(name)
    log_level()
