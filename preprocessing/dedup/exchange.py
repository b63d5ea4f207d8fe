"""The group stage's shuffles between plain Ray tasks: what Ray Data's `groupby(key).map_groups(fn)` did, chained.

Each step of a chain is one task per partition: it gets its piece of every task of the step before (Ray passes the
object references; nothing goes through the driver), calls its function once per distinct key value in key order,
and cuts the result into the next step's partitions (`num_returns`). Ray Data's hash shuffle starts an executor and
aggregator actors per groupby, even for a few thousand rows, and the verified group stage made four of them; as one
chain of plain tasks the stage ran 1.75-2.16x faster on a 25k-image set (benchmarks/dedup_group.py --baseline
ray-data). Ray retries a lost task and rebuilds a lost piece from its lineage, as it did for Ray Data's tasks.
Batches are dicts of numpy columns, as `map_groups(batch_format="numpy")` gives them; keys are non-negative integers
(a partition or shard number), and a row goes to partition key % partitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

Batch = dict[str, np.ndarray]
MAX_PIECES = 20_000  # pieces (objects) one step makes at most: a chain's first tasks take several blocks each


@dataclass(frozen=True)
class Step:
    """Group the rows by `key` into `partitions` tasks and call `fn(group, *inputs, **kwargs)` on each group (None: on
    each incoming block whole, a map). `inputs` are object references that every task of the step needs (e.g. counts
    an earlier task made): they are its top-level arguments, so Ray resolves them before the task starts. Fetched
    inside the task instead (`ray.get`), a blocked task let Ray start another worker process for its CPU: five new
    worker processes in one 100k-image group stage, none since."""
    key: str | None
    partitions: int
    fn: Callable[..., Batch]
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: tuple = ()


def split(batch: Batch, key: str, partitions: int) -> list[Batch]:
    """A batch cut by `key` % `partitions`, each piece in the batch's own row order."""
    if partitions == 1 or not batch:
        return [batch] + [{} for _ in range(partitions - 1)]
    where = np.asarray(batch[key]).astype(np.int64) % partitions
    order = np.argsort(where, kind="stable")
    bounds = np.searchsorted(where[order], np.arange(partitions + 1))
    return [{c: np.asarray(v)[order[bounds[i]:bounds[i + 1]]] for c, v in batch.items()} for i in range(partitions)]


def concat(pieces: list[Batch]) -> Batch:
    """Batches with the same columns, one after the other; empty ones (no columns, or no rows) left out."""
    pieces = [p for p in pieces if p and len(next(iter(p.values())))]
    if not pieces:
        return {}
    if len(pieces) == 1:
        return pieces[0]
    return {c: np.concatenate([np.asarray(p[c]) for p in pieces]) for c in pieces[0]}


def by_group(batch: Batch, key: str, fn: Callable[..., Batch], kwargs: dict[str, Any], inputs: tuple = ()) -> Batch:
    """`fn` on each group of rows with one `key` value, in key order (rows keep their order within a group); `batch`
    is {} or has rows (as `concat` makes them)."""
    if not batch:
        return {}
    keys = np.asarray(batch[key])
    order = np.argsort(keys, kind="stable")
    starts = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    return concat([fn({c: np.asarray(v)[order[s:e]] for c, v in batch.items()}, *inputs, **kwargs)
                   for s, e in zip(starts, ends)])


def _step_task(step: Step, next_key: str | None, next_partitions: int, n_pieces: int, *args: Any) -> Any:
    """One partition of a step: its `n_pieces` pieces (then the step's resolved `inputs`) -> `step.fn` -> cut for the
    next step (or the chain's result)."""
    batch = concat([as_batch(p) for p in args[:n_pieces]])
    inputs = args[n_pieces:]
    if not batch:  # no rows came (an empty block, or none of this partition's key values)
        out = {}
    elif step.key is None:
        out = step.fn(batch, *inputs, **step.kwargs)
    else:
        out = by_group(batch, step.key, step.fn, step.kwargs, inputs)
    if next_key is None:
        return out
    pieces = split(out, next_key, next_partitions)
    return pieces if next_partitions > 1 else pieces[0]


def as_batch(piece: Any) -> Batch:
    """A numpy batch, or a Ray Data block (an Arrow table, as `Dataset.to_arrow_refs` gives) made one."""
    if isinstance(piece, dict):
        return piece
    from ray.data.block import BlockAccessor

    acc = BlockAccessor.for_block(piece)
    return acc.to_batch_format("numpy") if acc.num_rows() else {}


def _same(batch: Batch) -> Batch:
    return batch


def _runs(blocks: list, most: int) -> list[list]:
    """The blocks in at most `most` runs of consecutive blocks (at least one run), in order."""
    n = max(1, min(len(blocks), most))
    bounds = np.linspace(0, len(blocks), n + 1).astype(int)
    return [blocks[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def run(blocks: list, steps: list[Step]) -> list:
    """The chain of `steps` over `blocks` (object references to numpy batches or Ray Data blocks); returns object
    references to the last step's batches, one per partition (one per first task if it is a map). A chain whose first
    step has a key starts by cutting the blocks by it. The first tasks take a run of consecutive blocks each when one
    a block would make more than MAX_PIECES pieces (3M images: 1,465 shards x 128 code partitions)."""
    import ray

    if steps[0].key is not None:
        steps = [Step(None, len(blocks), _same)] + steps
    task = ray.remote(_step_task)
    outs: list[list] = []  # outs[i][j]: task i's piece for partition j of the next step
    for s, step in enumerate(steps):
        nxt = steps[s + 1] if s + 1 < len(steps) else None
        n_next = nxt.partitions if nxt else 1
        if s == 0:
            inputs = _runs(blocks, MAX_PIECES // n_next)
        else:
            inputs = [[o[j] for o in outs] for j in range(step.partitions)]
        t = task.options(num_returns=n_next)
        made = [t.remote(step, nxt.key if nxt else None, n_next, len(pieces), *pieces, *step.inputs)
                for pieces in inputs]
        outs = [[m] if n_next == 1 else m for m in made]
    return [o[0] for o in outs]


def gather(refs: list) -> Batch:
    """The batches behind `refs`, one after the other, on the driver."""
    import ray

    return concat(ray.get(refs))


def total(refs: list, column: str | None = None) -> int:
    """The sum of an integer or bool column (None: the rows) over the batches or Ray Data blocks (Arrow tables) behind
    `refs`, each summed where it lives; of a block, only that column is read."""
    return totals(refs, (column,))[0]


def totals(refs: list, columns: tuple[str | None, ...]) -> list[int]:
    """`total` of several columns in one task a block."""
    import ray

    task = ray.remote(_column_totals)
    return [int(v) for v in np.sum(ray.get([task.remote(r, columns) for r in refs]), axis=0, dtype=np.int64)] \
        if refs else [0] * len(columns)


def _column_totals(batch: Any, columns: tuple[str | None, ...]) -> list[int]:
    return [_column_total(batch, c) for c in columns]


def _column_total(batch: Any, column: str | None) -> int:
    if not isinstance(batch, dict):  # a Ray Data block
        return batch.num_rows if column is None else int(np.sum(batch.column(column).to_numpy(), dtype=np.int64))
    if not batch:
        return 0
    return len(next(iter(batch.values()))) if column is None else int(np.sum(batch[column], dtype=np.int64))
