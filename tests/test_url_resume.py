"""Resuming an interrupted URL-list build (issue 23, item 2), against a real HTTP server on 127.0.0.1.

`dcgan build-faces` on a URL list is interrupted (Ctrl-C) once some chunks are done; the same command then fetches
only the URLs of the chunks that were not (the server counts requests), and the dataset's content hash equals an
uninterrupted build's. Politeness shows up end to end: a robots.txt-disallowed URL and an X-Robots-Tag opt-out are
reject rows with their reasons, never requested / never read.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from realdata import grace_hopper_path, skimage_path

from preprocessing import shards
from preprocessing.build import build_dataset
from preprocessing.config import BuildConfig
from local_http import LocalHTTPServer

REPO = Path(__file__).resolve().parents[1]
PHOTOS = [grace_hopper_path().read_bytes(), skimage_path("astronaut.png").read_bytes(),
          skimage_path("coffee.png").read_bytes()]
N, SHARD_ROWS, SLOW_FROM = 24, 4, 8  # 6 chunks; the URLs of chunks 2-5 answer after SLOW_S each
SLOW_S = 1.0


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    counts: Counter = Counter()
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_GET(self):
        with self.lock:
            self.counts[self.path] += 1
        if self.path == "/robots.txt":
            data, headers = b"User-agent: dcgan-cluster\nDisallow: /p03.jpg\n", {}
        elif self.path.startswith("/p") and self.path.endswith(".jpg"):
            i = int(self.path[2:4])
            if i >= SLOW_FROM:
                time.sleep(SLOW_S)
            data = PHOTOS[i % 3]
            headers = {"X-Robots-Tag": "noimageai"} if i == 5 else {}
        else:
            self.send_error(404)
            return
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def photo_site(tmp_path):
    _Handler.counts = Counter()
    server = LocalHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{base}/p{i:02d}.jpg\n" for i in range(N)))
    yield listing, _Handler.counts
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_an_interrupted_url_list_build_resumes_fetching_only_what_is_missing(photo_site, tmp_path, ray_cluster):
    listing, counts = photo_site
    out = tmp_path / "resumed"
    argv = [sys.executable, "-m", "dcgan.cli", "build-faces", str(listing), "--out", str(out), "--resolution", "32",
            "--shard-rows", str(SHARD_ROWS), "--no-dedup", "--download-concurrency", "2",
            "--set", "build.allow_private_hosts=[127.0.0.1]"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob("_chunks/part-*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    done = sorted(int(p.stem.split("-")[1]) for p in out.glob("_chunks/part-*.json"))
    assert done and len(done) < N // SHARD_ROWS and not (out / "manifest.json").exists(), done
    before = Counter(counts)

    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = Counter({p: n - before[p] for p, n in counts.items() if n > before[p]})
    done_paths = {f"/p{i:02d}.jpg" for c in done for i in range(c * SHARD_ROWS, (c + 1) * SHARD_ROWS)}
    missing = {f"/p{i:02d}.jpg" for i in range(N) if i != 3} - done_paths  # p03: robots.txt, never requested
    assert not done_paths & set(rerun), rerun  # finished chunks were not downloaded again
    assert missing <= set(rerun)  # what was missing was
    assert counts["/p03.jpg"] == 0

    reference = build_dataset(BuildConfig(kind="faces", input=str(listing), resolution=32, shard_rows=SHARD_ROWS,
                                          allow_private_hosts=["127.0.0.1"]), str(tmp_path / "whole"),
                              progress=False)
    resumed = shards.read_manifest(str(out))
    assert resumed["content_hash"] == reference["content_hash"]
    assert resumed["counts"]["rows"] == reference["counts"]["rows"] == 15  # 16 photos with a face, less p03
    assert resumed["rejects"]["by_reason"] == {"no_face": 7, "robots": 1, "opt_out": 1}  # p05 (coffee) opted out

    # Per-shard stats (item 3): next to the shards, one per chunk, summed in the manifest; resumed chunks included
    for m, where in ((reference, tmp_path / "whole"), (resumed, out)):
        stats = [json.loads((where / p).read_text()) for p in m["build_stats"]["shard_stats"]]
        assert [s["index"] for s in stats] == list(range(N // SHARD_ROWS))
        assert sum(s["inputs"] for s in stats) == m["build_stats"]["inputs"] == N
        assert sum(s["rows"] for s in stats) == m["build_stats"]["rows"] == 15
        by_reason = sum((Counter(s["rejects_by_reason"]) for s in stats), Counter())
        assert by_reason == m["build_stats"]["rejects_by_reason"] == m["rejects"]["by_reason"]
        # every body read, once: p03 was never requested and p05's body was never read (its headers opted out)
        assert m["build_stats"]["bytes"] == sum(s["bytes"] for s in stats) == sum(
            len(PHOTOS[i % 3]) for i in range(N) if i not in (3, 5))
        assert all(s["seconds"] > 0 for s in stats)
