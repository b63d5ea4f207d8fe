"""The training stream: the global batch at step s is a function of (manifest, seed, s) alone, whatever the number of
workers, which node read which shard, or how often the run restarted; worker r of N takes slice r of it.

How (the idea of MosaicML Streaming's canonical nodes): every epoch the shards are put in a seeded order
(`epoch_order`) and the concatenated rows are cut into `lanes` equal segments. Each lane shuffles its segment in
windows of `window` rows (a seeded permutation per window) and gives `batch / lanes` consecutive rows per step; the
global batch is lane 0's rows, then lane 1's, and so on. Worker r of N takes positions [rB/N, (r+1)B/N) of it, i.e.
whole lanes when N divides `lanes`, so it reads only its lanes' shards: about 1/N of the bytes (plus, per lane and
epoch, the shard it shares with the next lane). `lanes` and `window` come from the batch size and the shuffle size,
never from N, so a resume on another worker count continues the very same stream.

A worker reads whole shard files (one GET each, checked against the manifest's size and sha256: the read has the
bytes anyway) in a thread pool a few shards ahead of each lane, and assembles its batches in a thread of their own.
Works on any storage URI (`preprocessing.storage`: local disk or S3).

Layer: preprocessing (no Ray, no torch).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from preprocessing import shards, storage
from preprocessing.errors import one_line

MAX_DEFAULT_LANES = 8  # the most workers that read only their share unless train.lanes says more


def epoch_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the shards in `epoch`: a permutation drawn from (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(n_shards)


def default_lanes(batch: int) -> int:
    """The largest divisor of the batch up to MAX_DEFAULT_LANES: 1, 2, 4 and 8 workers each read only their share."""
    return max(d for d in range(1, MAX_DEFAULT_LANES + 1) if batch % d == 0)


@dataclass(frozen=True)
class StreamSpec:
    """What fixes the stream besides the manifest; stored in each checkpoint so that a resume keeps it."""

    seed: int
    batch: int  # global batch
    lanes: int
    window: int  # rows per lane's shuffle window, a multiple of batch / lanes; 0 = no within-window shuffle

    @classmethod
    def of(cls, batch: int, shuffle_rows: int, seed: int, lanes: int | None = None) -> "StreamSpec":
        """`shuffle_rows` rows are shuffled at a time over all lanes (each lane's window is its part of them)."""
        lanes = lanes or default_lanes(batch)
        if batch % lanes:
            raise ValueError(f"the batch ({batch}) must be divisible by the stream's lanes ({lanes})")
        per_lane = batch // lanes
        window = 0 if shuffle_rows <= 0 else -(-shuffle_rows // (lanes * per_lane)) * per_lane
        return cls(seed=int(seed), batch=int(batch), lanes=int(lanes), window=int(window))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Plan:
    """The stream of one dataset: which rows make the global batch at each step. Pure arithmetic on the manifest's
    shard sizes; nothing is read."""

    def __init__(self, sizes: Sequence[int], spec: StreamSpec):
        self.sizes, self.spec = np.asarray(sizes, np.int64), spec
        self.per_lane = spec.batch // spec.lanes  # rows a lane gives each step
        self.lane_rows = int(self.sizes.sum()) // spec.lanes
        self.steps_per_epoch = self.lane_rows // self.per_lane
        if self.steps_per_epoch == 0:
            raise shards.DatasetError(f"the dataset's {int(self.sizes.sum())} rows are fewer than one batch of "
                                      f"{spec.batch}")
        self.used = self.steps_per_epoch * self.per_lane  # rows of each lane's segment used per epoch (rest dropped)
        self.window = spec.window or self.per_lane

    @functools.lru_cache(maxsize=8)
    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = epoch_order(len(self.sizes), self.spec.seed, epoch)
        return order, np.concatenate([[0], np.cumsum(self.sizes[order])])

    def locate(self, step: int) -> tuple[int, int, int]:
        """(epoch, window, offset in the window) of a step's rows in every lane."""
        epoch, j = divmod(step, self.steps_per_epoch)
        window, offset = divmod(j * self.per_lane, self.window)
        return epoch, window, offset

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def pieces(self, epoch: int, lane: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Rows [lo, hi) of a lane's segment in `epoch` as (shard, first row, end row), in stream order."""
        order, starts = self._order(epoch)
        a, b = lane * self.lane_rows + lo, lane * self.lane_rows + hi
        out = []
        k = int(np.searchsorted(starts, a, side="right")) - 1
        while a < b:
            end = min(b, int(starts[k + 1]))
            out.append((int(order[k]), a - int(starts[k]), end - int(starts[k])))
            a, k = end, k + 1
        return out

    def lane_shards(self, epoch: int, lane: int) -> list[int]:
        """The shards a lane reads in `epoch`, in order."""
        return [s for s, _, _ in self.pieces(epoch, lane, 0, self.used)]

    def window_rows(self, epoch: int, lane: int, window: int) -> tuple[list[tuple[int, int, int]], np.ndarray | None]:
        """One lane window: its pieces in stream order and the seeded permutation of its rows (None: no shuffle)."""
        lo = window * self.window
        hi = min(lo + self.window, self.used)
        perm = None
        if self.spec.window:
            perm = np.random.default_rng([self.spec.seed, epoch, lane, window, 0x5EED]).permutation(hi - lo)
        return self.pieces(epoch, lane, lo, hi), perm

    def batch_rows(self, step: int) -> np.ndarray:
        """The global batch at `step` as (batch, 2) (shard, row) pairs: the stream's definition, for tests."""
        epoch, window, offset = self.locate(step)
        out = []
        for lane in range(self.spec.lanes):
            pieces, perm = self.window_rows(epoch, lane, window)
            rows = np.concatenate([np.stack([np.full(c - a, s), np.arange(a, c)], 1) for s, a, c in pieces])
            if perm is not None:
                rows = rows[perm]
            out.append(rows[offset:offset + self.per_lane])
        return np.concatenate(out)


def worker_span(batch: int, rank: int, world: int) -> tuple[int, int]:
    """Worker `rank`'s positions [start, end) in the global batch."""
    if batch % world:
        raise ValueError(f"the batch ({batch}) must be divisible by the number of workers ({world})")
    n = batch // world
    return rank * n, (rank + 1) * n


def read_checked(dataset_uri: str, entry: dict[str, Any], resolution: int, channels: int,
                 columns: Sequence[str]) -> pa.Table:
    """One whole shard, checked against its manifest entry (size, sha256, rows, schema) as it is read; DatasetError
    names the shard."""
    uri = storage.join(dataset_uri, entry["path"])
    try:
        data = storage.read_bytes(uri)
    except storage.StorageUnreachable as err:  # the store, not the shard, is failing: transient (Ray Train retries)
        raise storage.StorageUnreachable(f"shard {entry['path']} of {dataset_uri} cannot be read: {one_line(err)}") \
            from None
    except storage.StorageError as err:
        raise shards.DatasetError(f"shard {entry['path']} of {dataset_uri} cannot be read: {one_line(err)}") from None
    parquet = shards.check_shard(dataset_uri, entry, data, resolution, channels)
    return parquet.read(columns=list(columns), use_threads=False)


class _Lane:
    """One lane on one worker: its current shuffled window, and its next shards already being read."""

    def __init__(self, stream: "WorkerStream", lane: int):
        self.stream, self.lane = stream, lane
        self.items: deque[tuple[int, int]] = deque()  # (epoch, shard) from the one in use on
        self.next_epoch: int | None = None
        self.reads: dict[tuple[int, int], Future] = {}
        self.key: tuple[int, int] | None = None  # (epoch, window) of `table`
        self.table: pa.Table | None = None

    def _advance(self, epoch: int, shard: int) -> None:
        """Move the lane's upcoming shards on to (epoch, shard), dropping the reads before it."""
        plan = self.stream.plan
        if self.next_epoch is None:
            self.next_epoch = epoch
        while True:
            if not self.items:
                self.items.extend((self.next_epoch, s) for s in plan.lane_shards(self.next_epoch, self.lane))
                self.next_epoch += 1
            if self.items[0] == (epoch, shard):
                return
            self.reads.pop(self.items.popleft(), None)

    def _submit(self, item: tuple[int, int]) -> None:
        if item not in self.reads:
            self.reads[item] = self.stream.pool.submit(self.stream.read, item[1])

    def want(self, epoch: int, window: int) -> None:
        """Start reading the shards of a window the lane is about to build (all lanes ask before any waits)."""
        if self.key != (epoch, window):
            pieces, _ = self.stream.plan.window_rows(epoch, self.lane, window)
            self._advance(epoch, pieces[0][0])
            for s, _, _ in pieces:
                self._submit((epoch, s))

    def _shard(self, epoch: int, shard: int) -> pa.Table:
        """A shard's table (read now unless `want` or `prefetch` started it)."""
        self._advance(epoch, shard)
        self._submit((epoch, shard))
        return self.reads[(epoch, shard)].result()

    def prefetch(self) -> None:
        """Start reading the lane's next `ahead` shards (across the epoch boundary too, not past the last step).
        Called after a batch is built, so that at the start every lane's first shard comes before anyone's next."""
        if self.next_epoch is None:
            return
        plan, ahead = self.stream.plan, self.stream.ahead
        while len(self.items) <= ahead and self.next_epoch <= self.stream.last_epoch:
            self.items.extend((self.next_epoch, s) for s in plan.lane_shards(self.next_epoch, self.lane))
            self.next_epoch += 1
        for item in list(self.items)[:ahead + 1]:
            self._submit(item)

    def rows(self, epoch: int, window: int, offset: int) -> pa.Table:
        if self.key != (epoch, window):
            pieces, perm = self.stream.plan.window_rows(epoch, self.lane, window)
            table = pa.concat_tables([self._shard(epoch, s).slice(a, c - a) for s, a, c in pieces])
            self.table = (table.take(pa.array(perm)) if perm is not None else table).combine_chunks()
            self.key = (epoch, window)
        return self.table.slice(offset, self.stream.plan.per_lane)


class WorkerStream:
    """Worker `rank` of `world`: its slice of the global batch at each step in [start_step, stop_step), as pyarrow
    tables of `columns` (built `prefetch` steps ahead in a thread). `bytes_read` counts the shard bytes it read."""

    def __init__(self, dataset_uri: str, manifest: dict[str, Any], spec: StreamSpec, rank: int, world: int,
                 start_step: int, stop_step: int, columns: Sequence[str] = ("image",), prefetch: int = 4,
                 ahead: int = 2, threads: int = 4):
        self.uri, self.manifest, self.spec = dataset_uri, manifest, spec
        self.plan = Plan([s["rows"] for s in manifest["shards"]], spec)
        self.start, self.stop, self.columns = start_step, stop_step, tuple(columns)
        self.last_epoch = self.plan.epoch(max(start_step, stop_step - 1))
        self.span = worker_span(spec.batch, rank, world)
        p = self.plan.per_lane
        self.lanes = {lane: _Lane(self, lane) for lane in range(self.span[0] // p, (self.span[1] - 1) // p + 1)}
        self.ahead, self.prefetch, self.threads = ahead, prefetch, threads
        self.bytes_read = 0
        self._count = threading.Lock()
        self._res, self._ch = int(manifest["resolution"]), int(manifest.get("channels", 3))
        self.pool: ThreadPoolExecutor | None = None

    def read(self, shard: int) -> pa.Table:
        entry = self.manifest["shards"][shard]
        table = read_checked(self.uri, entry, self._res, self._ch, self.columns)
        with self._count:
            self.bytes_read += int(entry["bytes"])
        return table

    def batch(self, step: int) -> pa.Table:
        """This worker's slice of the global batch at `step` (synchronous; the iterator runs it in a thread)."""
        epoch, window, offset = self.plan.locate(step)
        p, (lo, hi) = self.plan.per_lane, self.span
        for reader in self.lanes.values():
            reader.want(epoch, window)
        parts = []
        for lane, reader in self.lanes.items():
            rows = reader.rows(epoch, window, offset)
            a, b = max(lo, lane * p) - lane * p, min(hi, (lane + 1) * p) - lane * p
            parts.append(rows.slice(a, b - a))
        for reader in self.lanes.values():
            reader.prefetch()
        return pa.concat_tables(parts).combine_chunks()

    def __iter__(self) -> Iterator[pa.Table]:
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="stream-read")

        def produce() -> None:
            try:
                for step in range(self.start, self.stop):
                    item = self.batch(step)
                    while not stop.is_set():
                        try:
                            out.put(item, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                out.put(None)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
                out.put(err)

        producer = threading.Thread(target=produce, name="stream-batches", daemon=True)
        producer.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            producer.join(timeout=10)
            self.pool.shutdown(wait=False, cancel_futures=True)
