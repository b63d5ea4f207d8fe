"""Shared fixtures: a real S3 server (moto) on 127.0.0.1 and a local 2-CPU Ray cluster.

The S3 settings are exported before Ray starts so that every Ray worker reaches the same endpoint through the
standard AWS variables, exactly as on a cluster.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on loopback; yields its endpoint URL and exports the standard AWS settings."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1"
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; yields its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """A local Ray with 2 CPUs, started once per session after the S3 settings are exported."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():  # started by an earlier test's command (a build that failed after connecting), whose
        ray.shutdown()         # workers never saw the S3 settings: start again with them
    # The dashboard carries the State API that Ray Train polls; without it every fit logs warnings.
    ray.init(address="local", num_cpus=2, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
