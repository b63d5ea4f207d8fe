"""The training stream (preprocessing.stream): the global batch at step s depends on (manifest, seed, s) only: the
same rows for 1, 2 and 4 workers, across epochs and resumes; each worker reads about its share of the bytes; the
shuffle mixes at least as many shards per batch as the previous per-worker shuffle buffer."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing import ingest, shards, storage, stream
from preprocessing.shards import DatasetError
from tests.realdata import mnist_rgb32
from tests.test_ingest import replace_with_same_size_shard
from preprocessing import dataset_layout

# 9 shards of unequal size (297 rows); batch 32 over 8 lanes of 4 rows, shuffle windows of 8 rows per lane:
# 9 steps per epoch, so 30 steps cross three epoch boundaries.
SIZES = [23, 41, 30, 17, 52, 29, 36, 44, 25]
BATCH, SHUFFLE, SEED, STEPS = 32, 64, 5, 30


def make_dataset(uri: str, sizes=SIZES, x=None) -> dict:
    """Real digits; key dNNNNN is row NNNNN of the whole dataset."""
    x = mnist_rgb32(sum(sizes)) if x is None else x
    entries, start = [], 0
    for i, n in enumerate(sizes):
        keys = [f"d{j:05d}" for j in range(start, start + n)]
        entries.append(shards.write_table(uri, dataset_layout.part(i), shards.make_table(keys, x[start:start + n])))
        start += n
    shards.write_manifest(uri, kind="test", resolution=32, shards=entries, inputs=len(x))
    return shards.read_manifest(uri)


def spec(shuffle=SHUFFLE, seed=SEED):
    return stream.StreamSpec.of(BATCH, shuffle, seed)


def global_keys(uri, manifest, world, start=0, stop=STEPS, sp=None) -> list[list[str]]:
    """The global batch's keys at each step, put together from the slices of `world` workers."""
    per_rank = []
    for rank in range(world):
        s = stream.WorkerStream(uri, manifest, sp or spec(), rank, world, start, stop, columns=("key",))
        per_rank.append([t.column("key").to_pylist() for t in s])
    return [sum((r[i] for r in per_rank), []) for i in range(stop - start)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("stream") / "ds")
    return uri, make_dataset(uri)


