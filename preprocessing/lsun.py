"""LSUN's official LMDBs (`<category>_<split>_lmdb`: 40-hex-character key -> encoded JPEG or WebP) read in parallel.

The driver walks the keys once (keys only: about a second per million from the page cache) and cuts the key space
into ranges of `shard_rows` consecutive keys; each Ray task opens the same LMDB read-only, seeks to its range's first
key and reads on with a cursor. One environment is opened per worker process and reused, with `lock=False` so any
number of processes read concurrently, and with the kernel's readahead ON: a build reads an LMDB once, from a cold
page cache, in key order, and a value is rarely next to its key-order neighbour in the file; with readahead off (the
usual advice for random lookups) every 4 KiB page is its own disk read, which made cold key walks and reads several
times slower (`benchmarks/lmdb_decode.py`, "cold" rows). A folder of exported images (fyu/lsun's `export`:
`<key>.webp` / `<key>.jpg`) works too, listed like any folder: its keys are the paths relative to it (`x.jpg` and
`x.webp` are two inputs). An LMDB is checked against its own metadata when opened: a truncated `data.mdb` would
otherwise kill the process with SIGBUS when a read reaches a page past the end of the file.

Layer: preprocessing.
"""

from __future__ import annotations

from preprocessing.errors import InputError, MissingError, one_line

import functools
from pathlib import Path
from typing import Iterator

import lmdb
import numpy as np

from preprocessing import storage
from preprocessing.images import square_image
from preprocessing.sources import fingerprint


def is_lmdb(path: str) -> bool:
    return not storage.is_s3(path) and (Path(path) / "data.mdb").is_file()


@functools.lru_cache(maxsize=4)
def open_env(path: str) -> lmdb.Environment:
    """A read-only environment, one per process (LMDB forbids opening the same file twice in one process).

    Raises InputError when `data.mdb` is not an LMDB or is shorter than the pages its meta page says are in use.
    """
    data = Path(path) / "data.mdb"
    try:
        env = lmdb.open(path, readonly=True, lock=False, readahead=True, meminit=False, max_readers=2048, subdir=True)
    except lmdb.Error as err:
        raise InputError(f"{data}: not a readable LMDB ({one_line(err).removeprefix(path + ': ')}); "
                         "give the folder of an intact LSUN LMDB") from None
    need, size = (env.info()["last_pgno"] + 1) * env.stat()["psize"], data.stat().st_size
    if size < need:
        env.close()
        raise InputError(f"{data}: truncated LMDB ({size:,} bytes; its metadata says {need:,}); "
                         "copy or download it again")
    return env


def plan_lmdb(path: str, chunk_rows: int, limit: int | None = None) -> tuple[list[dict], int, str]:
    """Key ranges of `chunk_rows` consecutive keys: (chunk specs, number of inputs, fingerprint of the keys).

    The keys stream into the fingerprint: the driver keeps one spec per chunk, not a list of every key (about 130
    bytes a key, so 390 MB at LSUN bedrooms' 3M).
    """
    path = str(Path(path).resolve())
    env = open_env(path)
    chunks: list[dict] = []

    def keys() -> Iterator[str]:
        with env.begin(buffers=True) as txn:
            for n, key in enumerate(txn.cursor().iternext(keys=True, values=False)):
                if limit and n >= limit:
                    break
                k = bytes(key).hex()
                if n % chunk_rows == 0:
                    chunks.append({"lmdb": path, "start": k, "count": 0})
                chunks[-1]["count"] += 1
                yield k

    try:
        digest = fingerprint(keys())
    except lmdb.Error as err:  # pages overwritten (MDB_CORRUPTED, MDB_PAGE_NOTFOUND)
        raise InputError(f"{path}/data.mdb: corrupt LMDB ({one_line(err)}); copy or download it again") from None
    n = sum(c["count"] for c in chunks)
    if n == 0:
        raise MissingError(f"input: the LMDB at {path} has no entries")
    return chunks, n, digest


def read_range(path: str, start_hex: str, count: int) -> Iterator[tuple[str, bytes]]:
    """(key, value) for `count` keys from `start_hex` on; keys are returned as text (LSUN keys are ASCII hex)."""
    env = open_env(path)
    with env.begin(buffers=True) as txn:
        cur = txn.cursor()
        if not cur.set_key(bytes.fromhex(start_hex)):
            raise KeyError(f"{path}: key {bytes.fromhex(start_hex)!r} vanished since the build was planned")
        for _ in range(count):
            key, value = cur.item()
            yield bytes(key).decode("utf-8", "backslashreplace"), bytes(value)
            if not cur.next():
                break


def lsun_rows(key: str, source: str, data: bytes, cfg) -> list[tuple[str, np.ndarray, str, None]]:
    """One LSUN image -> one row: the center crop at the target resolution (JPEGs decode at reduced scale)."""
    return [(key, square_image(data, cfg.resolution, cfg.max_pixels), source, None)]


def write_lmdb(path: str, entries: dict[bytes, bytes]) -> None:
    """An LMDB in the LSUN layout (key -> encoded image); for tests, benchmarks and small custom datasets."""
    size = sum(len(k) + len(v) for k, v in entries.items())
    env = lmdb.open(path, map_size=max(1 << 24, 4 * size), subdir=True)
    try:
        with env.begin(write=True) as txn:
            for k, v in entries.items():
                txn.put(k, v)
    finally:
        env.close()
