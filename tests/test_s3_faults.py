"""The same build, dedup and training, once against the S3 server and once through a proxy that resets connections,
answers 500/503 and stalls on 10% of requests (tests/s3_faults.py): the flaky run must produce exactly the dataset
content hashes and the checkpoint of the clean run. The flaky run is a separate process (its own local Ray), so
that every Ray worker reaches S3 through the proxy, as every node of a cluster would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import pytest
import torch
from realdata import mnist_rgb32
from s3_faults import FAULTS, FaultProxy

from dcgan import checkpoints
from dcgan.cli import main
from preprocessing import shards, storage

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny-test.yaml")


def commands(prefix: str, raw: str) -> list[list[str]]:
    return [
        ["build-lsun", raw, "--out", f"{prefix}/data", "--resolution", "32", "--shard-rows", "32", "--no-dedup"],
        # one view: the 135 verified views multiply the hashing's CPU (~1 min a run here), not its S3 traffic
        ["dedup", f"{prefix}/data", "--out", f"{prefix}/dedup", "--epochs", "1", "--views", "1"],
        ["train", "--config", TINY, "--data", f"{prefix}/dedup", "--run", f"{prefix}/run", "--steps", "4",
         "--workers", "1"],
    ]


def weights(run: str) -> dict[str, torch.Tensor]:
    state = checkpoints.load_state(run)
    return {f"{net}.{k}": v for net in ("generator", "discriminator") for k, v in state[net].items()}


@pytest.mark.slow
def test_a_flaky_network_changes_nothing_but_the_time(s3_server, s3_bucket, ray_cluster):
    raw = f"{s3_bucket}/raw/digits"
    for i, img in enumerate(mnist_rgb32(128)):
        storage.write_bytes(f"{raw}/{i:04d}.png", cv2.imencode(".png", img)[1].tobytes())

    for argv in commands(f"{s3_bucket}/clean", raw):
        assert main(argv) == 0, argv

    script = textwrap.dedent(f"""
        import sys
        from dcgan.cli import main
        for argv in {json.dumps(commands(f"{s3_bucket}/flaky", raw))}:
            status = main(argv)
            if status:
                sys.exit(status)
    """)
    # on top of the 10%, chunk 1's sidecar PUT fails 8 times in a row: more than boto3's 6 attempts, so the chunk
    # task fails and Ray Data runs that chunk again (and only that one)
    stubborn = "flaky/data/_chunks/part-00001.json"
    with FaultProxy(s3_server, seed=7, rate=0.10, stall_s=4.0, stubborn={stubborn: 8}) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "DCGAN_S3_TIMEOUT_S": "2", "PYTHONPATH": str(REPO),
               "RAY_AUTH_MODE": "disabled", "DCGAN_RETRY_DELAYS_S": "1,2,5"}  # the README's 10,60,300, shortened
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        print(f"fault proxy: {proxy.summary()}")
    assert done.returncode == 0, done.stderr[-4000:]
    assert set(FAULTS) <= set(proxy.injected) and sum(proxy.injected.values()) >= 20, proxy.summary()
    assert proxy.puts(stubborn) >= 9  # 8 failures, then the retried chunk's success
    assert proxy.puts("flaky/data/shards/part-00001.parquet") >= 2  # the chunk itself was redone ...
    assert all(proxy.puts(f"flaky/data/shards/part-{i:05d}.parquet") <= 2 for i in (0, 2, 3))  # ... not the others

    for part in ("data", "dedup"):
        clean = shards.read_manifest(f"{s3_bucket}/clean/{part}")
        flaky = shards.read_manifest(f"{s3_bucket}/flaky/{part}")
        assert flaky["content_hash"] == clean["content_hash"], part
        assert flaky["counts"] == clean["counts"]
    clean_w, flaky_w = weights(f"{s3_bucket}/clean/run"), weights(f"{s3_bucket}/flaky/run")
    assert clean_w.keys() == flaky_w.keys()
    assert all(torch.equal(clean_w[k], flaky_w[k]) for k in clean_w)
    assert checkpoints.complete_steps(f"{s3_bucket}/flaky/run") == checkpoints.complete_steps(f"{s3_bucket}/clean/run")
