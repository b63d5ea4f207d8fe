"""A real Prefect server for tests that drive the `prefect` CLI as an operator does: `prefect server start` on a free
loopback port with its own PREFECT_HOME (SQLite), and `prefect(...)` to run CLI commands in the repository."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGINT (a Prefect worker ignores SIGTERM for a long while), then SIGKILL to its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout}s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; yields the CLI's environment.
    One server a module (a start costs 10-20 s here): its tests share it, each reading back only its own runs."""
    tmp_path = tmp_path_factory.mktemp("prefect-server")
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
               PREFECT_CLI_PROMPT="false", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_healthy(api, server, log)
        yield {**env, "PREFECT_API_URL": api}
    finally:
        stop(server)


def prefect(env: dict, *args: str, timeout: float = 180) -> str:
    """Run a prefect CLI command in the repository, as an operator would; fails the test with its output."""
    done = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env={**env, "PWD": str(REPO)},
                          capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{output[-4000:]}"
    return output
