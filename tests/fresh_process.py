"""A snippet of Python run in a fresh process on its own local Ray (RAY_ADDRESS unset), for what only a fresh process
shows: which modules a stage imports, whether it starts Ray. The snippet prints one line of JSON last; that is the
result."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator


def run_fresh(code: str, timeout: int = 300, **env_vars: str) -> Any:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env_vars}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def own_ray_temp_dir() -> Iterator[Path]:
    """A folder for a fresh process's RAY_TMPDIR, short (Ray's sockets live under it) and removed after: a Ray that
    process started shows as `ray_sessions(folder)`."""
    folder = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ray_sessions(folder: Path) -> list[Path]:
    return list(folder.glob("ray/session_*"))