def test_the_global_batches_are_the_same_for_1_2_and_4_workers(dataset):
    uri, manifest = dataset
    plan = stream.Plan(SIZES, spec())
    assert (plan.spec.lanes, plan.per_lane, plan.window, plan.steps_per_epoch) == (8, 4, 8, 9)
    one = global_keys(uri, manifest, 1)
    assert len(one) == STEPS and all(len(b) == BATCH for b in one)
    assert global_keys(uri, manifest, 2) == one
    assert global_keys(uri, manifest, 4) == one
    # ... and they are the stream's definition: the plan's (shard, row) pairs
    starts = np.concatenate([[0], np.cumsum(SIZES)])
    assert one == [[f"d{starts[s] + r:05d}" for s, r in plan.batch_rows(step)] for step in range(STEPS)]
    # each epoch: no row twice, a fresh order; all but the < lanes * (per_lane + 1) rows an epoch drops are used
    epochs = [sum(one[e * 9:(e + 1) * 9], []) for e in range(3)]
    assert all(len(set(e)) == len(e) == 288 for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert global_keys(uri, manifest, 1, sp=spec(seed=SEED + 1)) != one


@pytest.mark.parametrize("world", [1, 2, 4])
def test_a_resume_at_any_step_continues_the_stream(dataset, world):
    """Started at step 13 (mid-window, mid-epoch) on any worker count: exactly the rest of the uninterrupted stream."""
    uri, manifest = dataset
    assert global_keys(uri, manifest, world, start=13) == global_keys(uri, manifest, 1)[13:]


def test_without_shuffle_a_lane_reads_its_segment_in_order(dataset):
    uri, manifest = dataset
    plan = stream.Plan(SIZES, spec(shuffle=0))
    assert plan.window == plan.per_lane
    keys = global_keys(uri, manifest, 2, stop=2, sp=spec(shuffle=0))
    starts = np.concatenate([[0], np.cumsum(SIZES)])
    first = [f"d{starts[s] + r:05d}" for s, a, c in plan.pieces(0, 0, 0, 8) for r in range(a, c)]
    assert keys[0][:4] + keys[1][:4] == first  # lane 0: the first 8 rows of epoch 0's shard order, in order


def test_each_worker_reads_about_its_share_of_the_bytes(s3_bucket):
    """From S3: over one epoch of 48 shards, 2 and 4 workers each read their share plus at most the shards their
    lanes share with a neighbour."""
    rng = np.random.default_rng(0)
    sizes = [int(n) for n in rng.integers(16, 48, 48)]
    uri = storage.join(s3_bucket, "ds")
    manifest = make_dataset(uri, sizes)
    total = sum(e["bytes"] for e in manifest["shards"])
    biggest = max(e["bytes"] for e in manifest["shards"])
    sp = spec()
    steps = stream.Plan(sizes, sp).steps_per_epoch
    for world in (1, 2, 4):
        read = []
        for rank in range(world):
            s = stream.WorkerStream(uri, manifest, sp, rank, world, 0, steps, columns=("key",))
            assert sum(1 for _ in s) == steps
            read.append(s.bytes_read)
        lanes = sp.lanes // world
        print(f"{world} worker(s): bytes read / share {[round(r / (total / world), 3) for r in read]}")
        assert all(r <= total / world + lanes * biggest for r in read), (world, read, total)
        assert sum(read) <= total + (sp.lanes - 1) * biggest


def test_the_shuffle_mixes_at_least_as_many_shards_per_batch_as_the_old_buffer(tmp_path):
    """Distinct shards per global batch over two epochs (with their rows' shard of origin): the lanes' windows
    against the previous path (whole shards in the epoch's order through a 64-row random-replacement buffer)."""
    rng = np.random.default_rng(1)
    sizes = [int(n) for n in rng.integers(40, 120, 24)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    x = mnist_rgb32(int(starts[-1]))
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(len(x)) % 256, np.arange(len(x)) // 256  # each row says which it is
    uri = str(tmp_path / "ds")
    manifest = make_dataset(uri, sizes, x)

    def shard_of(row: int) -> int:
        return int(np.searchsorted(starts, row, side="right")) - 1

    steps = 2 * stream.Plan(sizes, spec()).steps_per_epoch
    new = [len({shard_of(int(k[1:])) for k in b}) for b in global_keys(uri, manifest, 1, stop=steps)]
    items = ingest.stream_items(manifest, SEED, 0, 2 * int(starts[-1]))
    blocks = (ingest.read_shard(uri, manifest["shards"][i], 32, 3, ("image",), e) for e, i in items)
    old = []
    for batch in ingest.batches(blocks, BATCH, SHUFFLE, SEED):
        rows = batch[:, 0, 0, 0].long() + 256 * batch[:, 0, 0, 1].long()
        old.append(len({shard_of(int(r)) for r in rows}))
    old = old[:steps]
    print(f"distinct shards per batch: lanes {np.mean(new):.2f}, old buffer {np.mean(old):.2f}")
    assert np.mean(new) >= np.mean(old), (np.mean(new), np.mean(old))


def test_a_replaced_shard_stops_the_stream_naming_it(tmp_path):
    uri = str(tmp_path / "ds")
    make_dataset(uri, [32, 32, 32, 32])
    x = mnist_rgb32(128)
    replace_with_same_size_shard(uri, x, 2, 32, str(tmp_path / "scratch"))
    manifest = shards.read_manifest(uri)
    with pytest.raises(DatasetError, match=r"shard shards/part-00002.parquet: sha256 differs"):
        list(stream.WorkerStream(uri, manifest, stream.StreamSpec.of(32, 0, 0), 0, 1, 0, 8))
