"""The training input stream (preprocessing.ingest): seeded shard order per epoch, reproducible, every row once per
epoch whatever the number of workers, every shard checked against the manifest as training reads it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from preprocessing import ingest, shards, storage
from preprocessing.shards import DatasetError
from tests.realdata import mnist_rgb32
from preprocessing import dataset_layout

REPO = Path(__file__).resolve().parents[1]


def make_dataset(uri: str, n_shards: int = 6, rows: int = 20) -> np.ndarray:
    """Real digits in shards of `rows`; key d00007 is row 7."""
    x = mnist_rgb32(n_shards * rows)
    entries = [shards.write_table(uri, dataset_layout.part(i), shards.make_table(
        [f"d{j:05d}" for j in range(i * rows, (i + 1) * rows)], x[i * rows:(i + 1) * rows])) for i in range(n_shards)]
    shards.write_manifest(uri, kind="test", resolution=32, shards=entries, inputs=len(x))
    return x


def stream_blocks(uri: str, *, seed: int, epochs: int = 2, splits: int = 1, start_row: int = 0) -> list[list]:
    """Each split's blocks (key and epoch columns), consumed concurrently as Ray Train's workers would."""
    manifest = shards.read_manifest(uri)
    ds = ingest.training_dataset(uri, manifest, seed=seed, start_row=start_row,
                                 rows=epochs * manifest["counts"]["rows"], columns=("key", ingest.EPOCH))
    ds.context.execution_options.preserve_order = True  # as ingest.data_config() asks of Ray Train
    out: list = [None] * splits

    def drain(i, it):
        try:
            out[i] = list(it.iter_batches(batch_size=None, batch_format="pyarrow"))
        except Exception as err:  # noqa: BLE001 - handed to the test's thread
            out[i] = err

    threads = [threading.Thread(target=drain, args=(i, it))
               for i, it in enumerate(ds.streaming_split(splits, equal=True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in out:
        if isinstance(result, Exception):
            raise result
    return out


def epoch_keys(blocks) -> dict[int, list[str]]:
    keys: dict[int, list[str]] = {}
    for b in blocks:
        for k, e in zip(b.column("key").to_pylist(), b.column(ingest.EPOCH).to_pylist()):
            keys.setdefault(e, []).append(k)
    return keys


def replace_with_same_size_shard(uri: str, x: np.ndarray, index: int, rows: int, scratch: str) -> None:
    """Overwrite shard `index` with another valid shard of the same byte size (one pixel differs): the size check
    cannot tell them apart, only the sha256 can."""
    target = shards.read_manifest(uri)["shards"][index]
    keys = [f"d{j:05d}" for j in range(index * rows, (index + 1) * rows)]
    for pixel in range(256):
        images = x[index * rows:(index + 1) * rows].copy()
        images[pixel % rows, 16, pixel // rows] ^= 1
        entry = shards.write_table(scratch, "variant.parquet", shards.make_table(keys, images))
        if entry["bytes"] == target["bytes"]:
            variant = storage.read_bytes(storage.join(scratch, "variant.parquet"))
            storage.write_bytes(storage.join(uri, target["path"]), variant)
            return
    raise AssertionError("no same-size variant found")


# ------------------------------------------------------------------------------------------ order, without Ray


def test_each_epoch_has_its_own_seeded_order_and_a_resume_continues_it():
    manifest = {"shards": [{"rows": 10}] * 8}
    first = ingest.stream_items(manifest, seed=3, start_row=0, rows=160)
    assert [e for e, _ in first] == [0] * 8 + [1] * 8
    e0, e1 = [i for e, i in first if e == 0], [i for e, i in first if e == 1]
    assert sorted(e0) == sorted(e1) == list(range(8)) and e0 != e1
    assert ingest.stream_items(manifest, seed=3, start_row=0, rows=160) == first
    assert ingest.stream_items(manifest, seed=4, start_row=0, rows=160) != first
    # Resuming at row 95 (epoch 1's row 15: its shard in slot 0 was read) continues epoch 1's order from slot 1.
    assert ingest.stream_items(manifest, seed=3, start_row=95, rows=40)[:2] == [(1, e1[1]), (1, e1[2])]


def test_batches_pass_every_row_once_and_shuffle_across_blocks():
    x = mnist_rgb32(300)
    ids = np.arange(len(x))
    x[:, 0, 0, 0], x[:, 0, 0, 1] = ids % 256, ids // 256  # each row says which it is
    blocks = [shards.make_table([str(i) for i in range(a, min(a + 70, 300))], x[a:a + 70]) for a in range(0, 300, 70)]

    def order(shuffle, seed=0):
        out = np.concatenate([b.numpy() for b in ingest.batches(iter(blocks), 32, shuffle, seed)])
        got = out[:, 0, 0, 0].astype(int) + 256 * out[:, 0, 0, 1].astype(int)
        assert np.array_equal(out, x[got])  # whole rows, not mixed
        return got

    plain = order(0)
    assert list(plain) == list(range(288))  # the last partial batch is dropped
    mixed = order(100)
    assert len(mixed) == 288 and len(set(mixed)) == 288  # none lost or repeated (288 of 300: whole batches)
    assert len({int(i) // 70 for i in mixed[:32]}) == 2 and list(mixed[:32]) != sorted(mixed[:32])  # blocks 0 and 1
    assert list(order(100)) == list(mixed) and list(order(100, seed=1)) != list(mixed)


# ------------------------------------------------------------------------------------------ through Ray Data


def test_two_epochs_differ_and_the_same_seed_reproduces_them(ray_cluster, tmp_path):
    uri = str(tmp_path / "ds")
    make_dataset(uri)
    (blocks,) = stream_blocks(uri, seed=7)
    keys = epoch_keys(blocks)
    assert sorted(keys) == [0, 1] and sorted(keys[0]) == sorted(keys[1]) and keys[0] != keys[1]
    assert epoch_keys(stream_blocks(uri, seed=7)[0]) == keys
    assert epoch_keys(stream_blocks(uri, seed=8)[0]) != keys


@pytest.mark.parametrize("splits", [1, 2])
def test_every_row_once_per_epoch_across_workers(ray_cluster, tmp_path, splits):
    uri = str(tmp_path / "ds")
    make_dataset(uri)
    per_split = [epoch_keys(blocks) for blocks in stream_blocks(uri, seed=1, splits=splits)]
    if splits == 2:
        assert all(sum(map(len, p.values())) == 120 for p in per_split)  # an equal split of 2 x 120 rows
    for epoch in (0, 1):
        seen = Counter(k for p in per_split for k in p.get(epoch, []))
        assert seen == Counter(f"d{j:05d}" for j in range(120))  # none lost, none twice


def test_a_replaced_shard_stops_the_stream_naming_it(ray_cluster, s3_bucket, tmp_path):
    uri = storage.join(s3_bucket, "ds")
    x = make_dataset(uri, n_shards=3)
    replace_with_same_size_shard(uri, x, 1, 20, str(tmp_path))
    with pytest.raises(DatasetError, match=r"shard shards/part-00001.parquet: sha256 differs from the manifest of s3://"):
        stream_blocks(uri, seed=0, epochs=1)


# ------------------------------------------------------------------------------------------ through Ray Train


@pytest.mark.slow
def test_train_on_a_replaced_shard_is_one_line_exit_2(tmp_path):
    """A valid shard of the same size replaces another: training stops on it, and the CLI says so in one line naming
    the shard, with no traceback."""
    data = tmp_path / "data"
    x = make_dataset(str(data), n_shards=4, rows=32)
    replace_with_same_size_shard(str(data), x, 2, 32, str(tmp_path / "scratch"))
    cfg = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())
    cfg["cluster"]["max_failures"] = 0  # Ray Train would retry the group on the same shard
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "dcgan.cli", "train", "--config", str(config), "--data", str(data),
                        "--run", str(tmp_path / "run")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"})
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dcgan train: error: ")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and "shards/part-00002.parquet" in lines[0] and "sha256" in lines[0], r.stderr[-3000:]
    assert lines[0].endswith("restore the shard)"), lines[0]  # nothing of Ray's appended
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
