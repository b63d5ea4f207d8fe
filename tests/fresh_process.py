"""A snippet of Python run in a fresh process on its own local Ray (RAY_ADDRESS unset), for what only a fresh process
shows: which modules a stage imports, whether it starts Ray. The snippet prints one line of JSON last; that is the
result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_fresh(code: str, timeout: int = 300, **env_vars: str) -> Any:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env_vars}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
