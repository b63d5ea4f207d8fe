"""A run has exactly one writer, its training driver (layer: dcgan): `preprocessing.lease` in a run's words.

`<run>/lease.json` (run_layout.lease) is taken by the training driver before any worker starts (`held`), renewed
while it trains and removed at the end; a second driver is refused with one line naming the holder. The workers
watch it (`Watch`) and stop before it expires once their driver is gone: until then the lease is still theirs, so
nothing else writes the run meanwhile.
"""

from __future__ import annotations

import time
from typing import Callable, ContextManager

from dcgan import run_layout
from preprocessing import lease as _lease
from preprocessing.lease import Lease, LeaseError, Watch, Writer, describe, lease_s  # noqa: F401 (this module's API)

RUN = Writer("run", "trained by another driver", "one run has one writer; wait for it to finish or train into "
             "another --run")


def lease_uri(run_uri: str) -> str:
    return run_layout.lease(run_uri)


def acquire(run_uri: str, ttl_s: float | None = None, *, wait: Callable[[float], None] = time.sleep) -> Lease:
    """Take the run's lease, or raise LeaseError naming its live holder (`preprocessing.lease.acquire`)."""
    return _lease.acquire(run_uri, lease_uri(run_uri), RUN, ttl_s, wait=wait)


def held(run_uri: str) -> ContextManager[Lease]:
    """Hold the run's lease for the block (`preprocessing.lease.held`)."""
    return _lease.held(run_uri, lease_uri(run_uri), RUN)
