"""URL-list speed per core: one build task (polite fetching + decode + face detection + crop + shard write) against an
img2dataset-style baseline (a thread pool downloading, decoding and resizing, no detection, no politeness), one run.

The server: a separate process (its CPU is not counted) with `--hosts` HTTP servers on 127.0.0.1 (each port is a host
to the per-host limits and robots.txt), serving real photos as JPEG (scikit-image's photos, Grace Hopper, and face
composites from tests/realdata) after an injected latency of 50-300 ms per request (deterministic per URL); host 0 is
slow (3 s, past the 1.5 s timeout: every URL a timeout) and host 1 fails (503 on even, 500 on odd photos).
The URL list is sorted, as a URL list is (a host's URLs side by side).

Measured: CPU seconds of this process (download threads, decoding, detection, writing) and wall seconds; the rate is
decoded images per CPU-second (one core's worth), and the ratio ours / baseline is printed. Both use 16 download
threads and 1.5 s timeouts with one retry. Ours = `preprocessing.build.run_chunk` on one chunk, exactly a Ray task's
work (robots.txt, X-Robots-Tag, per-host limits 4 in flight and 10/s, Retry-After), with `build.detector` haar and
yunet (the model in ../shared/data/yunet/), yunet with `build.yunet_face_px: 32`, and, where this machine has a CUDA
GPU, yunet in torch on it (`build.yunet_device: cuda`; the CPU seconds are then what a photo costs a core), at
`build.min_face` 64
(`--min-face`: a larger one lets the detection decode JPEGs at 1/2-1/8 scale, preprocessing.faces.find_faces).
A third row runs our task as a center-crop build (the same fetching, decode, crop and write, no detection): the
baseline's work through our polite fetcher, to tell fetching cost from detection cost; the last row is that task with
the per-host limits kept over the whole build (`preprocessing.host_gate` actors on a local Ray, as a URL-list build
runs them; the actors' CPU seconds are added to ours).
Two rates per method. Per CPU-second: what a photo costs in CPU, whatever the network does. Per core, wall (`--pin K`,
img2dataset's sense: its ~1,350 img/s on 16 cores is ~84 img/s per core): the measured methods run on K cores only
(the process's CPU affinity), the server on the others, and the rate is decoded photos per wall second / K; that
rate is latency-bound while the download threads wait more than the core works, and CPU-bound once they do not
(`--threads`).
Run: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/url_fetch.py --pin 1` (about two minutes; `--urls`, `--hosts`,
`--min-face`, `--threads`).
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

YUNET = ROOT.parent / "shared" / "data" / "yunet" / "face_detection_yunet_2026may.onnx"
TIMEOUT_S, SIZE = 1.5, 64
THREADS = 16  # download threads of both; `--threads`


def photos() -> list[bytes]:
    import cv2

    from realdata import encode, face_composites, grace_hopper_path, real_photos

    imgs = list(real_photos().values()) + [cv2.imread(str(grace_hopper_path()))[..., ::-1]]
    imgs += face_composites(8, (64, 300), seed=7)
    return [encode(p, ".jpg", quality=90) for p in imgs]


def serve(hosts: int) -> None:
    """The server process: prints its ports, serves until stdin closes."""
    data = photos()

    def handler(host: int):
        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                digest = hashlib.sha256(f"{host}{self.path}".encode()).digest()
                time.sleep(3.0 if host == 0 else 0.05 + 0.25 * digest[0] / 255)
                if self.path == "/robots.txt" or not self.path.endswith(".jpg"):
                    self.send_error(404)
                    return
                i = int(self.path[1:-4])
                if host == 1:
                    self.send_error(503 if i % 2 == 0 else 500)
                    return
                body = data[i % len(data)]
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        return H

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 1024  # socketserver's 5 drops SYNs when 64-256 threads connect at once (1 s retransmit)

    servers = []
    for h in range(hosts):
        s = Server(("127.0.0.1", 0), handler(h))
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
    print(" ".join(str(s.server_address[1]) for s in servers), flush=True)
    sys.stdin.read()


def baseline(urls: list[str]) -> int:
    """img2dataset-style: download (one retry), decode, resize the short side to SIZE and center-crop; no detection."""
    import cv2
    import numpy as np

    def one(url: str) -> bool:
        for _ in range(2):
            try:
                with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
                    data = r.read()
                break
            except Exception:  # noqa: BLE001 - a failed download is a failed sample, as in img2dataset
                data = None
        if data is None:
            return False
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            return False
        h, w = img.shape[:2]
        k = SIZE / min(h, w)
        img = cv2.resize(img, (max(SIZE, round(w * k)), max(SIZE, round(h * k))), interpolation=cv2.INTER_AREA)
        y, x = (img.shape[0] - SIZE) // 2, (img.shape[1] - SIZE) // 2
        return img[y:y + SIZE, x:x + SIZE].shape == (SIZE, SIZE, 3)

    with ThreadPoolExecutor(THREADS) as pool:
        return sum(pool.map(one, urls))


def ours(urls: list[str], detector: str, out: str, min_face: int = 64, gates: tuple[str, ...] = ()
         ) -> tuple[int, dict]:
    """One build task on the URLs; detector "none" = the center-crop build (our fetching, decode, crop, no faces);
    `gates`: per-host limits kept over the whole build by `preprocessing.host_gate` actors, as a build runs them."""
    from preprocessing.build import run_chunk
    from preprocessing.config import BuildConfig

    extra = {"detector": "yunet", "detector_model": str(YUNET)} if detector.startswith("yunet") else {}
    if detector == "yunet@32":
        extra["yunet_face_px"] = 32
    if detector == "yunet@cuda":  # YuNet in torch on this machine's GPU (build.yunet_device: cuda)
        extra["yunet_device"] = "cuda"
    cfg = BuildConfig(kind="center-crop" if detector == "none" else "faces", resolution=SIZE, min_face=min_face,
                      allow_private_hosts=["127.0.0.1"], download_timeout_s=TIMEOUT_S,
                      download_retries=1, download_concurrency=THREADS, max_retry_wait_s=2.0, **extra)
    result = run_chunk({"index": 0, "items": [[u, u] for u in urls]}, cfg, out, out, gates)
    decoded = result["inputs"] - sum(v for k, v in result["reject_counts"].items() if k != "no_face")
    return decoded, result


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gated(urls: list[str]):
    """The center-crop row with the build's per-host gates (a local Ray; the gates' CPU is counted with ours)."""
    import ray

    from preprocessing import host_gate

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        gates = host_gate.start(4, 10.0)
        before = host_gate.cpu_seconds(gates)
        with tempfile.TemporaryDirectory() as out:
            got, cpu, wall = measure(lambda: ours(urls, "none", out, gates=gates))
        cpu += host_gate.cpu_seconds(gates) - before
        host_gate.stop(gates)
        return got, cpu, wall
    finally:
        ray.shutdown()


def pin(server_pid: int, k: int) -> tuple[list[int], list[int]]:
    """This process (and what it starts: the gates' Ray) on the first k allowed cores, the server on the rest."""
    import os

    cpus = sorted(os.sched_getaffinity(0))
    if k >= len(cpus):
        raise SystemExit(f"--pin {k}: only {len(cpus)} cores here; leave at least one to the server")
    os.sched_setaffinity(server_pid, cpus[k:])
    os.sched_setaffinity(0, cpus[:k])
    return cpus[:k], cpus[k:]


def measure(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    got = fn()
    return got, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--urls", type=int, default=400)
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--min-face", type=int, default=64, help="build.min_face of the face rows (default 64)")
    ap.add_argument("--threads", type=int, default=THREADS, help="download threads of both (default 16)")
    ap.add_argument("--pin", type=int, metavar="K", help="run the measured methods on K cores (the server on the "
                    "others) and print wall images/s per core")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    THREADS = args.threads
    import cv2

    cv2.setNumThreads(1)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(args.hosts)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ports = [int(p) for p in server.stdout.readline().split()]
        cores = pin(server.pid, args.pin) if args.pin else None
        urls = sorted(f"http://127.0.0.1:{ports[i % len(ports)]}/{i}.jpg" for i in range(args.urls))
        print(f"{len(urls)} URLs on {len(ports)} hosts (host 0 slow: timeouts; host 1 failing: 500/503), latency "
              f"50-300 ms, {THREADS} threads, one process, min_face {args.min_face}"
              + (f", measured on {args.pin} pinned core(s) {cores[0]}, server on {cores[1]}" if cores else ""))
        rows = {"baseline (img2dataset-style)": measure(lambda: (baseline(urls), None))}
        for det in ("none", "haar", "yunet", "yunet@32", "yunet@cuda"):
            if det.startswith("yunet") and not YUNET.is_file():
                print(f"(no YuNet model at {YUNET}: its row is skipped)")
                continue
            if det == "yunet@cuda" and not cuda_available():
                print("(no CUDA GPU here: the row 'ours, faces, detector yunet@cuda' is unmeasured)")
                continue
            with tempfile.TemporaryDirectory() as out:
                name = "ours, center-crop, no faces" if det == "none" else f"ours, faces, detector {det}"
                rows[name] = measure(lambda: ours(urls, det, out, args.min_face))
        rows["ours, center-crop, build-wide limits"] = gated(urls)
        (base_ok, _), base_cpu, base_wall = rows["baseline (img2dataset-style)"]
        print(f"{'method':36s} {'decoded':>7s} {'CPU s':>6s} {'wall s':>6s} {'img/CPU-s':>9s} {'vs baseline':>11s} "
              f"{'img/s wall':>10s}" + (f" {'per core':>8s} {'vs baseline':>11s}" if cores else ""))
        for name, ((ok, result), cpu, wall) in rows.items():
            line = (f"{name:36s} {ok:7d} {cpu:6.2f} {wall:6.2f} {ok / cpu:9.1f} {ok / cpu / (base_ok / base_cpu):10.2f}x "
                    f"{ok / wall:10.1f}")
            if cores:
                line += f" {ok / wall / args.pin:8.1f} {ok / wall / (base_ok / base_wall):10.2f}x"
            print(line)
            if result:
                print(f"{'':30s} rejects: {dict(sorted(result['reject_counts'].items()))}, rows {result['rows']}")
    finally:
        server.stdin.close()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
