"""Reading an object from S3: `storage.read_bytes` (one GET, read whole) against boto3's transfer manager
(`download_fileobj`, what read_bytes used before), in one run, against the same server.

Why: every shard a dedup phase or a training epoch reads from object storage goes through `storage.read_bytes`
(a dedup reads each shard up to three times; at 300k images on the 3-node cluster that was 10 GB). The client's CPU
per object is what the workers pay; the server's is not ours, so moto's S3 server runs in a process of its own and
only this process's CPU time (user + system) is counted.

Rows: an object the size of a 64 px shard of 2,048 images (~23 MB), and a small one (a manifest, 64 KB). Each read
is checked for its bytes. The ratio is the transfer manager's per read / ours (above 1: ours costs less).

Run: `.venv/bin/python benchmarks/s3_read.py` (about 30 seconds; `--reps` reads a row and way, `--rounds` rounds).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SERVER = ("from moto.server import ThreadedMotoServer; import time; "
          "ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start(); time.sleep(3600)")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from conftest import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER.format(port=port)], stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    try:
        _measure(args)
    finally:
        server.kill()
        server.wait()


def _measure(args: argparse.Namespace) -> None:
    from preprocessing import storage

    for tries in range(100):  # the server starting
        try:
            storage.s3_client().create_bucket(Bucket="s3-read")
            break
        except Exception:  # noqa: BLE001 - botocore's connection errors while the server starts
            if tries == 99:
                raise
            time.sleep(0.1)
    objects = {"shard, 23 MB": os.urandom(23 * 2**20), "manifest, 64 KB": os.urandom(64 * 2**10)}
    for name, data in objects.items():
        storage.write_bytes(f"s3://s3-read/{len(data)}", data)

    def transfer_manager(uri: str) -> bytes:  # read_bytes as it was
        buf = io.BytesIO()
        bucket, key = storage.split_s3(uri)
        storage.s3_client().download_fileobj(bucket, key, buf, Config=storage._transfer_config())
        return buf.getvalue()

    ways = {"transfer manager (before)": transfer_manager, "read_bytes (one GET)": storage.read_bytes}
    per: dict[tuple[str, str], dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for name, data in objects.items():
            uri = f"s3://s3-read/{len(data)}"
            for way, read in ways.items():
                assert read(uri) == data  # warm: the connection open, the code imported
                c, w = cpu_s(), time.perf_counter()
                for _ in range(args.reps):
                    assert read(uri) == data
                got = per.setdefault((name, way), {"cpu_ms": [], "wall_ms": []})
                got["cpu_ms"].append((cpu_s() - c) / args.reps * 1e3)
                got["wall_ms"].append((time.perf_counter() - w) / args.reps * 1e3)
    print(f"\nS3 reads from moto (its own process), {os.cpu_count()} cores; per read, median of {args.rounds} "
          f"rounds of {args.reps}\n")
    print("| object | way | client CPU ms | wall ms | **CPU: before / ours** | wall: before / ours |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in objects:
        before = per[(name, "transfer manager (before)")]
        for way in ways:
            f = per[(name, way)]
            cpu, wall = statistics.median(f["cpu_ms"]), statistics.median(f["wall_ms"])
            ratio = (f"**{statistics.median(before['cpu_ms']) / cpu:.2f}x**",
                     f"{statistics.median(before['wall_ms']) / wall:.2f}x") if "read_bytes" in way else ("", "")
            print(f"| {name} | {way} | {cpu:.1f} | {wall:.1f} | {ratio[0]} | {ratio[1]} |")


if __name__ == "__main__":
    main()
