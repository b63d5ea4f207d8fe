"""The group stage's plain-task shuffles (`preprocessing.dedup.exchange`) against the same groupby done in one
process: several blocks, several partitions, empty blocks and groups, a step that drops rows, on a real local Ray."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from ray import cloudpickle

from preprocessing.dedup import exchange

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module


def _tag(batch, name):
    """One row per group: the group's key, its row count, the sum of its values and the rows' order (as text)."""
    return {"g": batch["g"][:1], "h": batch["h"][:1], "n": np.array([len(batch["g"])]),
            "v": batch["v"].sum(keepdims=True), "order": np.array([",".join(map(str, batch["i"]))], dtype=object),
            name: np.ones(1, bool)}


def _regroup(batch):
    """Each group of `h` -> its rows' `g` sums per parity, dropping odd groups' rows: a step that changes the rows."""
    if int(batch["h"][0]) % 2:
        return {"h": np.zeros(0, np.int64), "total": np.zeros(0, np.int64)}
    return {"h": batch["h"][:1], "total": batch["v"].sum(keepdims=True)}


def _blocks(rng, n_blocks=5, rows=40):
    blocks = []
    start = 0
    for b in range(n_blocks):
        n = 0 if b == 2 else rows  # an empty block in the middle
        i = np.arange(start, start + n)
        start += n
        blocks.append({"i": i, "g": rng.integers(0, 13, n), "h": rng.integers(0, 6, n), "v": rng.integers(0, 100, n),
                       "code": rng.integers(0, 255, (n, 4), dtype=np.uint8)})
    return blocks


def test_consecutive_runs_of_blocks_cover_them_in_order():
    assert exchange._runs(list(range(5)), 2) == [[0, 1], [2, 3, 4]]
    assert exchange._runs(list(range(3)), 10) == [[0], [1], [2]]
    assert exchange._runs([], 4) == [[]]


def test_split_concat_and_by_group_keep_every_row_in_order():
    rng = np.random.default_rng(0)
    batch = _blocks(rng, 1, 50)[0]
    pieces = exchange.split(batch, "g", 4)
    assert len(pieces) == 4 and sum(len(p["i"]) for p in pieces) == 50
    for p, piece in enumerate(pieces):
        assert (piece["g"] % 4 == p).all() and (np.diff(piece["i"]) > 0).all()  # the batch's own order
        assert piece["code"].shape[1:] == (4,)  # tensor columns cut by row
    joined = exchange.concat(pieces + [{}])
    assert sorted(joined["i"]) == list(range(50))
    out = exchange.by_group(batch, "g", _tag, {"name": "t"})
    assert list(out["g"]) == sorted(set(batch["g"]))  # once per group, in key order
    for g, n, v, order in zip(out["g"], out["n"], out["v"], out["order"]):
        rows = batch["i"][batch["g"] == g]
        assert (n, v, order) == (len(rows), batch["v"][batch["g"] == g].sum(), ",".join(map(str, rows)))
    assert exchange.by_group({}, "g", _tag, {"name": "t"}) == {} and exchange.concat([{}, {}]) == {}


@pytest.mark.parametrize("partitions,max_pieces", [(1, exchange.MAX_PIECES), (3, exchange.MAX_PIECES), (3, 6)])
def test_a_chain_of_plain_task_shuffles_gives_what_one_process_gives(ray_cluster, partitions, max_pieces, monkeypatch):
    """Also when the first tasks take several blocks each (`MAX_PIECES` 6: two tasks for five blocks)."""
    ray = ray_cluster
    monkeypatch.setattr(exchange, "MAX_PIECES", max_pieces)
    rng = np.random.default_rng(partitions)
    blocks = _blocks(rng)
    whole = exchange.concat(blocks)
    steps = [exchange.Step("g", partitions, _tag, {"name": "tagged"}),
             exchange.Step("h", partitions + 1, _regroup)]
    refs = exchange.run([ray.put(b) for b in blocks], steps)
    assert len(refs) == partitions + 1
    got = exchange.gather(refs)

    want = exchange.by_group(exchange.by_group(whole, "g", _tag, {"name": "tagged"}), "h", _regroup, {})
    order = np.argsort(got["h"])
    assert list(got["h"][order]) == list(want["h"]) and list(got["total"][order]) == list(want["total"])
    assert len(want["h"]) >= 1 and set(np.unique(whole["h"]) % 2) == {0, 1}  # some groups dropped, some kept
    tagged = exchange.gather(exchange.run([ray.put(b) for b in blocks], steps[:1]))
    tagged_refs = exchange.run([ray.put(b) for b in blocks], steps[:1])
    assert exchange.total(tagged_refs, "n") == len(whole["i"])
    assert exchange.total(tagged_refs) == len(tagged["g"])  # no column: the rows
    # each group met in one task whole, its rows in block order, whatever the partition count
    for g, order_text in zip(tagged["g"], tagged["order"]):
        assert order_text == ",".join(map(str, whole["i"][whole["g"] == g]))


def test_a_chain_over_nothing_gives_nothing(ray_cluster):
    ray = ray_cluster
    empty = {"i": np.zeros(0, np.int64), "g": np.zeros(0, np.int64), "h": np.zeros(0, np.int64),
             "v": np.zeros(0, np.int64)}
    steps = [exchange.Step("g", 2, _tag, {"name": "t"}), exchange.Step("h", 2, _regroup)]
    assert exchange.gather(exchange.run([ray.put(empty), ray.put({})], steps)) == {}
    assert exchange.total(exchange.run([ray.put(empty)], steps[:1]), "n") == 0


def _offset(batch, *tables, by=1):
    """Each row's `v` plus its group's entry in every table (arrays another task made): the step's `inputs`."""
    assert all(isinstance(t, np.ndarray) for t in tables), [type(t) for t in tables]  # resolved, not references
    return {"g": batch["g"], "v": batch["v"] + by * sum(t[batch["g"]] for t in tables)}


