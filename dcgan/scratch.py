"""A training worker's local scratch folders (a remote run's metrics, a checkpoint before Ray uploads it), named by
the run so that the run's next worker removes what a killed one left.

A worker Ray ends (a lost peer, a driver gone, `ray.kill`) runs no cleanup, so a temporary folder per worker and per
checkpoint outlived it: ~6 a test-suite run in /tmp here, each a TensorBoard log or a whole checkpoint. Each name
carries a digest of the run URI and the user: `clear` removes only this run's folders, made by `make`. Rank 0 clears
its machine when it starts and before it stops itself; the driver clears its own machine when the fit ends, however
it ends (a local run, and a Ctrl-C, whose workers Ray kills).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "dcgan-scratch-"


def _stem(run_uri: str) -> str:
    digest = hashlib.sha256(run_uri.rstrip("/").encode()).hexdigest()[:16]
    return f"{PREFIX}{os.getuid()}-{digest}-"


def make(run_uri: str, kind: str) -> Path:
    """A new empty folder (0700) for this run's `kind` ("metrics", "ckpt") in the system's temporary folder."""
    return Path(tempfile.mkdtemp(prefix=f"{_stem(run_uri)}{kind}-"))


def clear(run_uri: str) -> int:
    """Remove this run's scratch folders left on this machine (by a worker that was killed); returns how many. Call
    it where no other worker of the run is alive on this machine: rank 0 at start (only rank 0 writes them)."""
    removed = 0
    for p in Path(tempfile.gettempdir()).glob(f"{_stem(run_uri)}*"):
        if p.is_dir() and not p.is_symlink() and p.stat().st_uid == os.getuid():
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed
