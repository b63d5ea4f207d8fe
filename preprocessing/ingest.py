"""The previous training input: a dataset's shards, in a fresh seeded order every epoch, through a Ray Data split, as
uint8 batches. Training now reads `preprocessing.stream` (the same global batches for any worker count; a Ray Data
split gave blocks to whichever worker had fewest rows). Kept as the reference the stream's shuffle is tested against
(tests/test_stream.py) until the lead decides to drop it.

The epochs a run still needs are unrolled into one Ray Dataset whose items are (epoch, slot) -> shard
`epoch_order(seed, epoch)[slot]`; each Ray Train worker iterates its split of it once, so there is no barrier, planning
or task start-up at an epoch boundary. A read task reads whole shard files (one, or a few small ones), checks each
against the manifest (size and sha256: the read has the bytes anyway) and decodes only the image column; the pixels
travel as the shard's fixed-size binary column (no per-row work, no tensor conversion). On the worker, `batches`
mixes rows across shards in a random-replacement buffer and yields (N, R, R, C) uint8 tensors.

Why not `ray.data.read_parquet` (benchmarks/RESULTS.md): every iteration listed the files and started 32 footer-reading
actors (10-20 s before the first batch on 2 cores, at every epoch) and packed 20 shards into one 126 MB block.

Layer: preprocessing.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.exceptions import UserCodeException

from preprocessing import shards, storage, stream
from preprocessing.errors import one_line
from preprocessing.stream import epoch_order

if TYPE_CHECKING:
    import torch

# Pixel bytes per read task: several small shards share one task, whose fixed cost in Ray (about 10 ms of CPU over
# all processes) would otherwise match the read of a 32 px shard.
TASK_BYTES = 24 << 20
EPOCH = "epoch"  # a column the stream can add: which epoch a row belongs to (tests, diagnostics)


def stream_items(manifest: dict[str, Any], seed: int, start_row: int, rows: int) -> list[tuple[int, int]]:
    """(epoch, shard index) for the rows [start_row, start_row + rows) of the unrolled epochs.

    A stream that starts inside an epoch (a resumed run) starts at the shard holding row `start_row` of that epoch's
    order, so a resume continues the epoch where it was (to shard granularity) instead of repeating it.
    """
    sizes = [int(s["rows"]) for s in manifest["shards"]]
    total = sum(sizes)
    if total == 0:
        raise shards.DatasetError("the manifest lists no rows")
    epoch, offset = divmod(start_row, total)
    items: list[tuple[int, int]] = []
    covered = 0
    while covered < rows + offset:
        order = epoch_order(len(sizes), seed, epoch)
        for i in order:
            if covered + sizes[i] > offset:
                items.append((epoch, int(i)))
            covered += sizes[i]
            if covered >= rows + offset:
                break
        epoch += 1
    return items


class ShardError(shards.DatasetError, UserCodeException):
    """A shard that fails its manifest check in a read task: a DatasetError for the project, and for Ray Data a fault
    of the task's own code, which it reports in one line (no internal traceback) and does not retry."""


class ShardUnreachable(storage.StorageUnreachable, UserCodeException):
    """A shard whose store did not answer (after boto3's retries): transient, so Ray Train restarts the workers
    (and the caller retries the run with the backoff), unlike a ShardError."""


def read_shard(dataset_uri: str, entry: dict[str, Any], resolution: int, channels: int, columns: Sequence[str],
               epoch: int) -> pa.Table:
    """One shard, checked against its manifest entry as it is read (DatasetError names the shard)."""
    try:
        table = stream.read_checked(dataset_uri, entry, resolution, channels, [c for c in columns if c != EPOCH])
    except storage.StorageUnreachable as err:  # the store, not the shard, is failing: a fault that may pass
        raise ShardUnreachable(one_line(err)) from None
    except shards.DatasetError as err:
        raise ShardError(str(err)) from None
    if EPOCH in columns:
        table = table.append_column(EPOCH, pa.array(np.full(table.num_rows, epoch, np.int32)))
    return table


def read_shards(dataset_uri: str, items: list[tuple[int, dict[str, Any]]], resolution: int, channels: int,
                columns: Sequence[str]) -> Iterator[pa.Table]:
    """One read task: consecutive (epoch, shard) items of the stream, one block per shard."""
    for epoch, entry in items:
        yield read_shard(dataset_uri, entry, resolution, channels, columns, epoch)


class ShardStream(Datasource):
    """A Ray Data datasource over (epoch, shard) items, in stream order: consecutive items share a read task up to
    TASK_BYTES of pixels, one block per shard."""

    def __init__(self, dataset_uri: str, manifest: dict[str, Any], items: list[tuple[int, int]],
                 columns: Sequence[str]):
        super().__init__()
        self._uri, self._items, self._columns = dataset_uri, items, tuple(columns)
        self._shards = manifest["shards"]
        self._res, self._ch = int(manifest["resolution"]), int(manifest.get("channels", 3))

    def get_name(self) -> str:
        return "TrainingShards"

    def estimate_inmemory_data_size(self) -> int:
        return sum(self._shards[i]["rows"] for _, i in self._items) * self._res * self._res * self._ch

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
        row_bytes = self._res * self._res * self._ch
        groups: list[list[tuple[int, dict[str, Any]]]] = [[]]
        for epoch, i in self._items:
            if groups[-1] and sum(e["rows"] for _, e in groups[-1]) * row_bytes >= TASK_BYTES:
                groups.append([])
            groups[-1].append((epoch, self._shards[i]))
        tasks = []
        for group in groups:
            rows = sum(e["rows"] for _, e in group)
            read = functools.partial(read_shards, self._uri, group, self._res, self._ch, self._columns)
            meta = BlockMetadata(num_rows=rows, size_bytes=rows * row_bytes, exec_stats=None,
                                 input_files=[e["path"] for _, e in group])
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def training_dataset(dataset_uri: str, manifest: dict[str, Any], *, seed: int, start_row: int, rows: int,
                     columns: Sequence[str] = ("image",), progress: bool = False):
    """The rows [start_row, start_row + rows) of the run's unrolled, shuffled epochs as one streaming Ray Dataset
    (whole shards: it may hold a few rows more).

    Give it to Ray Train with `data_config()`: blocks then keep stream order, so the same seed gives every split the
    same shards in the same order.
    """
    if not manifest["shards"]:
        raise shards.DatasetError(f"{dataset_uri}: the manifest lists no shards")
    items = stream_items(manifest, seed, start_row, rows)
    source = ShardStream(dataset_uri, manifest, items, columns)
    # A read is one core of work. Asking for less than the CPUs left beside the training workers (at least a quarter)
    # lets it run at all where they hold all but a fraction; asking for more than 1 never pays. Fractions above
    # what is free would start extra Ray workers that Ray then reaps when idle and starts again (seconds of CPU each).
    read_cpus = min(1.0, max(0.25, ray.available_resources().get("CPU", 1.0)))
    ds = ray.data.read_datasource(source, num_cpus=read_cpus, override_num_blocks=len(source.get_read_tasks(1)))
    ds.context.enable_progress_bars = progress
    # One read operator: Ray Data's per-operator reservation would hold back CPUs for operators that do not exist
    # (on 2 CPUs it ran one read at a time, ~25 ms apart: half the throughput).
    ds.context.op_resource_reservation_enabled = False
    return ds


def data_config():
    """Ray Train's DataConfig for the stream: blocks in stream order (deterministic shard order and split)."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(execution_options=ExecutionOptions(preserve_order=True))


class _Rows:
    """Incoming rows, flattened to (N, bytes per row), taken from the front in any count."""

    def __init__(self):
        self.parts: deque[np.ndarray] = deque()
        self.n = self.width = 0

    def add(self, x: np.ndarray) -> None:
        self.width = int(np.prod(x.shape[1:]))
        if len(x):
            self.parts.append(x.reshape(len(x), self.width))
            self.n += len(x)

    def take(self, k: int) -> np.ndarray:
        """The next k rows: a view of one block when they lie in it, else one copy."""
        self.n -= k
        pieces = []
        while k:
            part = self.parts.popleft()
            if len(part) > k:
                self.parts.appendleft(part[k:])
                part = part[:k]
            pieces.append(part)
            k -= len(part)
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty((0, self.width), np.uint8)


def batches(blocks: Iterable[pa.Table], batch_size: int, shuffle_rows: int, seed: Sequence[int] | int
            ) -> Iterator[torch.Tensor]:
    """Blocks of shard rows -> (batch_size, R, R, C) uint8 tensors; the last partial batch is dropped.

    With `shuffle_rows` > 0 the rows pass through a buffer of that many: each batch is drawn at random from the buffer
    and replaced by the next incoming rows (one gather and one scatter per batch: two copies of each row); at the end
    the buffer empties in random order. Every tensor owns its memory (nothing aliases Ray's object store).
    """
    import torch  # here, not at the top: read tasks import this module and need no torch

    rng = np.random.default_rng(seed)
    rows, shape = _Rows(), None
    capacity = max(shuffle_rows, batch_size) if shuffle_rows else 0
    pool = None
    filled = 0

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.reshape(len(x), *shape))

    for block in blocks:
        x = shards.images_of(block)
        shape = x.shape[1:]
        rows.add(x)
        if not capacity:
            while rows.n >= batch_size:
                yield tensor(np.array(rows.take(batch_size)))
            continue
        if pool is None:
            pool = np.empty((capacity, int(np.prod(shape))), np.uint8)
        if filled < capacity:
            k = min(rows.n, capacity - filled)
            pool[filled:filled + k] = rows.take(k)
            filled += k
        while filled == capacity and rows.n >= batch_size:
            slots = rng.choice(capacity, batch_size, replace=False)
            out = pool[slots]
            pool[slots] = rows.take(batch_size)
            yield tensor(out)
    if pool is not None:
        rest = np.concatenate([pool[:filled], rows.take(rows.n)])
        rest = rest[rng.permutation(len(rest))]
        for start in range(0, len(rest) - batch_size + 1, batch_size):
            yield tensor(rest[start:start + batch_size])
