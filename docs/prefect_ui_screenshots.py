"""How README's pictures of the Prefect UI are made: a real Prefect server (its UI on), the demo pipeline run against
it, and headless Chromium photographing the artifacts of the build and of the training run.

    .venv/bin/python docs/prefect_ui_screenshots.py [--steps 300] [--out docs]

Writes `prefect-run-artifacts.png` (the run's Artifacts tab) and one picture per keyed artifact (dataset,
training, evaluation, sample grid) into --out. Nothing leaves the machine: the
server listens on 127.0.0.1 with its own PREFECT_HOME in a temporary folder, deleted afterwards with the demo's data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("prefect server exited before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"prefect server not healthy after {timeout} s")


def screenshot(page: str, path: Path, height: int = 1100) -> None:
    """Chromium renders the single-page app; the virtual time budget lets its API calls finish first."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("needs Chromium (apt install chromium) for the screenshots")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size=1400,{height}",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--no-first-run", "--virtual-time-budget=20000", f"--screenshot={path}", page],
                       check=True, capture_output=True, timeout=180)
    if not path.is_file():
        raise SystemExit(f"Chromium wrote no {path}")
    print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the demo run (default 300)")
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder for the PNG files (default docs/)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dcgan-ui-") as tmp:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=f"{tmp}/prefect", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_UI_ENABLED="true", PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
        with open(f"{tmp}/server.log", "wb") as log:
            server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                       str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            url = env["PREFECT_API_URL"]
            wait_healthy(url, server)
            subprocess.run([sys.executable, "-m", "pipelines.demo", "--root", f"{tmp}/runs", "--steps",
                            str(args.steps)], cwd=REPO, env=env, check=True)
            base = f"http://127.0.0.1:{port}"
            pipeline = api(url, "/flow_runs/filter", {"limit": 1})[0]
            screenshot(f"{base}/runs/flow-run/{pipeline['id']}?tab=Artifacts", out / "prefect-run-artifacts.png")
            for artifact in api(url, "/artifacts/filter", {"limit": 50}):
                kind = (artifact.get("key") or "").split("-")[0]
                if kind:
                    screenshot(f"{base}/artifacts/artifact/{artifact['id']}", out / f"prefect-{kind}-artifact.png")
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