def test_a_steps_inputs_arrive_resolved_in_every_task(ray_cluster):
    """`Step.inputs`: object references every task of a step needs (the group stage's shared-code counts) are the
    tasks' own arguments, resolved by Ray before they start, in a map step and a keyed one; no task fetches them."""
    ray = ray_cluster
    rng = np.random.default_rng(7)
    blocks = _blocks(rng)
    whole = exchange.concat(blocks)
    made = ray.remote(lambda k: np.arange(13) * k)
    tables = (made.remote(10), made.remote(1000))  # made by tasks, as `shared_hashes` makes them
    want = whole["v"] + 1010 * whole["g"]
    for steps in ([exchange.Step(None, 5, _offset, {"by": 1}, tables)],
                  [exchange.Step("g", 3, _offset, {"by": 1}, tables)]):
        got = exchange.gather(exchange.run([ray.put(b) for b in blocks], steps))
        assert sorted(zip(got["g"], got["v"])) == sorted(zip(whole["g"], want))


def test_totals_of_ray_data_blocks_read_one_column_of_each_block_where_it_lives(ray_cluster):
    """`exchange.total` over a materialized dataset's Arrow blocks (what dedup's blank and kept counts sum): bool and
    int8 columns, blocks of unequal sizes and an empty one, beside a column of pixels it does not need."""
    import pyarrow as pa

    ray = ray_cluster
    rng = np.random.default_rng(0)
    sizes = [0, 1, 700, 33, 1290]
    tables = [pa.table({"blank": rng.random(n) < 0.3, "keep": rng.integers(0, 2, n).astype(np.int8),
                        "crop": [bytes(rng.integers(0, 256, 192, dtype=np.uint8)) for _ in range(n)]})
              for n in sizes]
    refs = ray.data.from_arrow(tables).materialize().to_arrow_refs()
    assert sorted(ray.get(r).num_rows for r in refs) == sorted(sizes)
    assert exchange.total(refs, "blank") == sum(t["blank"].to_numpy().sum() for t in tables) > 0
    assert exchange.total(refs, "keep") == sum(int(t["keep"].to_numpy().sum()) for t in tables) > 0
    assert exchange.total(refs) == sum(sizes)
